"""The domain: create, read, check, cancel and expire verifications."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gateway import phones
from gateway.config import Config, WebhooksConfig
from gateway.dialer import CallJob, Dialer
from gateway.errors import (
    GatewayError,
    IdempotencyConflict,
    InvalidCallbackUrl,
    InvalidRequest,
    NotFound,
    NumberKnownInvalid,
    Overloaded,
    PbxUnavailable,
    RateLimited,
    RegionNotAllowed,
    VerificationNotPending,
)
from gateway.logs import call_ids
from gateway.numbers import DAY, invalid_refused_since
from gateway.outcomes import Outcome
from gateway.pbx import new_channel_id
from gateway.pool import Cli, Pool, pool_for
from gateway.store import (
    CallRecord,
    CallStatus,
    CheckLimit,
    Idempotency,
    Inserted,
    KnownInvalid,
    Limited,
    Replayed,
    Store,
    VerificationRecord,
    VerificationStatus,
    WindowLimit,
)
from gateway.tasks import cancel_and_wait
from gateway.times import timestamp

log = logging.getLogger(__name__)

# 128 random bits make an id that cannot be guessed or enumerated.
ID_BYTES = 16
MAX_REFERENCE_LENGTH = 128
MAX_CALLBACK_URL_LENGTH = 2048
# The expiry sweep sleeps at most this long, so a verification created with a TTL
# shorter than the current wait is still expired on time.
MAX_EXPIRY_SLEEP_S = 1.0
_CODE = re.compile(r"[0-9]{1,16}")

Clock = Callable[[], float]
T = TypeVar("T")
Render = Callable[[VerificationRecord, CallRecord], str]
# An Idempotency-Key answers its retries this long (DESIGN: 24 h).
IDEMPOTENCY_TTL_S = 86400.0
IDEMPOTENCY_SWEEP_S = 3600.0  # how often Idempotency-Keys past their 24 h are dropped
# Retry-After of a create refused while the PBX is unreachable: about one reconnect try.
PBX_RETRY_AFTER_S = 5
# How long stop() waits for creates whose requests gave up (a store write, a hangup).
STOP_WAIT_S = 5.0
# The windows of the wrong-check limits (limits.failed_checks_per_phone_per_*).
CHECK_DAY_S = 86400.0
CHECK_30_DAYS_S = 30 * CHECK_DAY_S


@dataclass(frozen=True, slots=True)
class Replay:
    """The response first given to an Idempotency-Key, to give again."""

    status: int
    response: str


def request_hash(request: NewVerification) -> str:
    """What makes two create requests the same request, hashed."""
    fields = {k: v for k, v in asdict(request).items() if k != "api_key_id"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _check_callback_host(url: str, webhooks: WebhooksConfig) -> None:
    """Refuse a callback_url whose host is an address webhooks may not reach.

    Only a literal address can be judged here; a name is judged at each delivery, on
    the addresses it resolves to then (gateway/webhooks.py)."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return  # a name
    if not webhooks.reaches(address):
        raise InvalidCallbackUrl(
            f"callback_url points at {host}, an address webhooks may not reach: it is not "
            "globally routable (the operator may allow it with webhooks.allowed_networks)",
            field="callback_url",
        )


def _replay(stored: Replayed, body_hash: str) -> Replay:
    if stored.body_hash != body_hash:
        raise IdempotencyConflict("this Idempotency-Key was used with another request")
    return Replay(stored.status, stored.response)


@dataclass(frozen=True, slots=True)
class NewVerification:
    """A validated create request."""

    api_key_id: str
    phone: str
    region: str | None = None
    reference: str | None = None
    callback_url: str | None = None
    ring_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    verification: VerificationRecord
    valid: bool


@dataclass(frozen=True, slots=True)
class _Presented:
    """What a check presents, its form validated: the code, or the E.164 readings of
    the caller ID the user saw (which pool's code it holds depends on the verification)."""

    code: str | None
    cli_readings: tuple[str, ...]


class Verifications:
    """Verification lifecycle on top of the store, the pools and the dialer."""

    def __init__(
        self,
        config: Config,
        store: Store,
        pools: list[Pool],
        dialer: Dialer,
        clock: Clock = time.time,
    ) -> None:
        self._config = config
        self._store = store
        self._pools = pools
        self._pools_by_name = {p.name: p for p in pools}
        self._dialer = dialer
        self._clock = clock
        self._secret = config.security.code_secret.encode()
        limits, day, month = config.limits, CHECK_DAY_S, CHECK_30_DAYS_S
        self._check_limits = (  # the metric label names the one that refused
            CheckLimit(
                limits.failed_checks_per_phone_per_day, day, per_key=True, name="failed_checks"
            ),
            CheckLimit(
                limits.failed_checks_per_phone_per_day_all_keys,
                day,
                per_key=False,
                name="failed_checks_all_keys",
            ),
            CheckLimit(
                limits.failed_checks_per_phone_per_30_days,
                month,
                per_key=True,
                name="failed_checks_30_days",
            ),
            CheckLimit(
                limits.failed_checks_per_phone_per_30_days_all_keys,
                month,
                per_key=False,
                name="failed_checks_30_days_all_keys",
            ),
        )
        self._expiry_task: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[Any]] = set()  # see _to_the_end

    # -- create ----------------------------------------------------------------

    async def _to_the_end(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work`; if the caller is canceled, `work` still runs to its end (what it
        returns or raises then goes to nobody: the client was told the request failed)."""
        task = asyncio.create_task(work, name="verification-create")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_unexpected)
            raise

    def parse_phone(self, raw: str, region: str | None = None) -> phones.Phone:
        """Normalise and check a destination against the number policy."""
        phone = phones.parse(raw, region or self._config.numbers.default_region)
        phones.check_allowed(phone, self._config.numbers)
        return phone

    async def create(
        self,
        request: NewVerification,
        idempotency_key: str | None = None,
        render: Render | None = None,
    ) -> tuple[VerificationRecord, CallRecord] | Replay:
        """Validate, store and queue a verification call.

        With an `idempotency_key`, a retry of the same request within 24 h returns the
        first response (`render` made it) and places no call; another request under the
        same key raises IdempotencyConflict.
        """
        now = self._clock()
        body_hash = request_hash(request) if idempotency_key is not None else ""
        if idempotency_key is not None:
            stored = await self._store.idempotent_response(
                request.api_key_id, idempotency_key, now - IDEMPOTENCY_TTL_S
            )
            if stored is not None:
                return _replay(stored, body_hash)
        calls = self._config.calls
        if self._dialer.queued >= calls.max_queue:
            raise Overloaded(
                "too many calls are waiting; retry later",
                retry_after=max(1, round(self._dialer.queued / self._dialer.nodes.max_per_second)),
            )
        if request.callback_url is not None and self._config.webhooks.secret is None:
            raise InvalidRequest(
                "callback_url needs webhooks configured on the gateway (webhooks.secret)",
                field="callback_url",
            )
        if request.callback_url is not None:
            _check_callback_host(request.callback_url, self._config.webhooks)
        phone = self.parse_phone(request.phone, request.region)
        sandbox_code = self._config.test_numbers.get(phone.e164)
        pool = pool_for(self._pools, phone.region)
        if pool is None:
            raise RegionNotAllowed(
                f"no caller-ID pool serves region {phone.region}", region=phone.region
            )
        ring_seconds = request.ring_seconds or calls.ring_seconds
        if not 1 <= ring_seconds <= calls.max_ring_seconds:
            raise InvalidRequest(f"ring_seconds must be 1-{calls.max_ring_seconds}")
        down_for = self._dialer.pbx_down_for
        if sandbox_code is None and down_for > 0 and down_for >= calls.pbx_wait_seconds:
            # A short loss is absorbed (the call waits for AMI, within pbx_wait_seconds);
            # past that, say so now: the client can fall back before a user waits.
            raise PbxUnavailable(
                f"the PBX has been unreachable for {down_for:.0f}s; retry later",
                retry_after=PBX_RETRY_AFTER_S,
            )

        verification_id = "vrf_" + secrets.token_hex(ID_BYTES)
        call_id = new_channel_id()
        cli: Cli | None
        if sandbox_code is None:
            cli = pool.draw()
            code = cli.code
        else:
            cli, code = None, sandbox_code
        verification = VerificationRecord(
            id=verification_id,
            api_key_id=request.api_key_id,
            phone=phone.e164,
            region=phone.region,
            reference=request.reference,
            callback_url=request.callback_url,
            status=VerificationStatus.PENDING,
            code_hash=self._code_hash(verification_id, code),
            pool=pool.name,
            cli_prefix=pool.shape.prefix,
            cli_length=pool.shape.length,
            cli_pattern=pool.shape.pattern,
            attempts_remaining=self._config.verification.max_attempts,
            created_at=now,
            expires_at=now + self._config.verification.ttl_seconds,
            updated_at=now,
            carrier=phone.carrier,
            phone_prefix=phone.e164[: -self._config.limits.prefix_hidden_digits],
            sandbox=cli is None,
        )
        dial_number = phones.format_for_trunk(phone.e164, self._config.asterisk.dial_format)
        call = CallRecord(
            id=call_id,
            verification_id=verification_id,
            status=CallStatus.QUEUED,
            dial_number=dial_number,
            ring_seconds=ring_seconds,
            queued_at=now,
            owner=self._dialer.owner,
        )
        if cli is None:  # sandbox: shown as delivered at once, never dialed
            call = replace(
                call,
                status=CallStatus.COMPLETED,
                outcome=Outcome.DELIVERED,
                reason="sandbox",
                ended_at=now,
            )
        # Nothing waiting and room to dial now: stored as dialing, placed once stored.
        node = self._dialer.claim() if cli is not None else None
        if node is not None:
            call = replace(call, status=CallStatus.DIALING, dialed_at=now, node=node)
        idempotency = None
        if idempotency_key is not None:
            assert render is not None, "an idempotent create needs its response rendered"
            idempotency = Idempotency(
                request.api_key_id,
                idempotency_key,
                body_hash,
                201,
                render(verification, call),
                now - IDEMPOTENCY_TTL_S,
            )
        # Limits protect phones and the bill; a sandbox verification calls nobody.
        limits = self._limits(request.api_key_id, verification) if cli is not None else ()
        refuse_days = self._config.numbers.refuse_invalid_days
        invalid_since = (
            invalid_refused_since(self._config.numbers, now) if cli is not None else None
        )

        def not_stored() -> None:
            """Give back what the create took: its caller ID, its place in the dialer."""
            if cli is not None:
                pool.release(cli.e164)
            if node is not None:
                self._dialer.unclaim(node)

        async def store_and_place() -> tuple[VerificationRecord, CallRecord] | Replay:
            try:
                result = await self._store.create_verification(
                    verification, call, limits, idempotency, invalid_since=invalid_since
                )
            except BaseException:
                not_stored()
                raise
            if not isinstance(result, Inserted):
                not_stored()
                if isinstance(result, Replayed):  # a concurrent retry of the same key won
                    return _replay(result, body_hash)
                if isinstance(result, KnownInvalid):
                    raise NumberKnownInvalid(
                        "the network reported this number as invalid; it is refused until "
                        f"{timestamp(result.last_call_at + refuse_days * DAY)} or until its health "
                        "is reset",
                        last_outcome=result.last_outcome,
                        last_cause=result.last_cause,
                    )
                log.info("verification refused: rate limited (phone %s)", phones.masked(phone.e164))
                raise RateLimited(result.retry_after, result.limit)
            for old_id, live_call_id in result.superseded:
                log.debug(
                    "verification %s canceled: superseded by %s",
                    old_id,
                    verification_id,
                    extra=call_ids(old_id, live_call_id),
                )
                if live_call_id is not None:
                    await self._dialer.cancel(live_call_id)
            if cli is None:
                return verification, call
            job = CallJob(
                call_id=call_id,
                verification_id=verification_id,
                dial_number=dial_number,
                cli=cli.e164,
                cli_dial=phones.format_for_trunk(cli.e164, pool.cli_format),
                pool=pool.name,
                ring_seconds=ring_seconds,
                queued_at=now,
                early_media_is_alerting=self.early_media_is_alerting(verification),
            )
            if node is not None:
                self._dialer.place_claimed(job, now, node)
            else:
                self._dialer.submit(job)
            return verification, call

        # The request's own cancellation (its timeout) must not cut this in two: a
        # verification stored but its call never handed to the dialer.
        return await self._to_the_end(store_and_place())

    def early_media_is_alerting(self, verification: VerificationRecord) -> bool:
        """Whether a lone 183 counts as alerting for this destination."""
        policy = self._config.numbers.early_media_is_alerting
        return policy.applies(verification.region, verification.carrier)

    async def resume(self, verification: VerificationRecord, call: CallRecord) -> bool:
        """Queue again a call that was still queued when the gateway stopped.

        It was never dialed, so nobody saw its code: it gets a fresh caller ID and code.
        False when the verification can no longer be called (expired, unknown pool).
        """
        pool = self._pools_by_name.get(verification.pool)
        now = self._clock()
        if (
            pool is None
            or verification.status is not VerificationStatus.PENDING
            or verification.expires_at <= now
        ):
            return False
        cli = pool.draw()
        if not await self._store.replace_code(
            verification.id, self._code_hash(verification.id, cli.code), now
        ):
            pool.release(cli.e164)
            return False
        self._dialer.submit(
            CallJob(
                call_id=call.id,
                verification_id=verification.id,
                dial_number=call.dial_number,
                cli=cli.e164,
                cli_dial=phones.format_for_trunk(cli.e164, pool.cli_format),
                pool=pool.name,
                ring_seconds=call.ring_seconds,
                queued_at=now,
                early_media_is_alerting=self.early_media_is_alerting(verification),
            )
        )
        return True

    def _limits(self, api_key_id: str, v: VerificationRecord) -> tuple[WindowLimit, ...]:
        """Every window limit a new verification must fit under (DESIGN: abuse limits)."""
        limits = self._config.limits
        return (
            *(WindowLimit("phone", v.phone, w.count, w.seconds) for w in limits.per_phone),
            *(
                WindowLimit("phone_prefix", v.phone_prefix, w.count, w.seconds)
                for w in limits.per_prefix
            ),
            WindowLimit("api_key_id", api_key_id, limits.key_daily_calls, 86400),
            *(WindowLimit(None, None, w.count, w.seconds) for w in limits.global_calls),
        )

    # -- read, check, cancel ---------------------------------------------------

    async def get(
        self, api_key_id: str, verification_id: str
    ) -> tuple[VerificationRecord, CallRecord]:
        """A verification owned by `api_key_id`, else NotFound."""
        found = await self._store.verification(verification_id)
        if found is None or found[0].api_key_id != api_key_id:
            raise NotFound(f"no verification {verification_id}")
        return await self._expire_if_due(found)

    async def check(
        self, api_key_id: str, verification_id: str, code: str | None, cli: str | None
    ) -> CheckResult:
        """Check a code (trailing digits) or a full caller ID against a verification."""
        presented = self._presented(code, cli)
        verification, _ = await self.get(api_key_id, verification_id)
        return await self._check(verification, presented)

    async def check_by_phone(
        self, api_key_id: str, phone: str, region: str | None, code: str | None, cli: str | None
    ) -> CheckResult:
        """Check against the newest pending verification of `phone` made with this key.

        The body is validated first: whether something is pending is told only to a
        well-formed check."""
        presented = self._presented(code, cli)
        e164 = phones.parse(phone, region or self._config.numbers.default_region).e164
        found = await self._store.newest_pending(e164, api_key_id)
        if found is None:
            raise NotFound("no pending verification for this phone")
        verification, _ = await self._expire_if_due(found)
        return await self._check(verification, presented)

    async def cancel(
        self, api_key_id: str, verification_id: str
    ) -> tuple[VerificationRecord, CallRecord]:
        """Cancel a pending verification and hang up its call if it still rings."""
        verification, call = await self.get(api_key_id, verification_id)
        if not await self._store.set_status(
            verification.id, VerificationStatus.CANCELED, self._clock()
        ):
            current, _ = await self.get(api_key_id, verification_id)
            raise VerificationNotPending(
                f"verification is {current.status}", verification_status=current.status
            )
        if call.ended_at is None:
            await self._dialer.cancel(call.id, call.node)
        return await self.get(api_key_id, verification_id)

    async def _check(self, verification: VerificationRecord, presented: _Presented) -> CheckResult:
        if verification.status is not VerificationStatus.PENDING:
            raise VerificationNotPending(
                f"verification is {verification.status}", verification_status=verification.status
            )
        candidate = self._candidate_code(verification, presented)
        valid = candidate is not None and hmac.compare_digest(
            self._code_hash(verification.id, candidate), verification.code_hash
        )
        # The wrong-check limits are read in the transaction that spends the attempt:
        # concurrent wrong checks cannot all slip under them. Once one is full, every
        # check of the phone is refused, a right code too, so that asking for a new
        # call does not reset the count.
        updated = await self._store.spend_attempt(
            verification.id, valid, self._clock(), self._check_limits
        )
        if isinstance(updated, Limited):
            log.warning(
                "checks for %s refused: %s limit reached",
                phones.masked(verification.phone),
                updated.limit,
            )
            raise RateLimited(updated.retry_after, updated.limit)
        if updated is None:  # changed under us: expired, canceled or checked concurrently
            found = await self._store.verification(verification.id)
            assert found is not None
            current, _ = await self._expire_if_due(found)
            raise VerificationNotPending(
                f"verification is {current.status}", verification_status=current.status
            )
        return CheckResult(updated, valid)

    def _presented(self, code: str | None, cli: str | None) -> _Presented:
        """The check's body, validated before anything is looked up (InvalidRequest)."""
        if (code is None) == (cli is None):
            raise InvalidRequest("give exactly one of code or cli")
        if code is not None:
            if not _CODE.fullmatch(code):
                raise InvalidRequest("code must be 1-16 digits", field="code")
            return _Presented(code, ())
        assert cli is not None
        readings = phones.cli_candidates(cli, self._config.numbers.default_region)
        if not readings:
            raise InvalidRequest(
                "cli must be a phone number: digits, an optional +, spaces or dashes",
                field="cli",
            )
        return _Presented(None, tuple(readings))

    def _candidate_code(
        self, verification: VerificationRecord, presented: _Presented
    ) -> str | None:
        """The code a check presents, or None when it cannot be right."""
        if presented.code is not None:
            return presented.code
        pool = self._pools_by_name.get(verification.pool)
        if pool is None:
            return None
        for e164 in presented.cli_readings:
            code = pool.code_of(e164)
            if code is not None:
                return code
        return None

    def _code_hash(self, verification_id: str, code: str) -> str:
        # Keyed by a server secret and salted by the id: a copy of the database alone
        # cannot be brute-forced back to codes.
        message = f"{verification_id}:{code}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    # -- expiry ----------------------------------------------------------------

    async def _expire_if_due(
        self, found: tuple[VerificationRecord, CallRecord]
    ) -> tuple[VerificationRecord, CallRecord]:
        verification, _ = found
        if (
            verification.status is VerificationStatus.PENDING
            and verification.expires_at <= self._clock()
        ):
            await self._store.expire_due(self._clock())
            refreshed = await self._store.verification(verification.id)
            assert refreshed is not None
            return refreshed
        return found

    def start(self) -> None:
        """Start expiring verifications as their TTL passes."""
        self._expiry_task = asyncio.create_task(self._expiry_loop(), name="expiry")

    async def stop(self) -> None:
        await cancel_and_wait(self._expiry_task)
        self._expiry_task = None
        # Creates whose requests gave up: stored and handed over before the dialer stops.
        if self._finishing:
            _, late = await asyncio.wait(list(self._finishing), timeout=STOP_WAIT_S)
            if late:
                log.warning("shutdown: %d creates still being stored; left", len(late))

    async def _expiry_loop(self) -> None:
        forgotten_at = 0.0
        while True:
            try:
                for verification_id in await self._store.expire_due(self._clock()):
                    log.info(
                        "verification %s expired",
                        verification_id,
                        extra=call_ids(verification_id),
                    )
                if self._clock() - forgotten_at > IDEMPOTENCY_SWEEP_S:
                    forgotten_at = self._clock()
                    await self._store.forget_idempotency_keys(forgotten_at - IDEMPOTENCY_TTL_S)
                due = await self._store.next_expiry()
            except Exception:
                log.exception("expiry sweep failed")
                due = None
            wait = MAX_EXPIRY_SLEEP_S if due is None else due - self._clock()
            await asyncio.sleep(min(max(wait, 0.05), MAX_EXPIRY_SLEEP_S))


def _log_unexpected(task: asyncio.Task[Any]) -> None:
    """A create finished for a request that had given up: a refusal (a limit, a bad
    number) is nobody's news; anything else is a bug worth a line."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, GatewayError):
        log.error("a create whose request timed out failed", exc_info=exc)
