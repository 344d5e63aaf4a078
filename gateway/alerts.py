"""Operator alerts: a pool quarantined, probed or restored for a carrier, and the
conversion watch, which flags destination blocks, carriers and countries whose
verifications are created and rarely approved (traffic pumping) and, in `block` mode,
refuses new verifications to them.

Each change is logged once (by the gateway that made it, in the database transaction
that made it), counted in the metrics, and posted to `alerts.url` when set, signed like
the webhooks (Standard Webhooks, `webhooks.secret`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import aiohttp
from standardwebhooks import Webhook

from gateway.caller_health import PoolChange, PoolState
from gateway.config import Config
from gateway.store import CONVERSION_MINUTE_S, AlertKind, AlertRecord, Store
from gateway.tasks import cancel_and_wait
from gateway.times import timestamp

log = logging.getLogger(__name__)

# The conversion watch looks this often: a target is flagged within this of crossing.
SWEEP_S = 5.0
# Posts to alerts.url: tries per alert, the first retry's delay (doubling), the
# attempt's timeout, and how many may wait (beyond it the oldest are dropped, logged).
POST_ATTEMPTS = 6
POST_RETRY_BASE_S = 2.0
POST_TIMEOUT_S = 10.0
POST_QUEUE = 1000
# GET /v1/alerts answers at most this many; each look reads at most this many open.
MAX_LISTED = 500
MAX_OPEN = 10_000


class AlertMetrics(Protocol):
    """What the alerts report (gateway.metrics.Metrics)."""

    def pool_changed(self, pool: str, state: str) -> None: ...

    def conversion_flagged(self, kind: str) -> None: ...


class _NoMetrics:
    def pool_changed(self, pool: str, state: str) -> None:
        pass

    def conversion_flagged(self, kind: str) -> None:
        pass


class AlertPoster:
    """Posts alerts to the operator's URL, signed; retries a failed post with backoff.
    Held in memory: the log line of each alert is its durable record."""

    def __init__(self, url: str, secret: str, timeout: float = POST_TIMEOUT_S) -> None:
        self._url = url
        self._timeout = timeout
        self._signer = Webhook(secret)
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(POST_QUEUE)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._run(), name="alerts")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def post(self, kind: str, data: dict[str, Any], at: float) -> None:
        """Queue an alert of type `kind` (pool.quarantined, conversion.flagged, ...)."""
        alert_id = f"alt_{secrets.token_hex(12)}"
        body = json.dumps({"id": alert_id, "type": kind, "created_at": timestamp(at), "data": data})
        if self._queue.full():
            dropped, _ = self._queue.get_nowait()
            log.warning("alerts: queue full, dropped alert %s", dropped)
        self._queue.put_nowait((alert_id, body))

    async def _run(self) -> None:
        while True:
            alert_id, body = await self._queue.get()
            for attempt in range(POST_ATTEMPTS):
                if await self._attempt(alert_id, body):
                    break
                if attempt + 1 < POST_ATTEMPTS:
                    await asyncio.sleep(POST_RETRY_BASE_S * 2**attempt)
            else:
                log.error(
                    "alerts: gave up posting alert %s after %d tries", alert_id, POST_ATTEMPTS
                )

    async def _attempt(self, alert_id: str, body: str) -> bool:
        assert self._session is not None
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": alert_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(alert_id, now, body),
        }
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    return True
                log.warning(
                    "alerts: %s answered %s to alert %s", self._url, response.status, alert_id
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("alerts: posting alert %s failed: %s", alert_id, type(exc).__name__)
        return False


class Alerts:
    """Tells the operator of pool state changes, and runs the conversion watch."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: AlertMetrics | None = None,
        clock: Any = time.time,
    ) -> None:
        self._config = config.conversion
        self._store = store
        self._metrics = metrics or _NoMetrics()
        self._clock = clock
        url, secret = config.alerts.url, config.webhooks.secret
        self._poster = (
            AlertPoster(url, secret, config.alerts.timeout_seconds) if url and secret else None
        )
        self._task: asyncio.Task[None] | None = None
        # Open block-mode alerts: (kind, target) -> (alert id, blocked until).
        self._suspended: dict[tuple[AlertKind, str], tuple[str, float]] = {}

    def start(self) -> None:
        if self._poster is not None:
            self._poster.start()
        self._task = asyncio.create_task(self._sweep_loop(), name="conversion-watch")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        if self._poster is not None:
            await self._poster.stop()

    # -- pool health -------------------------------------------------------------

    def pool_changed(self, changes: Sequence[PoolChange]) -> None:
        """Log, count and post pool state changes (each made once, by this gateway)."""
        for change in changes:
            carrier = change.carrier or "unknown"
            if change.new is PoolState.QUARANTINED:
                log.warning(
                    "pool %s quarantined for carrier %s: %d failed calls in a row while "
                    "another pool delivers (was %s)",
                    change.pool,
                    carrier,
                    change.failures,
                    change.old,
                )
            elif change.new is PoolState.PROBING:
                log.info("pool %s: probing carrier %s with one call", change.pool, carrier)
            else:
                log.warning("pool %s restored for carrier %s", change.pool, carrier)
            self._metrics.pool_changed(change.pool, change.new)
            self._post(
                f"pool.{_POOL_EVENTS[change.new]}",
                {
                    "pool": change.pool,
                    "carrier": change.carrier or None,
                    "state": change.new,
                    "previous_state": change.old,
                    "failures_in_a_row": change.failures,
                    "recent_calls": len(change.recent),
                    "recent_delivered": change.recent.count("d"),
                },
                change.at,
            )

    # -- the conversion watch ------------------------------------------------------

    def suspended(self, block: str | None, carrier: str | None, region: str) -> float | None:
        """Seconds until new verifications to this destination are taken again, when a
        block-mode alert holds one of its targets; else None."""
        if not self._suspended:
            return None
        now = self._clock()
        longest = None
        for key in (
            (AlertKind.BLOCK, block),
            (AlertKind.CARRIER, f"{region}:{carrier}" if carrier else None),
            (AlertKind.COUNTRY, region),
        ):
            if key[1] is None:
                continue
            held = self._suspended.get((key[0], key[1]))
            if held is not None and held[1] > now:
                longest = max(longest or 0.0, held[1] - now)
        return longest

    async def lift(self, alert_id: str) -> AlertRecord | None:
        """An admin lifts an open alert: its target is taken again, its counts start afresh."""
        alert = await self._store.clear_alert(alert_id, self._clock(), "admin")
        if alert is not None:
            self._suspended.pop((alert.kind, alert.target), None)
            log.warning(
                "conversion alert %s (%s %s) lifted by an admin", alert.id, alert.kind, alert.target
            )
            self._post("conversion.lifted", _alert_data(alert), alert.cleared_at or self._clock())
        return alert

    async def sweep(self) -> None:
        """One look: flag the targets under min_rate, clear what has ended, and learn the
        open block-mode alerts (other gateways' too)."""
        config, now = self._config, self._clock()
        # The minutes whose verifications are all older than grace_seconds: those that
        # end by then (with no grace, the current minute too).
        until = now - config.grace_seconds
        if config.grace_seconds:
            until -= CONVERSION_MINUTE_S
        counts = await self._store.conversion_counts(
            now - config.window_seconds, until, config.min_verifications
        )
        low = {
            (kind, target): (created, approved)
            for kind, target, created, approved in counts
            if approved < config.min_rate * created
        }
        # The alerts open after this look: those that stay, and those it raises. One
        # raised meanwhile by another gateway is learnt at the next look.
        still_open: dict[tuple[AlertKind, str], AlertRecord] = {}
        for alert in await self._store.alerts(True, MAX_OPEN):
            key = (alert.kind, alert.target)
            expired = alert.blocked_until is not None and alert.blocked_until <= now
            recovered = alert.blocked_until is None and key not in low
            if not (expired or recovered):
                still_open[key] = alert
                continue
            if expired:
                # Its counts are forgotten as it clears (here or on another gateway): the
                # figures read before no longer stand.
                low.pop(key, None)
            by = "expired" if expired else "recovered"
            cleared = await self._store.clear_alert(alert.id, now, by)
            if cleared is not None:
                log.info(
                    "conversion alert %s (%s %s) cleared: %s",
                    alert.id,
                    alert.kind,
                    alert.target,
                    by,
                )
                self._post("conversion.cleared", _alert_data(cleared), now)
        for (kind, target), (created, approved) in low.items():
            if (kind, target) in still_open:
                continue
            block = config.mode == "block"
            alert = AlertRecord(
                id=f"alr_{secrets.token_hex(12)}",
                kind=kind,
                target=target,
                created=created,
                approved=approved,
                mode=config.mode,
                raised_at=now,
                blocked_until=now + config.block_seconds if block else None,
            )
            if await self._store.raise_alert(alert):
                still_open[(kind, target)] = alert
                log.warning(
                    "conversion alert %s: %s %s converts %d of %d verifications (%.0f%%, "
                    "under %.0f%%)%s",
                    alert.id,
                    kind,
                    target,
                    approved,
                    created,
                    100 * alert.rate,
                    100 * config.min_rate,
                    f"; new verifications refused for {config.block_seconds} s" if block else "",
                )
                self._metrics.conversion_flagged(kind)
                self._post("conversion.flagged", _alert_data(alert), now)
        self._suspended = {
            key: (a.id, a.blocked_until)
            for key, a in still_open.items()
            if a.blocked_until is not None and a.blocked_until > now
        }
        await self._store.forget_conversion(now - config.window_seconds)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("conversion watch: the look failed; trying again")
            await asyncio.sleep(SWEEP_S)

    def _post(self, kind: str, data: dict[str, Any], at: float) -> None:
        if self._poster is not None:
            self._poster.post(kind, data, at)


_POOL_EVENTS = {
    PoolState.QUARANTINED: "quarantined",
    PoolState.PROBING: "probing",
    PoolState.ACTIVE: "restored",
}


def _alert_data(alert: AlertRecord) -> dict[str, Any]:
    return {
        "id": alert.id,
        "kind": alert.kind,
        "target": alert.target,
        "created": alert.created,
        "approved": alert.approved,
        "rate": round(alert.rate, 4),
        "mode": alert.mode,
        "raised_at": timestamp(alert.raised_at),
        "blocked_until": timestamp(alert.blocked_until) if alert.blocked_until else None,
        "cleared_at": timestamp(alert.cleared_at) if alert.cleared_at else None,
        "cleared_by": alert.cleared_by,
    }
