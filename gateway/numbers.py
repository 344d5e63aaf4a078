"""Number intelligence: validation detail, health learned from calls, delivery statistics."""

from __future__ import annotations

import base64
import binascii
import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway import phones
from gateway.config import Config, NumbersConfig
from gateway.errors import InvalidRequest
from gateway.outcomes import DELIVERED_OUTCOMES, UNCERTAIN_OUTCOMES, Health, Outcome
from gateway.store import Channel, CheckSource, NumberHealthRecord, Store

log = logging.getLogger(__name__)

MAX_LOOKUP = 1000  # numbers per lookup request
MAX_PAGE = 1000
DEFAULT_PAGE = 100
LISTED_HEALTH = (Health.INVALID, Health.UNREACHABLE, Health.REACHABLE)

# A number's validation detail (phones.describe) and its health record, if any.
Described = tuple[dict[str, Any], NumberHealthRecord | None]


DAY = 86400.0


def invalid_refused_since(policy: NumbersConfig, now: float) -> float | None:
    """A number the network called invalid after this time is refused without a call
    (numbers.refuse_invalid_days); None: never refused. The create (in its transaction)
    and the number lookups both ask this."""
    days = policy.refuse_invalid_days
    return now - days * DAY if days > 0 else None


class Numbers:
    """What the gateway knows about numbers, without calling them."""

    def __init__(self, config: Config, store: Store, clock: Callable[[], float] = time.time):
        self._config = config
        self._store = store
        self._clock = clock

    async def describe(self, raw: str, region: str | None = None) -> Described:
        """Validation detail and health of one number."""
        return (await self.lookup([raw], region))[0]

    async def lookup(self, raws: list[object], region: str | None = None) -> list[Described]:
        """Validation detail and health of each number, in order; never raises per entry."""
        default_region = region or self._config.numbers.default_region
        results = [
            phones.describe(raw, default_region, self._config.numbers)
            if isinstance(raw, str)
            else _not_a_string(raw)
            for raw in raws
        ]
        e164s = [r["e164"] for r in results if r.get("e164")]
        known = await self._store.number_health_many(e164s)
        described = []
        for result in results:
            record = known.get(result.get("e164", ""))
            if record is not None and result["callable"] and self._refuses(record):
                result["callable"] = False
                result["refused_by"] = "number_known_invalid"
            described.append((result, record))
        return described

    def _refuses(self, record: NumberHealthRecord) -> bool:
        since = invalid_refused_since(self._config.numbers, self._clock())
        return (
            since is not None
            and record.status == Health.INVALID
            and (record.last_call_at or 0) > since
        )

    async def by_health(
        self, status: str, cursor: str | None, limit: int
    ) -> tuple[list[NumberHealthRecord], str | None]:
        """One page of numbers with a health status, and the cursor of the next page."""
        if status not in LISTED_HEALTH:
            raise InvalidRequest(f"health must be one of {', '.join(LISTED_HEALTH)}")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be 1-{MAX_PAGE}")
        after = _decode_cursor(cursor) if cursor else ""
        records = await self._store.numbers_by_health(status, after, limit + 1)
        page, more = records[:limit], len(records) > limit
        next_cursor = _encode_cursor(page[-1].phone) if more and page else None
        return page, next_cursor

    async def reset(self, raw: str) -> bool:
        """Forget a number's health (it was reassigned); False if none was known."""
        phone = phones.parse(raw, self._config.numbers.default_region)
        return await self._store.reset_number_health(phone.e164)

    async def reset_failed_checks(self, raw: str, by_key: str) -> int:
        """Forget the wrong codes tried against a number, every API key's, so that its
        checks are no longer refused; return how many were forgotten."""
        phone = phones.parse(raw, self._config.numbers.default_region)
        forgotten = await self._store.reset_check_failures(phone.e164)
        log.info(
            "%d wrong checks against %s forgotten (API key %s)",
            forgotten,
            phones.masked(phone.e164),
            by_key,
        )
        return forgotten

    async def stats(self, since: float, until: float) -> dict[str, Any]:
        """Calls, deliveries and failures over [since, until), overall, by carrier and outcome,
        and by channel with the approvals each channel's calls led to.

        A call with no verdict on delivery (progress_only) is counted apart: `uncertain`,
        neither delivered nor failed."""
        rows = await self._store.call_stats(since, until)
        by_outcome = _no_outcomes()
        carriers: dict[str, dict[str, int]] = {}
        for carrier, outcome, count in rows:
            by_outcome[outcome] = by_outcome.get(outcome, 0) + count
            carriers.setdefault(carrier, _no_outcomes())[outcome] += count
        sources: dict[str, collections.Counter[str]] = {}
        for carrier, source, count in await self._store.source_stats(since, until):
            sources.setdefault(carrier, collections.Counter())[source or "unspecified"] += count
        channels: dict[str, dict[str, int]] = {c.value: _no_outcomes() for c in Channel}
        approved: collections.Counter[str] = collections.Counter()
        for channel, outcome, count, approvals in await self._store.channel_stats(since, until):
            channels[channel][outcome] += count
            approved[channel] += approvals
        return {
            **_totals(by_outcome),
            "approved_by_source": _sources(sum(sources.values(), collections.Counter())),
            "by_outcome": by_outcome,
            "by_carrier": [
                {
                    "carrier": carrier,
                    **_totals(outcomes),
                    "approved_by_source": _sources(sources.get(carrier, collections.Counter())),
                    "by_outcome": {o: n for o, n in outcomes.items() if n},  # e.g. network_answer
                }
                for carrier, outcomes in sorted(
                    carriers.items(), key=lambda kv: -sum(kv[1].values())
                )
            ],
            "by_channel": [
                {
                    "channel": channel,
                    **_totals(outcomes),
                    "approved": approved[channel],
                    "approval_rate": (
                        round(approved[channel] / sum(outcomes.values()), 4)
                        if sum(outcomes.values())
                        else None
                    ),
                    "by_outcome": {o: n for o, n in outcomes.items() if n},
                }
                for channel, outcomes in channels.items()
            ],
        }


def _sources(counted: collections.Counter[str]) -> dict[str, Any]:
    """Approvals by how their codes were obtained, and the share an app read itself."""
    said = counted[CheckSource.INTERCEPTED] + counted[CheckSource.MANUAL]
    return {
        "intercepted": counted[CheckSource.INTERCEPTED],
        "manual": counted[CheckSource.MANUAL],
        "unspecified": counted["unspecified"],
        "intercepted_share": round(counted[CheckSource.INTERCEPTED] / said, 4) if said else None,
    }


def _no_outcomes() -> dict[str, int]:
    return {outcome.value: 0 for outcome in Outcome}


def _totals(by_outcome: dict[str, int]) -> dict[str, Any]:
    calls = sum(by_outcome.values())
    delivered = sum(by_outcome[o] for o in DELIVERED_OUTCOMES)
    uncertain = sum(by_outcome[o] for o in UNCERTAIN_OUTCOMES)
    return {
        "calls": calls,
        "delivered": delivered,
        "uncertain": uncertain,
        "failed": calls - delivered - uncertain,
        "delivery_rate": round(delivered / calls, 4) if calls else None,
    }


def _not_a_string(raw: object) -> dict[str, Any]:
    """The description of a lookup entry that is not even a string (a number, null, ...)."""
    described = phones.describe("", "ZZ", NumbersConfig())
    echoed = isinstance(raw, int | float) and not isinstance(raw, bool)
    return described | {"input": raw if echoed else None}


def _encode_cursor(phone: str) -> str:
    return base64.urlsafe_b64encode(phone.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    try:
        phone = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest("cursor is not one this API returned") from None
    if not phone.startswith("+") or not phone[1:].isdigit():
        raise InvalidRequest("cursor is not one this API returned")
    return phone
