"""What the store keeps and answers: its records, statuses and results, owned by the
domain and shared by every backend."""

from __future__ import annotations

import enum
import functools
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal


class VerificationStatus(enum.StrEnum):
    """Where a verification stands: pending until one of the five ends."""

    PENDING = "pending"
    APPROVED = "approved"
    CANCELED = "canceled"
    EXPIRED = "expired"
    FAILED = "failed"
    MAX_ATTEMPTS_REACHED = "max_attempts_reached"


class CallStatus(enum.StrEnum):
    """Where a call stands: live while queued, dialing or ringing."""

    QUEUED = "queued"
    DIALING = "dialing"
    RINGING = "ringing"
    COMPLETED = "completed"  # it ended delivered, answered or uncertain
    FAILED = "failed"


class Channel(enum.StrEnum):
    """How a verification's code reaches the user."""

    FLASHCALL = "flashcall"  # a missed call whose caller ID carries the code
    VOICE = "voice"  # a call that speaks the code


class CheckSource(enum.StrEnum):
    """How the code a check presents was obtained, as the client says."""

    INTERCEPTED = "intercepted"  # an app read the caller ID from the call log
    MANUAL = "manual"  # the user typed it


class WebhookStatus(enum.StrEnum):
    """Where a webhook's delivery stands."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # given up after its last attempt


LIVE_CALL_STATUSES = (CallStatus.QUEUED, CallStatus.DIALING, CallStatus.RINGING)


@dataclass(frozen=True, slots=True)
class WebhookRecord:
    id: str
    verification_id: str
    url: str
    type: str
    payload: str | None
    created_at: float
    next_attempt_at: float
    attempts: int
    last_status: int | None
    last_error: str | None
    delivered_at: float | None
    given_up_at: float | None
    # The verification as it was when the event happened (Snapshot.encode); None in
    # rows written before the column was.
    snapshot: str | None = None


VERIFICATION_STATUSES = tuple(VerificationStatus)

# The verification status each event reports, for the statements that change it.
STATUS_EVENTS = {
    status: f"verification.{status}"
    for status in VerificationStatus
    if status is not VerificationStatus.PENDING
}


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An Idempotency-Key with its request, stored with the insert: a retry is answered
    with the verification as it was created."""

    api_key_id: str
    key: str
    body_hash: str
    since: float  # rows older than this (24 h) no longer count


@dataclass(frozen=True, slots=True)
class Inserted:
    """The verification was stored; these (verification, live call) were superseded."""

    superseded: list[tuple[str, str | None]]


@dataclass(frozen=True, slots=True)
class Limited:
    """A limit was reached; nothing was stored."""

    retry_after: float
    limit: str  # which: phone, phone_prefix, api_key_daily or global


@dataclass(frozen=True, slots=True)
class KnownInvalid:
    """The network called the number invalid (number_health); nothing was stored."""

    last_call_at: float
    last_outcome: str | None
    last_cause: int | None


@dataclass(frozen=True, slots=True)
class Replayed:
    """The Idempotency-Key was used before; nothing was stored. `created`: the
    verification as it was created. A key stored by a gateway older than schema 11
    has instead the JSON body first answered (`response`)."""

    body_hash: str
    created: Snapshot | None
    response: str | None = None


@dataclass(frozen=True, slots=True)
class WindowLimit:
    """At most `count` verifications in `seconds` where `column` equals `value`.

    `column` None counts every verification (a global ceiling); voice_phone and
    voice_api_key_id count the voice calls of a phone and of a key.
    """

    column: Literal["phone", "phone_prefix", "api_key_id", "voice_phone", "voice_api_key_id"] | None
    value: str | None
    count: int
    seconds: float


@dataclass(frozen=True, slots=True)
class CheckLimit:
    """At most `count` wrong checks against one phone in `seconds`: those made with the
    checking verification's API key (`per_key`), or with any key. `name` says which
    limit refused, for the operator's metrics."""

    count: int
    seconds: float
    per_key: bool
    name: str


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    name: str
    key_hash: str
    created_at: float
    revoked_at: float | None
    allowed_networks: str | None = None
    scope: str = "verify"  # verify | admin (apikeys.SCOPES)


@dataclass(frozen=True, slots=True)
class VerificationRecord:
    id: str
    api_key_id: str
    phone: str
    region: str
    reference: str | None
    callback_url: str | None
    status: VerificationStatus
    code_hash: str
    pool: str
    cli_prefix: str
    cli_length: int
    cli_pattern: str
    attempts_remaining: int
    created_at: float
    expires_at: float
    updated_at: float
    carrier: str | None = None
    phone_prefix: str | None = None
    failed_checks: int = 0
    sandbox: bool = False
    # The channels to try, in order, comma-separated (Channel values), and which of them
    # the current call is (its `step`).
    channels: str = "flashcall"
    locale: str | None = None  # the voice call's language
    fallback_after: float | None = None  # after a delivered call not checked; None: never
    step: int = 0
    next_at: float | None = None  # when the gateway starts the next step itself
    next_asked_at: float | None = None  # the client's last `next`
    code_sealed: str | None = None  # the code, sealed (gateway.seal), if a voice step may speak it
    # How the approving check's code was obtained (CheckSource); None: not said.
    check_source: str | None = None
    # How long an app should watch the call log for the flash call; None: no flash call.
    watch_seconds: float | None = None

    def __post_init__(self) -> None:
        # A row's status is text; the record's is the enum.
        object.__setattr__(self, "status", VerificationStatus(self.status))

    @property
    def channel_list(self) -> tuple[Channel, ...]:
        return tuple(Channel(c) for c in self.channels.split(","))

    @property
    def next_channel(self) -> Channel | None:
        """The channel the next step would use; None after the last."""
        channels = self.channel_list
        return channels[self.step + 1] if self.step + 1 < len(channels) else None


@dataclass(frozen=True, slots=True)
class NumberHealthRecord:
    phone: str
    status: str
    last_outcome: str | None
    last_cause: int | None
    last_sip_code: int | None
    last_call_at: float | None
    last_delivered_at: float | None
    calls: int
    delivered: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class CallRecord:
    id: str
    verification_id: str
    status: CallStatus
    dial_number: str
    ring_seconds: float
    outcome: str | None = None
    hangup_cause: int | None = None
    sip_code: int | None = None
    reason: str | None = None
    queued_at: float = 0.0
    dialed_at: float | None = None
    ringing_at: float | None = None
    ended_at: float | None = None
    owner: str | None = None  # the instance that places and follows it (instance.name)
    node: str | None = None  # the Asterisk node it is placed on
    channel: Channel = Channel.FLASHCALL
    step: int = 0  # its place in its verification's channels

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", CallStatus(self.status))
        object.__setattr__(self, "channel", Channel(self.channel))


@dataclass(frozen=True, slots=True)
class CallEventRecord:
    call_id: str
    at: float
    kind: str
    cause: int | None
    sip_code: int | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A verification, its call and the call's timeline at one instant: a webhook
    event's data, kept with the event so that it says what was true when it happened."""

    verification: VerificationRecord
    call: CallRecord  # the current step's
    events: list[CallEventRecord]
    # Every step's call, the first first; empty in snapshots from before steps (one call).
    steps: list[CallRecord] = field(default_factory=list)

    def encode(self) -> str:
        return json.dumps(
            [
                values_of(self.verification),
                values_of(self.call),
                [values_of(event) for event in self.events],
                [values_of(call) for call in self.steps],
            ]
        )

    @classmethod
    def decode(cls, text: str) -> Snapshot:
        verification, call, events, *steps = json.loads(text)
        return cls(
            VerificationRecord(*verification),
            CallRecord(*call),
            [CallEventRecord(*event) for event in events],
            [CallRecord(*step) for step in (steps[0] if steps else [])],
        )


def values_of(record: Any) -> tuple[Any, ...]:
    """A record's fields in column order (dataclasses.astuple deep-copies: slow)."""
    return _getter(record.__class__)(record)


@functools.cache
def _getter(record_type: type[Any]) -> Callable[[Any], tuple[Any, ...]]:
    """Reads a record type's fields at once: dataclasses.fields() and a getattr each
    took 1.5% of an API create's CPU (make bench)."""
    names = [f.name for f in fields(record_type)]
    get = operator.attrgetter(*names)
    return get if len(names) > 1 else lambda record: (get(record),)


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """A gateway sharing the database: alive while its lease runs."""

    name: str
    incarnation: str
    started_at: float
    lease_until: float
    stopped_at: float | None


class StoreUnavailable(Exception):
    """The database cannot be reached (a lost server, a pool that cannot connect):
    nothing was written, and the same work may be tried again later."""


class AlertKind(enum.StrEnum):
    """What a conversion alert is about."""

    BLOCK = "block"  # a destination block: the number without its last prefix_hidden_digits
    CARRIER = "carrier"
    COUNTRY = "country"  # the region (ISO 3166 alpha-2)


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """A target whose conversion (approved over created) fell under conversion.min_rate."""

    id: str
    kind: AlertKind
    target: str
    created: int  # verifications counted in the window when it was raised
    approved: int
    mode: str  # conversion.mode then: report or block
    raised_at: float
    blocked_until: float | None  # block mode: new verifications refused until then
    cleared_at: float | None = None
    cleared_by: str | None = None  # admin (lifted), expired (block over), recovered

    @property
    def rate(self) -> float:
        return min(self.approved / self.created, 1.0) if self.created else 0.0
