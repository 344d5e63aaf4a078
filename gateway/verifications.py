"""The domain: create, read, check, cancel and expire verifications."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

from gateway import phones
from gateway.alerts import Alerts
from gateway.caller_health import PoolChange, PoolState, RouteReport
from gateway.config import Config, WebhooksConfig
from gateway.dialer import CallJob, Dialer
from gateway.errors import (
    ChannelUnavailable,
    DestinationSuspended,
    GatewayError,
    IdempotencyConflict,
    InvalidCallbackUrl,
    InvalidRequest,
    NoNextChannel,
    NotFound,
    NumberKnownInvalid,
    Overloaded,
    PbxUnavailable,
    RateLimited,
    RegionNotAllowed,
    UnknownChannel,
    UnknownLocale,
    VerificationNotPending,
)
from gateway.logs import call_ids
from gateway.numbers import DAY, invalid_refused_since
from gateway.outcomes import DELIVERED_OUTCOMES, UNCERTAIN_OUTCOMES, Outcome
from gateway.pbx import Speech, new_channel_id
from gateway.pool import Cli, Pool, choose, pools_for
from gateway.seal import Sealer, Unreadable
from gateway.store import (
    CallRecord,
    CallStatus,
    Channel,
    CheckLimit,
    CheckSource,
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
from gateway.tasks import cancel_and_wait, event_loop
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
# An Idempotency-Key answers its retries this long (docs/api/concepts.md#idempotency).
IDEMPOTENCY_TTL_S = 86400.0
IDEMPOTENCY_SWEEP_S = 3600.0  # how often Idempotency-Keys past their 24 h are dropped
# Retry-After of a create refused while the PBX is unreachable: about one reconnect try.
PBX_RETRY_AFTER_S = 5
# How long stop() waits for creates whose requests gave up (a store write, a hangup).
STOP_WAIT_S = 5.0
# The windows of the wrong-check limits (limits.failed_checks_per_phone_per_*).
CHECK_DAY_S = 86400.0
CHECK_30_DAYS_S = 30 * CHECK_DAY_S
# A verification tries at most this many channels (repeats allowed: voice, voice).
MAX_CHANNELS = 3
# Asterisk's own cap on an answered voice call (the dialplan's TIMEOUT(absolute)) is
# this much later than the gateway's hangup at voice.max_seconds: the gateway goes first.
VOICE_PBX_MARGIN_S = 2
# Steps whose time has come are started this many at a time, at least this often
# (and at once when a call ends).
STEPS_BATCH = 50
STEPS_POLL_S = 1.0


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


def _replay(stored: Replayed, body_hash: str) -> Replayed:
    """A retry under an Idempotency-Key: what was stored with it, to answer again."""
    if stored.body_hash != body_hash:
        raise IdempotencyConflict("this Idempotency-Key was used with another request")
    return stored


@dataclass(frozen=True, slots=True)
class NewVerification:
    """A validated create request."""

    api_key_id: str
    phone: str
    region: str | None = None
    reference: str | None = None
    callback_url: str | None = None
    ring_seconds: int | None = None
    channels: tuple[str, ...] | None = None  # None: flashcall only
    locale: str | None = None  # None: voice.default_locale
    # None with fallback_after_given: never; not given: voice.fallback_after_seconds.
    fallback_after_seconds: int | None = None
    fallback_after_given: bool = False


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A create request the policy and the load admit: its phone, parsed, the pools that
    serve it, the channels it will try (a landline skips the flash calls), its ring
    time, and its fixed code if it is a test number."""

    phone: phones.Phone
    carrier: str | None  # phone.carrier, worked out once
    pools: list[Pool]  # those that serve its region, in config order
    channels: tuple[Channel, ...]
    locale: str | None
    fallback_after: float | None
    ring_seconds: int
    sandbox_code: str | None


@dataclass(frozen=True, slots=True)
class _Draft:
    """A verification and its call, built and not yet stored, with the caller ID drawn
    for it (None: a sandbox verification, never dialed)."""

    verification: VerificationRecord
    call: CallRecord
    pool: Pool
    cli: Cli | None
    code: str  # said by a voice call; kept in memory only

    def release_cli(self) -> None:
        """Give the caller ID back to its pool: the draft was not stored."""
        if self.cli is not None:
            self.pool.release(self.cli.e164)


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
        # Pool changes and the conversion watch's suspensions (gateway.alerts).
        self.alerts: Alerts | None = None
        self._secret = config.security.code_secret.encode()
        self._sealer = Sealer(self._secret)
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
        self._steps_task: asyncio.Task[None] | None = None
        self._steps_due = asyncio.Event()  # a call ended: a next step may be due now
        self._finishing: set[asyncio.Task[Any]] = set()  # see _to_the_end

    # -- create ----------------------------------------------------------------

    _loop = event_loop  # the loop it runs on, asked for once

    async def _to_the_end(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work`; if the caller is canceled, `work` still runs to its end (what it
        returns or raises then goes to nobody: the client was told the request failed)."""
        task = self._loop.create_task(work, name="verification-create")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_log_unexpected)
            raise

    def parse_phone(self, raw: str, region: str | None = None, voice: bool = False) -> phones.Phone:
        """Normalise and check a destination against the number policy; with `voice`,
        as a voice call may call it."""
        phone = phones.parse(raw, region or self._config.numbers.default_region)
        phones.check_allowed(phone, self._config.numbers, voice=voice)
        return phone

    async def create(
        self, request: NewVerification, idempotency_key: str | None = None
    ) -> tuple[VerificationRecord, CallRecord] | Replayed:
        """Admit, build, commit and dispatch a verification and its call.

        With an `idempotency_key`, a retry of the same request within 24 h returns the
        verification as it was created and places no call; another request under the
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
        admitted = self._admit(request)
        pool, probe = await self._choose_pool(admitted, now)
        try:
            draft = self._build(request, admitted, pool, now)
            idempotency = None
            if idempotency_key is not None:
                idempotency = Idempotency(
                    request.api_key_id, idempotency_key, body_hash, now - IDEMPOTENCY_TTL_S
                )
            # The request's own cancellation (its timeout) must not cut this in two: a
            # verification stored but its call never handed to the dialer.
            created = await self._to_the_end(
                self._commit_and_dispatch(draft, idempotency, body_hash)
            )
        except asyncio.CancelledError:
            raise  # the create goes on without the request: its probe may be placed
        except BaseException:
            if probe is not None:
                await self._store.release_probe(probe.pool, probe.carrier, probe.at)
            raise
        if probe is not None:
            if isinstance(created, Replayed):  # a concurrent retry stored its own
                await self._store.release_probe(probe.pool, probe.carrier, probe.at)
            elif self.alerts is not None:
                self.alerts.pool_changed([probe])
        return created

    def _admit(self, request: NewVerification) -> _Admitted:
        """What the request asks, checked against the gateway's policy and its load."""
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
        channels = self._channels(request.channels)
        locale = self._locale(request.locale) if Channel.VOICE in channels else None
        phone = self.parse_phone(request.phone, request.region, voice=Channel.VOICE in channels)
        if phone.type not in self._config.numbers.allowed_types:
            # A landline, allowed for its voice calls: its flash calls are skipped.
            channels = tuple(c for c in channels if c is Channel.VOICE)
        fallback_after = (
            request.fallback_after_seconds
            if request.fallback_after_given
            else self._config.voice.fallback_after_seconds
        )
        sandbox_code = self._config.test_numbers.get(phone.e164)
        carrier = phone.carrier
        pools = pools_for(self._pools, phone.region)
        if not pools:
            raise RegionNotAllowed(
                f"no caller-ID pool serves region {phone.region}", region=phone.region
            )
        if sandbox_code is None and self.alerts is not None:
            held_for = self.alerts.suspended(self._block(phone.e164), carrier, phone.region)
            if held_for is not None:
                raise DestinationSuspended(
                    "new verifications to this destination are suspended: too few of its "
                    "recent ones were completed",
                    retry_after=max(1, math.ceil(held_for)),
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
        return _Admitted(
            phone,
            carrier,
            pools,
            channels,
            locale,
            None if fallback_after is None else float(fallback_after),
            ring_seconds,
            sandbox_code,
        )

    def _block(self, e164: str) -> str:
        """The destination block of a number: without its last prefix_hidden_digits."""
        return e164[: -self._config.limits.prefix_hidden_digits]

    async def _choose_pool(self, admitted: _Admitted, now: float) -> tuple[Pool, PoolChange | None]:
        """The pool of a new verification: by weight among those healthy for the
        destination's carrier; a quarantined one whose probe is due takes a flash call
        as its probe (the claim, given back if the create is refused). A sandbox
        verification (never dialed) takes the first."""
        candidates = admitted.pools
        if len(candidates) == 1 or admitted.sandbox_code is not None:
            return candidates[0], None
        carrier = admitted.carrier or ""
        states = {r.pool: r for r in await self._store.pool_states(carrier)}
        probe_seconds = self._config.caller_health.probe_seconds
        for pool in candidates if admitted.channels[0] is Channel.FLASHCALL else ():
            row = states.get(pool.name)
            if (
                row is not None
                and row.state is not PoolState.ACTIVE
                and row.probe_at is not None
                and row.probe_at <= now
            ):
                change = await self._store.claim_probe(pool.name, carrier, now, now + probe_seconds)
                if change is not None:
                    return pool, change
        healthy = [
            p
            for p in candidates
            if p.name not in states or states[p.name].state is PoolState.ACTIVE
        ]
        return choose(healthy or candidates), None

    def _channels(self, asked: tuple[str, ...] | None) -> tuple[Channel, ...]:
        """The channels a request asks for, known and available here."""
        if asked is None:
            return (Channel.FLASHCALL,)
        if not 1 <= len(asked) <= MAX_CHANNELS:
            raise InvalidRequest(f"channels must list 1-{MAX_CHANNELS} channels", field="channels")
        known = {c.value: c for c in Channel}
        for name in asked:
            if name not in known:
                raise UnknownChannel(
                    f"unknown channel {name!r}: the channels are {', '.join(known)}",
                    field="channels",
                )
        channels = tuple(known[name] for name in asked)
        if Channel.VOICE in channels and self._config.voice.caller_id is None:
            raise ChannelUnavailable(
                "voice calls are not set up on this gateway (voice.caller_id)", field="channels"
            )
        return channels

    def _locale(self, asked: str | None) -> str:
        voice = self._config.voice
        if asked is None:
            return voice.default_locale
        if asked not in voice.locales:
            raise UnknownLocale(
                f"unknown locale: the voice call speaks {', '.join(voice.locales)}",
                field="locale",
            )
        return asked

    def _build(
        self, request: NewVerification, admitted: _Admitted, pool: Pool, now: float
    ) -> _Draft:
        """The records to store: a code (a caller ID drawn from `pool`, or the test
        number's fixed code), the verification and its call, queued."""
        phone, channels = admitted.phone, admitted.channels
        verification_id = "vrf_" + secrets.token_hex(ID_BYTES)
        first = channels[0]
        if admitted.sandbox_code is not None:
            cli, code = None, admitted.sandbox_code
        else:
            cli, code = _new_code(pool, first)
        # A later step says (voice) or shows (flash call) the same code: kept sealed.
        sealed = self._sealer.seal(code) if len(channels) > 1 or Channel.VOICE in channels else None
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
            carrier=admitted.carrier,
            phone_prefix=self._block(phone.e164),
            sandbox=admitted.sandbox_code is not None,
            channels=",".join(channels),
            locale=admitted.locale,
            fallback_after=admitted.fallback_after,
            code_sealed=sealed,
            # The flash call: post-dial delay, then its ring time.
            watch_seconds=(
                self._dialer.cap_seconds(admitted.ring_seconds)
                if Channel.FLASHCALL in channels
                else None
            ),
        )
        call = self._new_call(
            verification,
            first,
            0,
            phones.format_for_trunk(phone.e164, self._config.asterisk.dial_format),
            admitted.ring_seconds,
            now,
        )
        return _Draft(verification, call, pool, cli, code)

    def _new_call(
        self,
        verification: VerificationRecord,
        channel: Channel,
        step: int,
        dial_number: str,
        ring_seconds: float,
        now: float,
    ) -> CallRecord:
        """The call of a verification's step, queued; a sandbox verification's is
        shown delivered (a voice call: spoken) at once, never dialed."""
        call = CallRecord(
            id=new_channel_id(),
            verification_id=verification.id,
            status=CallStatus.QUEUED,
            dial_number=dial_number,
            ring_seconds=(
                self._config.voice.ring_seconds if channel is Channel.VOICE else ring_seconds
            ),
            queued_at=now,
            owner=self._dialer.owner,
            channel=channel,
            step=step,
        )
        if verification.sandbox:
            call = replace(
                call,
                status=CallStatus.COMPLETED,
                outcome=Outcome.SPOKEN if channel is Channel.VOICE else Outcome.DELIVERED,
                reason="sandbox",
                ended_at=now,
            )
        return call

    async def _commit_and_dispatch(
        self, draft: _Draft, idempotency: Idempotency | None, body_hash: str
    ) -> tuple[VerificationRecord, CallRecord] | Replayed:
        """Store the draft within the limits, then hand its call to the dialer; what it
        took (its caller ID, its place in the dialer) is given back if it is not stored."""
        verification, call = draft.verification, draft.call
        now = verification.created_at
        dialed = not verification.sandbox
        # A sandbox verification is never dialed: it holds no place.
        reservation = self._dialer.reserve(now) if dialed else None
        with reservation or contextlib.nullcontext():
            node = reservation.node if reservation is not None else None
            if node is not None:  # room now: stored dialing, placed once stored
                call = replace(call, status=CallStatus.DIALING, dialed_at=now, node=node)
            try:
                result = await self._store.create_verification(
                    verification,
                    call,
                    self._limits(verification, call.channel) if dialed else (),
                    idempotency,
                    invalid_since=(
                        invalid_refused_since(self._config.numbers, now) if dialed else None
                    ),
                )
            except BaseException:
                draft.release_cli()
                raise
            if not isinstance(result, Inserted):
                draft.release_cli()
                return self._refused(result, verification, body_hash)
            # Handed over before anything else is awaited: from its commit on, a newer
            # create for the phone may supersede it, and its cancel must find it in the
            # dialer's hands (being placed), not nowhere.
            if reservation is not None:
                reservation.place(self._job(draft, call))
            await self._cancel_superseded(verification.id, result)
        return verification, call

    def _refused(
        self,
        result: Limited | Replayed | KnownInvalid,
        verification: VerificationRecord,
        body_hash: str,
    ) -> Replayed:
        """What the store refused, as the client is to hear it."""
        if isinstance(result, Replayed):  # a concurrent retry of the same key won
            return _replay(result, body_hash)
        if isinstance(result, KnownInvalid):
            until = result.last_call_at + self._config.numbers.refuse_invalid_days * DAY
            raise NumberKnownInvalid(
                f"the network reported this number as invalid; it is refused until "
                f"{timestamp(until)} or until its health is reset",
                last_outcome=result.last_outcome,
                last_cause=result.last_cause,
            )
        log.info("verification refused: rate limited (phone %s)", phones.masked(verification.phone))
        raise RateLimited(result.retry_after, result.limit)

    async def _cancel_superseded(self, verification_id: str, inserted: Inserted) -> None:
        """Hang up the calls of the verifications the new one superseded."""
        for old_id, live_call_id in inserted.superseded:
            log.debug(
                "verification %s canceled: superseded by %s",
                old_id,
                verification_id,
                extra=call_ids(old_id, live_call_id),
            )
            if live_call_id is not None:
                await self._dialer.cancel(live_call_id)

    def _job(self, draft: _Draft, call: CallRecord) -> CallJob:
        assert not draft.verification.sandbox, "a sandbox verification is never dialed"
        return self.job_for(draft.verification, call, draft.cli, draft.code)

    def job_for(
        self,
        verification: VerificationRecord,
        call: CallRecord,
        cli: Cli | None = None,
        code: str | None = None,
    ) -> CallJob:
        """The dialer's job for a call of `verification`: a flash call shows `cli`; a
        voice call says `code`. Without them, a call to follow, never to place."""
        voice = self._config.voice
        speech, shown, shown_dial = None, "", ""
        if call.channel is Channel.VOICE:
            assert voice.caller_id is not None, "a voice step needs voice.caller_id"
            shown_dial = phones.format_for_trunk(voice.caller_id, voice.cli_format)
            if code is not None:
                speech = Speech(
                    context=voice.context,
                    code=code,
                    locale=verification.locale or voice.default_locale,
                    repeat=voice.repeat,
                    max_seconds=voice.max_seconds + VOICE_PBX_MARGIN_S,
                )
        elif cli is not None:
            pool = self._pools_by_name[verification.pool]
            shown, shown_dial = cli.e164, phones.format_for_trunk(cli.e164, pool.cli_format)
        pool_of = self._pools_by_name.get(verification.pool)
        route = None
        if call.channel is Channel.FLASHCALL and pool_of is not None:
            health = self._config.caller_health
            route = RouteReport(
                pool=pool_of.name,
                carrier=verification.carrier or "",
                delivered=None,
                peers=tuple(
                    p.name for p in pools_for(self._pools, verification.region) if p is not pool_of
                ),
                min_calls=health.min_calls,
                probe_seconds=health.probe_seconds,
                recent_calls=health.recent_calls,
            )
        return CallJob(
            call_id=call.id,
            verification_id=call.verification_id,
            dial_number=call.dial_number,
            cli=shown,
            cli_dial=shown_dial,
            pool=verification.pool,
            ring_seconds=call.ring_seconds,
            queued_at=call.queued_at,
            early_media_is_alerting=self.early_media_is_alerting(verification),
            channel=call.channel,
            speech=speech,
            answered_cap=voice.max_seconds if call.channel is Channel.VOICE else 0.0,
            has_next=call.step + 1 < len(verification.channel_list),
            fallback_after=verification.fallback_after,
            trunk_channel=pool_of.channel if route is not None and pool_of is not None else None,
            route=route,
        )

    def early_media_is_alerting(self, verification: VerificationRecord) -> bool:
        """Whether a lone 183 counts as alerting for this destination."""
        policy = self._config.numbers.early_media_is_alerting
        return policy.applies(verification.region, verification.carrier)

    async def resume(self, verification: VerificationRecord, call: CallRecord) -> bool:
        """Queue again a call that was still queued when the gateway stopped.

        A first flash call was never dialed, so nobody saw its code: it gets a fresh
        caller ID and code. A later step keeps the code its verification has had.
        False when the verification can no longer be called (expired, unknown pool, a
        code that cannot be read back).
        """
        pool = self._pools_by_name.get(verification.pool)
        now = self._clock()
        if (
            pool is None
            or verification.status is not VerificationStatus.PENDING
            or verification.expires_at <= now
        ):
            return False
        if call.step > 0:
            kept = self._code_for_step(verification, call.channel)
            if kept is None:
                return False
            cli, code = kept
        else:
            cli, code = _new_code(pool, call.channel)
            sealed = self._sealer.seal(code) if verification.code_sealed else None
            if not await self._store.replace_code(
                verification.id, self._code_hash(verification.id, code), sealed, now
            ):
                if cli is not None:
                    pool.release(cli.e164)
                return False
        self._dialer.submit(replace(self.job_for(verification, call, cli, code), queued_at=now))
        return True

    def _code_for_step(
        self, verification: VerificationRecord, channel: Channel
    ) -> tuple[Cli | None, str] | None:
        """The verification's code, read back for a later step, and for a flash call
        the caller ID that carries it (held in its pool); None, said in the log, when it
        cannot be (a changed code_secret, a pool no longer configured)."""
        pool = self._pools_by_name.get(verification.pool)
        try:
            if pool is None:
                raise Unreadable(f"pool {verification.pool} is not configured")
            if verification.code_sealed is None:
                raise Unreadable("no code kept for this verification")
            code = self._sealer.open(verification.code_sealed)
            if channel is Channel.VOICE:
                return None, code
            cli = pool.cli_for(code)
            if cli is None:
                raise Unreadable("no caller ID of the pool carries this code any more")
        except Unreadable as exc:
            log.error(
                "verification %s: its %s step cannot have its code: %s",
                verification.id,
                channel,
                exc,
                extra=call_ids(verification.id),
            )
            return None
        pool.hold(cli.e164)
        return cli, code

    def _limits(
        self, v: VerificationRecord, channel: Channel = Channel.FLASHCALL
    ) -> tuple[WindowLimit, ...]:
        """Every window limit a new verification must fit under (docs/api/concepts.md#limits),
        and a voice call's own when it starts with one."""
        limits = self._config.limits
        return (
            *(WindowLimit("phone", v.phone, w.count, w.seconds) for w in limits.per_phone),
            *(
                WindowLimit("phone_prefix", v.phone_prefix, w.count, w.seconds)
                for w in limits.per_prefix
            ),
            WindowLimit("api_key_id", v.api_key_id, limits.key_daily_calls, 86400),
            *(WindowLimit(None, None, w.count, w.seconds) for w in limits.global_calls),
            *(self._voice_limits(v) if channel is Channel.VOICE else ()),
        )

    def _voice_limits(self, v: VerificationRecord) -> tuple[WindowLimit, ...]:
        """Voice calls are billed: their own limits, per phone and per key."""
        voice = self._config.voice
        return (
            WindowLimit("voice_phone", v.phone, voice.per_phone_per_hour, 3600),
            WindowLimit("voice_phone", v.phone, voice.per_phone_per_day, 86400),
            WindowLimit("voice_api_key_id", v.api_key_id, voice.key_daily_calls, 86400),
        )

    # -- steps -----------------------------------------------------------------

    async def next_step(
        self, api_key_id: str, verification_id: str
    ) -> tuple[VerificationRecord, CallRecord]:
        """Start the verification's next channel now (the user asked: "call me instead")."""
        verification, call = await self.get(api_key_id, verification_id)
        if verification.status is not VerificationStatus.PENDING:
            raise VerificationNotPending(
                f"verification is {verification.status}",
                verification_status=verification.status,
            )
        if verification.next_channel is None:
            raise NoNextChannel("every channel of this verification has been tried")
        await self._start_next(verification, call, asked=True)
        return await self.get(api_key_id, verification_id)

    async def call_ended(self, job: CallJob, outcome: Outcome) -> None:
        """A call has ended (the dialer's on_ended): its verification's next step may be
        due at once."""
        if job.has_next:
            self._steps_due.set()

    async def start_due(self) -> int:
        """Start the next steps whose time has come; how many were started."""
        started = 0
        for verification, call in await self._store.due_steps(self._clock(), STEPS_BATCH):
            try:
                if await self._start_next(verification, call, asked=False):
                    started += 1
            except Exception:
                log.exception(
                    "verification %s: its next step could not start",
                    verification.id,
                    extra=call_ids(verification.id, call.id),
                )
        return started

    async def _start_next(
        self, verification: VerificationRecord, current: CallRecord, *, asked: bool
    ) -> bool:
        """Store and place the call of the verification's next step. With `asked` (the
        client's `next`) a refusal is the client's error; due by itself, a step that
        cannot start ends the verification if its last call failed. False when it did
        not start (another gateway started it, or it could not)."""
        channel = verification.next_channel
        assert channel is not None
        now = self._clock()
        pool = self._pools_by_name.get(verification.pool)
        cli, code = None, None
        if not verification.sandbox:
            kept = self._code_for_step(verification, channel)
            if kept is None:
                await self._store.set_status(verification.id, VerificationStatus.FAILED, now)
                if asked:
                    raise VerificationNotPending(
                        "verification is failed", verification_status=VerificationStatus.FAILED
                    )
                return False
            cli, code = kept
        # A flash call rings as the one before it did (the request's ring_seconds); after
        # a voice call, whose ring time is voice.ring_seconds, as configured.
        ring_seconds = (
            current.ring_seconds
            if current.channel is Channel.FLASHCALL
            else self._config.calls.ring_seconds
        )
        call = self._new_call(
            verification, channel, verification.step + 1, current.dial_number, ring_seconds, now
        )
        limits = (
            self._voice_limits(verification)
            if channel is Channel.VOICE and not verification.sandbox
            else ()
        )
        min_gap = float(self._config.voice.next_min_gap_seconds) if asked else None
        try:
            moved = await self._store.start_step(verification.id, call, now, limits, min_gap)
        except BaseException:
            if cli is not None and pool is not None:
                pool.release(cli.e164)
            raise
        if not isinstance(moved, VerificationRecord):
            if cli is not None and pool is not None:
                pool.release(cli.e164)
            if isinstance(moved, Limited):
                return await self._step_refused(verification, current, moved, asked)
            if asked:  # checked, canceled or moved on meanwhile
                found = await self._store.verification(verification.id)
                status = found[0].status if found else verification.status
                if status is VerificationStatus.PENDING:
                    raise NoNextChannel("the next channel has just been started")
                raise VerificationNotPending(
                    f"verification is {status}", verification_status=status
                )
            return False
        log.info(
            "verification %s: step %d, %s",
            verification.id,
            call.step,
            channel,
            extra=call_ids(verification.id, call.id),
        )
        if current.ended_at is None and not verification.sandbox:
            # Asked while the last call still rings: that call is over.
            await self._dialer.cancel(current.id, current.node)
        if not verification.sandbox:
            self._dialer.submit(self.job_for(moved, call, cli, code))
        return True

    async def _step_refused(
        self,
        verification: VerificationRecord,
        current: CallRecord,
        limited: Limited,
        asked: bool,
    ) -> bool:
        if asked:
            log.info(
                "next step of %s refused: %s limit",
                verification.id,
                limited.limit,
                extra=call_ids(verification.id),
            )
            raise RateLimited(limited.retry_after, limited.limit)
        log.warning(
            "verification %s: its %s step is refused by the %s limit",
            verification.id,
            verification.next_channel,
            limited.limit,
            extra=call_ids(verification.id),
        )
        if current.outcome not in DELIVERED_OUTCOMES | UNCERTAIN_OUTCOMES:
            # Nothing reached the user and nothing else will.
            await self._store.set_status(verification.id, VerificationStatus.FAILED, self._clock())
        return False

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
        self,
        api_key_id: str,
        verification_id: str,
        code: str | None,
        cli: str | None,
        source: CheckSource | None = None,
    ) -> CheckResult:
        """Check a code (trailing digits) or a full caller ID against a verification;
        `source`: how the client obtained it, kept with an approval."""
        presented = self._presented(code, cli)
        verification, _ = await self.get(api_key_id, verification_id)
        return await self._check(verification, presented, source)

    async def check_by_phone(
        self,
        api_key_id: str,
        phone: str,
        region: str | None,
        code: str | None,
        cli: str | None,
        source: CheckSource | None = None,
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
        return await self._check(verification, presented, source)

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

    async def _check(
        self,
        verification: VerificationRecord,
        presented: _Presented,
        source: CheckSource | None = None,
    ) -> CheckResult:
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
            verification.id, valid, self._clock(), self._check_limits, source
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
        if updated.status is VerificationStatus.APPROVED:
            await self._hang_up_voice(verification.id)
        return CheckResult(updated, valid)

    async def _hang_up_voice(self, verification_id: str) -> None:
        """An approved verification's voice call, if it still rings, has nothing to say."""
        found = await self._store.verification(verification_id)
        if found is not None:
            call = found[1]
            if call.channel is Channel.VOICE and call.ended_at is None:
                await self._dialer.cancel(call.id, call.node)

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
        """Start expiring verifications as their TTL passes, and starting the next
        steps as they fall due."""
        self._expiry_task = asyncio.create_task(self._expiry_loop(), name="expiry")
        self._steps_task = asyncio.create_task(self._steps_loop(), name="steps")

    async def stop(self) -> None:
        await cancel_and_wait(self._expiry_task, self._steps_task)
        self._expiry_task = self._steps_task = None
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

    async def _steps_loop(self) -> None:
        while True:
            self._steps_due.clear()
            try:
                await self.start_due()
            except Exception:
                log.exception("next steps sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._steps_due.wait(), STEPS_POLL_S)


def _new_code(pool: Pool, channel: Channel) -> tuple[Cli | None, str]:
    """A fresh code for a verification's first call: a flash call's is in the caller ID
    drawn for it; a voice call's is random digits of the pool's length, in no caller ID."""
    if channel is Channel.FLASHCALL:
        cli = pool.draw()
        return cli, cli.code
    return None, f"{secrets.randbelow(10**pool.code_length):0{pool.code_length}d}"


def _log_unexpected(task: asyncio.Task[Any]) -> None:
    """A create finished for a request that had given up: a refusal (a limit, a bad
    number) is nobody's news; anything else is a bug worth a line."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, GatewayError):
        log.error("a create whose request timed out failed", exc_info=exc)
