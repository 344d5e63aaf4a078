"""Every JSON body of the API, declared once: the requests it reads, the responses and
problems it writes. Requests are decoded and checked by these declarations (msgspec,
unknown members refused); responses are encoded from them; the OpenAPI document's
components are generated from them (gateway.api.openapi)."""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway import apikeys
from gateway.config import MAX_RING_SECONDS, MAX_VOICE_WAIT_SECONDS
from gateway.numbers import MAX_LOOKUP
from gateway.outcomes import Health, Outcome
from gateway.store import (
    AlertKind,
    CallStatus,
    Channel,
    CheckSource,
    VerificationStatus,
    WebhookStatus,
)
from gateway.verifications import MAX_CALLBACK_URL_LENGTH, MAX_CHANNELS, MAX_REFERENCE_LENGTH

# -- members -------------------------------------------------------------------

# A channel's or a locale's name: the gateway's are short; longer is no name of its.
MAX_NAME_LENGTH = 32
# RFC 3339 in UTC with milliseconds (gateway.times.timestamp).
Time = Annotated[str, Meta(extra_json_schema={"format": "date-time"})]
Phone = Annotated[
    str, Meta(max_length=64, description="E.164, or national digits read with region")
]
Region = Annotated[
    str,
    Meta(
        max_length=2,
        description="ISO 3166 alpha-2 region for national input (numbers.default_region)",
    ),
]
Code = Annotated[str, Meta(max_length=16, description="the trailing digits the user saw")]
CliNumber = Annotated[
    str, Meta(max_length=64, description="the full caller ID the user saw (the app reads it)")
]


class Request(msgspec.Struct, forbid_unknown_fields=True):
    """A request body: only its own members, each of its type and within its limits;
    no text member holds a control character (CR/LF reach nothing, AMI least of all)."""

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, str) and not value.isprintable():
                # Not a ValueError: msgspec would word it; this is the API's own answer.
                raise ControlCharacters(name)


class ControlCharacters(Exception):
    """A request's text member holds a control character."""

    def __init__(self, member: str) -> None:
        super().__init__(f"{member} must not hold control characters")
        self.member = member


# -- requests ------------------------------------------------------------------

FallbackAfter = Annotated[
    int,
    Meta(
        ge=0,
        le=MAX_VOICE_WAIT_SECONDS,
        description="how long after a delivered flash call that was not checked the next "
        "channel starts; null: only when asked (next); default voice.fallback_after_seconds",
    ),
]


class VerificationCreate(Request):
    phone: Phone
    region: Region | None = None
    reference: (
        Annotated[
            str, Meta(max_length=MAX_REFERENCE_LENGTH, description="your own string, echoed back")
        ]
        | None
    ) = None
    callback_url: (
        Annotated[
            str,
            Meta(
                max_length=MAX_CALLBACK_URL_LENGTH,
                description="absolute http(s) URL for webhooks",
                extra_json_schema={"format": "uri"},
            ),
        ]
        | None
    ) = None
    ring_seconds: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=MAX_RING_SECONDS,
                description="at most the gateway's calls.max_ring_seconds",
            ),
        ]
        | None
    ) = None
    channels: (
        Annotated[
            list[Annotated[str, Meta(max_length=MAX_NAME_LENGTH)]],
            Meta(
                min_length=1,
                max_length=MAX_CHANNELS,
                description="the channels to try, in order: a flash call, a voice call that "
                'speaks the code; default ["flashcall"]. An unknown one is 422 '
                "unknown_channel",
                extra_json_schema={"items": {"enum": [c.value for c in Channel]}},
            ),
        ]
        | None
    ) = None
    locale: (
        Annotated[
            str,
            Meta(
                max_length=MAX_NAME_LENGTH,
                description="the language the voice call speaks (the gateway's voice.locales, "
                "such as en or id); default voice.default_locale. An unknown one is 422 "
                "unknown_locale",
            ),
        ]
        | None
    ) = None
    # Absent: the gateway's default; null: never (only when asked).
    fallback_after_seconds: FallbackAfter | msgspec.UnsetType | None = msgspec.UNSET


Source = Annotated[
    CheckSource,
    Meta(
        description="how the code was obtained: intercepted (an app read the call log) or "
        "manual (the user typed it); counted in /v1/stats"
    ),
]


class Check(Request):
    """Exactly one of code (the trailing digits) or cli (the full number)."""

    code: Code | None = None
    cli: CliNumber | None = None
    source: Source | None = None


class CheckByPhone(Request):
    """The phone, and exactly one of code (the trailing digits) or cli (the full number)."""

    phone: Phone
    region: Region | None = None
    code: Code | None = None
    cli: CliNumber | None = None
    source: Source | None = None


class Lookup(Request):
    phones: Annotated[
        list[Any],
        Meta(
            min_length=1,
            max_length=MAX_LOOKUP,
            description="the numbers, E.164 or national; an entry that is not a string is "
            "answered as not a number",
            extra_json_schema={"items": {"type": "string"}},
        ),
    ]
    region: Region | None = None


# -- responses -----------------------------------------------------------------


class Response(msgspec.Struct):
    """A response body (every member always sent, null where it has no value)."""


class CallEvent(Response):
    at: Time | None
    kind: str
    cause: int | None
    sip_code: int | None


class Call(Response):
    channel: Channel
    status: CallStatus
    outcome: Outcome | None
    hangup_cause: int | None
    sip_code: int | None
    reason: Annotated[
        str | None,
        Meta(
            description="why the gateway ended the call itself: ring_timeout (its ring time "
            "ran out after a 180 or a lone 183), post_dial_timeout (nothing alerted in time), "
            "canceled; or what failed (originate_refused, pbx_lost, ...). null when the "
            "network ended it: see hangup_cause and sip_code"
        ),
    ]
    ring_seconds: int
    node: Annotated[
        str | None,
        Meta(
            description="the Asterisk node the call was placed on (asterisk.nodes, or "
            "asterisk.name); null until it is placed"
        ),
    ]
    dialed_at: Time | None
    ringing_at: Time | None
    ended_at: Time | None
    events: list[CallEvent]


class Step(Response):
    channel: Channel
    call: Call


class CliShape(Response):
    """Where the code is in the caller ID: its prefix, length and pattern."""

    prefix: str
    length: int
    pattern: str
    interception_timeout_seconds: Annotated[
        int | None,
        Meta(
            description="how long an app should watch the call log for the flash call: its "
            "post-dial delay and ring time; null without a flash call"
        ),
    ]


class Webhook(Response):
    id: str
    type: str
    status: WebhookStatus
    attempts: int
    last_status: int | None
    last_error: Annotated[
        str | None,
        Meta(
            description="why the last attempt failed: connect_failed, timeout, http_status "
            "(see last_status) or refused_address"
        ),
    ]
    delivered_at: Time | None
    next_attempt_at: Time | None


class Verification(Response):
    id: Annotated[str, Meta(pattern="^vrf_[0-9a-f]{32}$")]
    status: VerificationStatus
    phone: str
    reference: str | None
    callback_url: str | None
    sandbox: Annotated[
        bool, Meta(description="a configured test number: never called, its code is fixed")
    ]
    cli: CliShape
    channels: Annotated[list[Channel], Meta(description="the channels it tries, in order")]
    locale: Annotated[str | None, Meta(description="the voice call's language; null without one")]
    fallback_after_seconds: Annotated[
        int | None,
        Meta(description="after a delivered call not checked, the next channel starts then"),
    ]
    call: Annotated[Call, Meta(description="the latest step's call")]
    steps: Annotated[list[Step], Meta(description="each channel tried, with its call, in order")]
    next_channel: Annotated[
        Channel | None, Meta(description="the channel `next` would start; null after the last")
    ]
    next_at: Annotated[
        Time | None, Meta(description="when the gateway starts the next channel by itself")
    ]
    webhooks: list[Webhook]
    attempts_remaining: int
    expires_at: Time | None
    created_at: Time | None
    updated_at: Time | None


class CheckResult(Response):
    id: str
    status: VerificationStatus
    valid: bool
    attempts_remaining: int


class NumberHealth(Response):
    """What calls taught about a number."""

    status: Health | None
    calls: int
    delivered: int
    last_outcome: str | None
    last_cause: int | None
    last_sip_code: int | None
    last_call_at: Time | None
    last_delivered_at: Time | None


class Number(Response):
    input: str | int | float | None
    e164: str | None
    valid: bool
    possible: bool
    reason: str | None
    type: str | None
    region: str | None
    carrier: str | None
    callable: bool
    refused_by: str | None
    health: NumberHealth


class ListedNumber(Response):
    phone: str
    health: NumberHealth


class NumberPage(Response):
    numbers: list[ListedNumber]
    next_cursor: Annotated[str | None, Meta(description="null on the last page")]


class LookupResults(Response):
    results: Annotated[list[Number], Meta(description="one per number asked, in order")]


ByOutcome = Annotated[dict[str, int], Meta(description="calls by outcome")]
DeliveryRate = Annotated[float | None, Meta(description="delivered / calls; null without calls")]
Uncertain = Annotated[
    int, Meta(description="calls that only ever showed early media (progress_only)")
]


class Totals(Response):
    """Calls over a window and what became of them."""

    calls: int
    delivered: int
    uncertain: Uncertain
    failed: int
    delivery_rate: DeliveryRate
    by_outcome: ByOutcome


class CheckSources(Response):
    """How the codes of the approved verifications were obtained, as their checks said."""

    intercepted: int
    manual: int
    unspecified: int
    intercepted_share: Annotated[
        float | None,
        Meta(description="intercepted / (intercepted + manual); null when none said"),
    ]


class CarrierStats(Totals):
    carrier: str
    approved_by_source: CheckSources


class ChannelStats(Totals):
    channel: Channel
    approved: Annotated[int, Meta(description="calls after which their verification was approved")]
    approval_rate: Annotated[float | None, Meta(description="approved / calls; null without calls")]


class Stats(Totals):
    since: Time | None
    until: Time | None
    approved_by_source: CheckSources
    by_carrier: list[CarrierStats]
    by_channel: Annotated[
        list[ChannelStats], Meta(description="flash calls and voice calls apart, each channel")
    ]


class PoolCarrier(Response):
    """What the latest calls from one pool to one carrier taught (caller_health)."""

    carrier: Annotated[str | None, Meta(description="as in /v1/stats; null: not known")]
    state: Annotated[
        Literal["active", "quarantined", "probing"],
        Meta(
            description="active: new calls may use the pool; quarantined: they do not (its "
            "calls failed while another pool delivered); probing: one call tries it again"
        ),
    ]
    since: Time | None
    calls: Annotated[int, Meta(description="its latest calls that judged the route")]
    delivered: int
    rate: DeliveryRate
    failures_in_a_row: int
    held: Annotated[
        bool,
        Meta(
            description="failing past caller_health.min_calls and kept active: no other pool "
            "delivers to the carrier (the last one is never quarantined)"
        ),
    ]
    next_probe_at: Annotated[Time | None, Meta(description="quarantined: the next probe")]


class PoolHealth(Response):
    name: str
    regions: Annotated[list[str], Meta(description="empty: every allowed region")]
    weight: int
    trunk: Annotated[str, Meta(description="the endpoint its calls go through")]
    carriers: list[PoolCarrier]


class Pools(Response):
    pools: list[PoolHealth]


class Alert(Response):
    """A target whose conversion (approved over created) fell under conversion.min_rate."""

    id: str
    kind: Annotated[
        Literal["block", "carrier", "country"],
        Meta(
            description="block: a destination block (the number without its hidden digits); "
            "carrier; country (ISO 3166 alpha-2)"
        ),
    ]
    target: str
    created: Annotated[int, Meta(description="verifications counted in the window")]
    approved: int
    rate: float
    mode: Literal["report", "block"]
    raised_at: Time | None
    blocked_until: Annotated[
        Time | None, Meta(description="block mode: new verifications to it refused until then")
    ]
    cleared_at: Time | None
    cleared_by: Annotated[
        Literal["admin", "expired", "recovered"] | None,
        Meta(
            description="admin: lifted (DELETE); expired: block_seconds passed; recovered: "
            "a report-mode target back over min_rate"
        ),
    ]


class AlertList(Response):
    alerts: Annotated[list[Alert], Meta(description="newest first")]


class Node(Response):
    name: str
    connected: bool
    down_seconds: float
    calls_live: int
    calls_ringing: int
    max_concurrent: int
    max_per_second: float
    calls_placed: int


class ReadinessChecks(Response):
    database: bool
    pbx: bool
    accepting: bool


class Readiness(Response):
    status: Literal["ready", "not_ready"]
    checks: ReadinessChecks
    nodes: list[Node]


class Liveness(Response):
    status: Literal["ok"]


class Instance(Response):
    name: str
    this: bool
    state: Literal["running", "stopped", "lost"]
    started_at: Time | None
    lease_until: Time | None
    live_calls: int


class MinuteCalls(Response):
    minute: Time | None
    calls: int


class CauseCalls(Response):
    outcome: Outcome
    hangup_cause: int | None
    cause_name: str | None
    calls: int


class Window(Stats):
    seconds: int
    by_cause: list[CauseCalls]


class AlertMode(enum.StrEnum):
    """An alert's conversion.mode when it was raised."""

    REPORT = "report"
    BLOCK = "block"


class OpenAlerts(Response):
    """How many conversion alerts of one kind and mode are open (not cleared). Its kind
    and mode are named enums, the values of Alert's kind and mode: a generated client
    makes one class of each."""

    kind: Annotated[AlertKind, Meta(description="as Alert's kind")]
    mode: Annotated[AlertMode, Meta(description="as Alert's mode")]
    count: int


class Dashboard(Response):
    """GET /dashboard/data: counts only, never a phone number, code or caller ID."""

    generated_at: Time | None
    pbx_connected: bool
    in_flight: Annotated[int, Meta(description="calls placed and not yet ended")]
    queued: Annotated[int, Meta(description="calls waiting to be placed")]
    calls_last_minute: Annotated[int, Meta(description="calls dialed in the last 60 s")]
    nodes: Annotated[list[Node], Meta(description="the Asterisk nodes as this gateway sees")]
    instances: Annotated[
        list[Instance], Meta(description="the gateways sharing the database, this one among them")
    ]
    calls_per_minute: Annotated[
        list[MinuteCalls],
        Meta(description="calls dialed in each of the last 60 clock minutes, oldest first"),
    ]
    window: Annotated[Window, Meta(description="dialed calls that ended in the last hour")]
    pools: Annotated[
        list[PoolHealth],
        Meta(
            description="each configured pool, in order, and its health for each carrier its "
            "calls reached, as GET /v1/pools shows them"
        ),
    ]
    open_alerts: Annotated[
        list[OpenAlerts],
        Meta(
            description="the conversion alerts not cleared, counted for every kind and mode "
            "(0 when none); never their targets"
        ),
    ]


# -- problems ------------------------------------------------------------------


class Problem(Response, omit_defaults=True):
    """RFC 9457 problem details with a stable machine-readable code. The members after
    detail are sent with the codes named in their descriptions."""

    type: str
    title: str
    status: int
    code: Annotated[
        str,
        Meta(
            description="stable and machine-readable: invalid_request, unauthorized, "
            "insufficient_scope, not_found, verification_not_pending, idempotency_conflict, "
            "payload_too_large, unsupported_media_type, invalid_phone, "
            "phone_type_not_allowed, region_not_allowed, destination_blocked, "
            "number_known_invalid, invalid_callback_url, unknown_channel, unknown_locale, "
            "channel_unavailable, no_next_channel, rate_limited, overloaded, pbx_unavailable"
        ),
    ]
    detail: str
    field: Annotated[
        str,
        Meta(
            description="invalid_request, invalid_callback_url: the request member or query "
            "parameter at fault"
        ),
    ] = ""
    fields: Annotated[
        list[str], Meta(description="invalid_request: the unknown members of the request body")
    ] = []
    reason: Annotated[
        str,
        Meta(
            description="invalid_phone: why the number is not valid (not_a_number, too_short, "
            "too_long, invalid_length, invalid_country_code, invalid_for_region)"
        ),
    ] = ""
    region: Annotated[
        str, Meta(description="region_not_allowed: the number's ISO 3166 alpha-2 region")
    ] = ""
    phone_type: Annotated[
        str,
        Meta(
            description="phone_type_not_allowed: the number's type (fixed_line, toll_free, "
            "premium_rate, ...)"
        ),
    ] = ""
    # Sent (possibly null) with number_known_invalid only; UNSET: not sent.
    last_outcome: Annotated[
        str | msgspec.UnsetType | None,
        Meta(description="number_known_invalid: the outcome of its last call"),
    ] = msgspec.UNSET
    last_cause: Annotated[
        int | msgspec.UnsetType | None,
        Meta(description="number_known_invalid: the Q.850 cause of its last call"),
    ] = msgspec.UNSET
    verification_status: VerificationStatus | msgspec.UnsetType = msgspec.UNSET
    required_scope: Annotated[
        str,
        Meta(
            description="insufficient_scope: the scope the route needs "
            f"({', '.join(apikeys.SCOPES)})"
        ),
    ] = ""


REQUESTS: tuple[type[Request], ...] = (VerificationCreate, Check, CheckByPhone, Lookup)
RESPONSES: tuple[type[Response], ...] = (
    Verification,
    CheckResult,
    Number,
    NumberPage,
    LookupResults,
    Stats,
    Pools,
    AlertList,
    Readiness,
    Liveness,
    Dashboard,
    Problem,
)
