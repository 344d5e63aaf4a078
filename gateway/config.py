"""YAML configuration to frozen dataclasses: defaults, ${ENV} interpolation, key-path errors.

Nothing else in the gateway reads YAML or the environment.

Each key is declared once, on its field: `setting()` gives its default, its one-line
description and the simple rules `check-config` applies (a range, the allowed values,
not empty, a format). One generic walk applies those rules; the checks across keys are
code in `_check` and its helpers. gateway/configdoc.py writes the configuration
reference and config.example.yaml from the same declaration.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import math
import os
import re
import socket
import types
import typing
import urllib.parse
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, TypedDict, TypeVar, Unpack, overload

import phonenumbers
import yaml
from phonenumbers import PhoneNumberFormat
from standardwebhooks import Webhook

# A pool below this many codes can be guessed too easily: 1 in 10,000 per attempt,
# five attempts per verification, is the usual floor for a 4-digit OTP.
MIN_POOL_CODES = 10_000
MAX_POOL_WEIGHT = 1000
MAX_RING_SECONDS = 60  # no network alerts a handset for longer than this
# Mobile networks take 3-8 s from INVITE to alerting, a roaming phone longer; a minute
# without any alerting is no post-dial delay any more.
MAX_POST_DIAL_SECONDS = 60
# Beyond the longest ring, for Asterisk's hangup and its events to arrive at shutdown.
SHUTDOWN_GRACE_S = 5.0
# The longest limit window a config may set is 31 days: retention never forgets a call
# that a limit still counts.
MIN_RETENTION_DAYS = 31
MAX_WINDOW_SECONDS = MIN_RETENTION_DAYS * 86400
# Far above any real client count, and below the open files a process may be given.
MAX_CONNECTIONS = 60_000
# PostgreSQL connections per gateway; each is a server process, and the server's own
# max_connections (100 by default) is shared by every gateway.
MAX_POOL_SIZE = 100
SQLITE_SCHEME = "sqlite:///"
# A lease shorter than a few database round trips under load lapses by accident; a
# longer one leaves a dead gateway's calls waiting that long for another to adopt them.
MIN_LEASE_SECONDS = 3.0
MAX_LEASE_SECONDS = 120.0
MAX_INSTANCE_NAME = 64
MAX_NODE_NAME = 32
# Far above any one trunk's contract; a typo (a rate of 1e6) is caught instead.
MAX_CALLS_PER_SECOND = 10_000
MAX_CONCURRENT_CALLS = 100_000
DEFAULT_DATABASE_URL = SQLITE_SCHEME + "var/gateway.sqlite3"
# A code said more often than this only keeps a billed line open.
MAX_VOICE_REPEAT = 5
# Five sayings of an 8-digit code with their pauses fit in a minute; twice that bounds
# what one voice call can cost, whatever the dialplan does.
MAX_VOICE_SECONDS = 120
# An hour after a sign-in the user has left the screen that waits for the code.
MAX_VOICE_WAIT_SECONDS = 3600
# Voice calls are billed: far above any one phone's or key's real need, a typo caught.
MAX_VOICE_PER_PHONE_PER_HOUR = 1000
MAX_VOICE_PER_PHONE_PER_DAY = 10_000
MAX_VOICE_KEY_DAILY_CALLS = 10_000_000
CODE_LENGTHS = range(4, 9)  # 4 to 8 trailing digits
# A webhook secret keys HMAC-SHA256 over bodies any receiver sees: 24 bytes (192 bits,
# the size Standard Webhooks' own tooling makes) leaves no offline search of the key.
MIN_WEBHOOK_SECRET_BYTES = 24
# IPv6 prefixes that carry an IPv4 address a translator or relay forwards to: NAT64's
# (RFC 6052, RFC 8215) in the last 32 bits, 6to4's (RFC 3056) after 2002::/16.
NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
DIAL_FORMATS = ("e164", "e164_no_plus", "national")
LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")
# phonenumbers' type names, lower case (PhoneNumberType.MOBILE -> "mobile").
NUMBER_TYPES = (
    "fixed_line",
    "mobile",
    "fixed_line_or_mobile",
    "toll_free",
    "premium_rate",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "unknown",
)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
E164 = PhoneNumberFormat.E164


class ConfigError(Exception):
    """Every problem found in a configuration, each naming its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- the declaration of a key: setting() ------------------------------------------


@dataclass(frozen=True, slots=True)
class Format:
    """A text format a value must match whole: `what` completes "must be ..."."""

    regex: re.Pattern[str]
    what: str

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


_E164ISH = re.compile(r"\+[1-9][0-9]{1,14}")
REGION = Format(re.compile(r"[A-Z]{2}"), "an ISO 3166 alpha-2 code")
# Letters and digits as str.isalnum() has them: \w is those and _.
NODE_NAME = Format(
    re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NODE_NAME}}}"),
    f"1-{MAX_NODE_NAME} letters, digits and - _ .",
)
INSTANCE_NAME = Format(
    re.compile(rf"[\w.:-]{{0,{MAX_INSTANCE_NAME}}}"),
    f"at most {MAX_INSTANCE_NAME} letters, digits and - _ . :",
)
E164_NUMBER = Format(re.compile(r"\+[1-9][0-9]{7,14}"), "an E.164 number, + and 8-15 digits")
# A context name as extensions.conf writes it between brackets, well under Asterisk's 80.
DIALPLAN_CONTEXT = Format(re.compile(r"[A-Za-z0-9_-]{1,64}"), "1-64 letters, digits and - _")
# A language, and a country where the prompts differ: the directory under Asterisk's sounds.
LOCALE = Format(re.compile(r"[a-z]{2,3}(_[A-Z]{2})?"), "a locale such as en or pt_BR")


class Rules(TypedDict, total=False):
    """What setting() takes besides the description and the default: see Setting."""

    details: str
    ge: float | str
    gt: float
    le: float | str
    zero: str
    choices: tuple[str, ...]
    pattern: Format
    nonempty: bool
    min_length: int
    one_line: bool
    hint: str
    also: str
    secret: bool
    env: str
    example: Any
    empty: str
    inherits: str
    in_example: bool


@dataclass(frozen=True, slots=True)
class Setting:
    """The facts of one key, kept in its field's metadata (`setting_of(field)`).

    The rules are checked by `_check_settings`, each key's first broken rule reported as
    `path: must be ...`; a rule on a list key's items (`pattern`, `choices`) is checked
    on each item (`path[i]: ...`). A None value (an optional key left out) has no rules.
    """

    doc: str  # one line: the example's comment, and the reference's meaning
    details: str = ""  # Markdown sentences the reference adds to `doc`
    ge: float | str | None = None  # at least this, or the value of the sibling key named
    gt: float | None = None  # above this
    le: float | str | None = None  # at most this, or the value of the sibling key named
    zero: str = ""  # 0 is allowed too, outside the range, and means this
    choices: tuple[str, ...] = ()  # the value, or each item, is one of these
    pattern: Format | None = None  # the value, or each item, matches this
    nonempty: bool = False  # not "", not []
    min_length: int = 0  # a string of at least this many characters
    one_line: bool = False  # printable text, no line break
    hint: str = ""  # advice added to the message of a broken rule, in parentheses
    also: str = ""  # the rule checked by code (across keys), as the reference states it
    secret: bool = False  # never in repr(); the example takes it from the environment
    env: str = ""  # the environment variable the example reads it from
    example: Any = None  # a value the example shows commented out, for a key left empty
    empty: str = ""  # what the default means when it is empty or none
    inherits: str = ""  # the key whose value applies when this one is left out
    in_example: bool = True  # False: the reference only (an older spelling)

    def range_text(self, owner: str, name: Callable[[str], str] = str) -> str:
        """The numeric range as "must be ..." ends, "" without one. A sibling key in a
        bound is shown by `name` of its path."""

        def show(bound: float | str) -> str:
            return name(_join(owner, bound)) if isinstance(bound, str) else _number(bound)

        if self.ge is not None and self.le is not None:
            if isinstance(self.ge, str) or isinstance(self.le, str):
                text = f"between {show(self.ge)} and {show(self.le)}"
            else:
                text = f"{show(self.ge)}-{show(self.le)}"
        elif self.gt is not None and self.le is not None:
            text = f"above {show(self.gt)}, at most {show(self.le)}"
        elif self.ge is not None:
            text = f"at least {show(self.ge)}"
        elif self.gt is not None:
            text = f"above {show(self.gt)}"
        elif self.le is not None:
            text = f"at most {show(self.le)}"
        else:
            return ""
        return f"0 ({self.zero}) or {text}" if self.zero else text

    def problem(self, value: Any, owner: Any, owner_path: str) -> str | None:
        """What is wrong with `value`, this key's value in `owner` (at `owner_path`),
        as the text after its path; None when every rule holds."""
        message = None
        if self.nonempty and not value:
            message = "must not be empty"
        elif isinstance(value, str):
            if self.one_line and not value.isprintable():
                message = "must be one line of printable text"
            elif len(value) < self.min_length:
                message = f"must be at least {self.min_length} characters"
            else:
                message = self.item_problem(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            message = self._range_problem(value, owner, owner_path)
        if message and self.hint:
            message += f" ({self.hint})"
        return message

    def item_problem(self, item: Any) -> str | None:
        """What is wrong with `item`, the value of a text key or an item of a list key."""
        if not isinstance(item, str):
            return None
        if self.choices and item not in self.choices:
            return f"must be one of {self.choices}"
        if self.pattern is not None and not self.pattern.matches(item):
            return f"must be {self.pattern.what}"
        return None

    def _range_problem(self, value: float, owner: Any, owner_path: str) -> str | None:
        def bound(b: float | str) -> float:
            return float(getattr(owner, b)) if isinstance(b, str) else b

        if self.zero and value == 0:
            return None
        ok = (
            (self.ge is None or value >= bound(self.ge))
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= bound(self.le))
        )
        return None if ok else f"must be {self.range_text(owner_path)}"


SETTING = "otp-gateway.setting"  # the metadata key


def setting_of(spec: Any) -> Setting:
    """The Setting of a dataclasses.Field; every config field has one."""
    found = spec.metadata.get(SETTING)
    if not isinstance(found, Setting):
        raise TypeError(f"{spec.name}: declared without setting()")
    return found


_T = TypeVar("_T")


@overload
def setting(doc: str, *, default: _T, **rules: Unpack[Rules]) -> _T: ...
@overload
def setting(doc: str, *, default_factory: Callable[[], _T], **rules: Unpack[Rules]) -> _T: ...
@overload
def setting(doc: str, *, kw_only: bool = False, **rules: Unpack[Rules]) -> Any: ...
def setting(
    doc: str,
    *,
    default: Any = MISSING,
    default_factory: Any = MISSING,
    kw_only: bool = False,
    **rules: Unpack[Rules],
) -> Any:
    """A config key: a dataclass field with its default (none: required), its one-line
    description and its rules (see Setting). A secret is left out of repr(). A required
    key declared after keys with defaults is keyword-only (`kw_only=True`)."""
    about = Setting(doc, **rules)
    return field(
        default=default,
        default_factory=default_factory,
        repr=not about.secret,
        kw_only=kw_only,
        metadata={SETTING: about},
    )


_C = TypeVar("_C")


@typing.dataclass_transform(frozen_default=True, field_specifiers=(setting,))
def section(cls: type[_C]) -> type[_C]:
    """A part of the configuration: a frozen dataclass whose fields are setting()s."""
    return dataclass(frozen=True, slots=True)(cls)


# -- the configuration --------------------------------------------------------------


@section
class HttpConfig:
    host: str = setting(
        "listen address; put a TLS proxy in front for other hosts", default="127.0.0.1"
    )
    port: int = setting("listen port", default=8080, ge=1, le=65535)
    # A request the gateway cannot answer in this time gets a 503, not a hung client.
    request_timeout_seconds: float = setting(
        "a request not answered in this time gets `503 overloaded`", default=10.0, gt=0, le=300
    )
    # Also from the connect until its headers are complete (so a client that trickles them).
    keepalive_seconds: float = setting(
        "a connection without a request this long is closed (idle after a response, or still "
        "sending its headers, a slow client); behind a proxy that reuses connections, set it "
        "above the proxy's idle timeout",
        default=15.0,
        gt=0,
        le=300,
    )
    # Before the process runs out of file descriptors (AMI and the database need some).
    max_connections: int = setting(
        "open API connections at most; beyond it a new one is answered `503 overloaded` and closed",
        details="The gateway raises its open-files limit to fit, as far as the hard limit allows",
        default=1000,
        ge=1,
        le=MAX_CONNECTIONS,
    )
    operator_host: str = setting(
        "listen address of the operator routes: `/metrics`, `/dashboard`, `/dashboard/data`; "
        "`/metrics` names API keys, keep it on the operator's network",
        details="`check-config` warns when it is not loopback",
        default="127.0.0.1",
    )
    operator_port: int = setting(
        "their port: they are never served on the API's port",
        details="See [Metrics](operations.md#metrics)",
        default=8081,
        ge=1,
        le=65535,
        also="not `http.port`",
    )


@section
class DatabaseConfig:
    url: str = setting(
        "where the state lives: a SQLite file for one gateway (`sqlite:////srv/x` for an "
        "absolute path; back up with `sqlite3 FILE .backup`), or PostgreSQL, which several "
        "gateways share, e.g. `postgresql://otp:${PGPASSWORD}@db:5432/otp` with the password "
        "from the environment",
        details=(
            "A SQLite file runs in WAL mode; `sqlite:///var/x` is relative to the working "
            "directory. It is created mode 0600 (its `-wal` and "
            "`-shm` too), in a new "
            "directory mode 0700; an existing file others could read is made 0600 at start. "
            "See [Backups](operations.md#backups). The same migrations, numbered alike, are "
            "applied at start on either. A URL that cannot be read, or a server that cannot "
            "be reached at start, stops `run` (and `keys`, `numbers export`) with a message "
            "naming `database.url`"
        ),
        default=DEFAULT_DATABASE_URL,
        also="`sqlite:///FILE` or `postgresql://USER:PASSWORD@HOST:PORT/DB`, one line",
    )
    path: str = setting(
        "the older spelling of `database.url: sqlite:///FILE`: the FILE",
        default="",
        empty="`url` applies",
        also="not with `url`",
        in_example=False,
    )
    # The API's concurrent transactions.
    pool_size: int = setting(
        "PostgreSQL only: connections each gateway opens",
        details=(
            "The server's `max_connections` (100 by default) is shared by every gateway and "
            "your other clients"
        ),
        default=10,
        ge=1,
        le=MAX_POOL_SIZE,
    )
    retention_days: int = setting(
        "finished verifications, with their calls, call events and webhooks, are deleted this "
        "many days after their creation",
        details=(
            "No limit window (at most 31 days) loses what it counts. "
            "See [Retention](operations.md#retention)"
        ),
        default=90,
        ge=MIN_RETENTION_DAYS,
        le=3650,
        zero="keep for ever",
    )


_CHANNEL_RULE = "a `PJSIP/` channel containing `{number}`"


@section
class NodeConfig:
    """One of asterisk.nodes. A key it leaves out is the asterisk mapping's;
    max_per_second and max_concurrent are calls' (the node's own trunk contract)."""

    name: str = setting(
        "the node's name, stored with each call: keep it while the node has calls",
        pattern=NODE_NAME,
        also="unique",
    )
    host: str | None = setting(
        "the node's AMI address",
        default=None,
        inherits="asterisk.host",
        nonempty=True,
        one_line=True,
        also="no two nodes at one AMI `host:port`",
    )
    port: int | None = setting(
        "its AMI port", default=None, inherits="asterisk.port", ge=1, le=65535
    )
    username: str | None = setting(
        "its AMI user", default=None, inherits="asterisk.username", nonempty=True, one_line=True
    )
    secret: str | None = setting(
        "its AMI password",
        default=None,
        inherits="asterisk.secret",
        secret=True,
        nonempty=True,
        one_line=True,
    )
    channel: str | None = setting(
        "its Originate channel",
        default=None,
        inherits="asterisk.channel",
        nonempty=True,
        one_line=True,
        also=_CHANNEL_RULE,
    )
    max_per_second: float | None = setting(
        "Originate actions per second on this node, counted by each gateway for itself",
        default=None,
        inherits="calls.max_per_second",
        gt=0,
        le=MAX_CALLS_PER_SECOND,
    )
    max_concurrent: int | None = setting(
        "calls up at once on this node, counted by each gateway for itself",
        default=None,
        inherits="calls.max_concurrent",
        ge=1,
        le=MAX_CONCURRENT_CALLS,
    )


@section
class AsteriskConfig:
    secret: str = setting(
        "AMI password", secret=True, env="AMI_SECRET", nonempty=True, one_line=True
    )
    host: str = setting(
        "AMI address of your Asterisk",
        details="With `asterisk.nodes`, each node's default, as are `port`, `username`, "
        "`secret` and `channel`",
        default="127.0.0.1",
    )
    port: int = setting("AMI port", default=5038, ge=1, le=65535)
    username: str = setting(
        "AMI user, as in `asterisk-config/manager.conf`",
        default="otp-gateway",
        nonempty=True,
        one_line=True,
    )
    # The AMI filter passes the events of channels whose Uniqueid starts with otp-; a
    # Local/ channel's far leg has a Uniqueid of its own, and its events never come.
    channel: str = setting(
        "the Originate channel; `{number}` is replaced by the destination in `dial_format`",
        details=(
            "A `Local/` channel's far leg escapes the AMI event filter. The endpoint is "
            "named in logs and in `otp_trunk_rejections_total`"
        ),
        default="PJSIP/{number}@otp-trunk",
        nonempty=True,
        one_line=True,
        also=_CHANNEL_RULE,
    )
    dial_format: str = setting(
        "the destination's format for the trunk: `e164` is `+6281234567890`, `e164_no_plus` "
        "`6281234567890`, `national` `081234567890`",
        default="e164_no_plus",
        choices=DIAL_FORMATS,
    )
    # Asterisk may still be booting.
    settle_seconds: float = setting(
        "after each AMI login, wait at most this long for `FullyBooted`: at once on a booted "
        "PBX when the AMI user has `read = call,system`, without `system` always this long",
        details="Without `system`, Asterisk may still be booting. It applies to every node",
        default=2.0,
        ge=0,
        le=30,
    )
    name: str = setting(
        "the node's name when `nodes` is empty: in `call.node`, the logs, `/readyz` and the "
        "metrics' `node` label",
        default="asterisk",
        pattern=NODE_NAME,
    )
    nodes: tuple[NodeConfig, ...] = setting(
        "several Asterisk nodes: each call goes to a logged-in node with room; a node "
        "inherits every key it leaves out from this mapping, `max_per_second` and "
        "`max_concurrent` from `calls`",
        details=(
            "Empty: the `asterisk` mapping is the one node. Every gateway logs in to every "
            "node. See [Running more than one](operations.md#running-more-than-one)"
        ),
        default=(),
        example=(
            NodeConfig("a", host="10.0.0.11"),
            NodeConfig("b", host="10.0.0.12", secret="${AMI_SECRET_B}", max_per_second=5.0),  # noqa: S106 - an env reference
        ),
    )


@dataclass(frozen=True, slots=True)
class AsteriskNode:
    """An Asterisk node as the gateway uses it: every key resolved."""

    name: str
    host: str
    port: int
    username: str
    secret: str = field(repr=False)
    channel: str
    settle_seconds: float
    max_per_second: float
    max_concurrent: int


@section
class PoolConfig:
    name: str = setting("the pool's name", also="unique")
    prefix: str | None = setting(
        'caller IDs are prefix + code: `"+6221500"` gives `+62215000000` to `+62215009999`',
        details="Set either `prefix` or `numbers`",
        default=None,
        pattern=Format(_E164ISH, "+ followed by digits, e.g. +6221500"),
        also="with `code_length` at most 15 digits",
    )
    code_length: int = setting(
        "how many trailing digits are the code",
        default=4,
        ge=CODE_LENGTHS.start,
        le=CODE_LENGTHS.stop - 1,
    )
    numbers: tuple[str, ...] = setting(
        "instead of `prefix`: an explicit list of E.164 numbers, each with the code in its "
        "last `code_length` digits",
        default=(),
        pattern=Format(_E164ISH, "an E.164 number such as +622150001234"),
        also="no two equal, or equal in their last `code_length` digits",
        example=("+622150001234", "+622150005678"),
    )
    cli_format: str = setting(
        "how the caller ID is handed to Asterisk, as `asterisk.dial_format` hands the destination",
        default="e164_no_plus",
        choices=DIAL_FORMATS,
    )
    regions: tuple[str, ...] = setting(
        "destination regions this pool serves",
        default=(),
        empty="every allowed region",
        also="each in `numbers.allowed_regions`",
        example=("ID",),
    )
    allow_low_entropy: bool = setting(
        f"accept a pool of fewer than {MIN_POOL_CODES:,} codes; `check-config` prints its odds",
        details="See [Pool size](#pool-size)",
        default=False,
    )
    channel: str | None = setting(
        "the Originate channel of this pool's calls, to send them through a trunk of its own",
        details="See [Several pools](caller-health.md)",
        default=None,
        empty="the node's channel (`asterisk.channel`)",
        nonempty=True,
        one_line=True,
        also=_CHANNEL_RULE,
        example="PJSIP/{number}@trunk-b",
    )
    weight: int = setting(
        "this pool's share of the new calls among the pools that serve a destination and are "
        "healthy for its carrier",
        default=1,
        ge=1,
        le=MAX_POOL_WEIGHT,
    )

    @property
    def codes(self) -> int:
        """How many different codes the pool can present."""
        return len(self.numbers) if self.numbers else 10**self.code_length


@section
class CallerHealthConfig:
    min_calls: int = setting(
        "failed calls in a row (rejected, congestion, no alerting, error, trunk refusal) from "
        "a pool to one carrier, while another pool's calls to that carrier are delivered, "
        "that quarantine the pool for that carrier",
        details="See [Pool health](caller-health.md#pool-health)",
        default=10,
        ge=1,
        le=1000,
    )
    probe_seconds: int = setting(
        "a quarantined pool is tried again by one call (a probe) this long after its "
        "quarantine or its last probe; a delivered probe restores it",
        default=300,
        ge=5,
        le=86400,
    )
    recent_calls: int = setting(
        "how many of each pool's latest calls to each carrier `GET /v1/pools` counts",
        default=100,
        ge=10,
        le=1000,
    )


@section
class ConversionConfig:
    mode: str = setting(
        "`report`: a destination block, carrier or country whose conversion falls too low "
        "gets an alert, a metric and a log line; `block`: also, new verifications to it are "
        "refused with `429 destination_suspended`",
        details="See [Conversion watch](caller-health.md#conversion-watch)",
        default="report",
        choices=("report", "block"),
    )
    min_rate: float = setting(
        "conversion (approved over created) under which a target is flagged",
        default=0.2,
        gt=0,
        le=1,
    )
    min_verifications: int = setting(
        "the least verifications created in the window before a target's conversion counts",
        default=50,
        ge=1,
        le=1_000_000,
    )
    window_seconds: int = setting(
        "the sliding window conversion is counted over", default=3600, ge=60, le=7 * 86400
    )
    grace_seconds: int = setting(
        "verifications younger than this are not counted yet: their users may still be "
        "typing the code",
        default=60,
        ge=0,
        le=3600,
    )
    block_seconds: int = setting(
        "in `block` mode, how long a flagged target refuses new verifications unless an "
        "admin lifts its alert first (`DELETE /v1/alerts/{id}`)",
        default=3600,
        ge=60,
        le=30 * 86400,
    )


@section
class AlertsConfig:
    url: str | None = setting(
        "where the gateway posts its operator alerts (a pool quarantined or restored, a "
        "destination flagged), signed like webhooks with `webhooks.secret`",
        default=None,
        empty="alerts are logged and listed by `GET /v1/alerts` only",
        one_line=True,
        also="an http or https URL; needs `webhooks.secret`",
        example="https://ops.example.com/otp-alerts",
    )
    timeout_seconds: float = setting(
        "per post attempt; a failed post is tried again, 6 times in all, waiting 2 s, then "
        "twice as long each time",
        default=10.0,
        gt=0,
        le=60,
    )


@section
class CallsConfig:
    ring_seconds: int = setting(
        "how long the phone rings before the gateway hangs up, counted from alerting: the "
        "first 180, or a 183 before it",
        default=8,
        ge=1,
        le="max_ring_seconds",
    )
    max_ring_seconds: int = setting(
        "the most a request's `ring_seconds` may ask for",
        details="With `max_post_dial_seconds` it bounds the shutdown drain",
        default=15,
        ge=1,
        le=MAX_RING_SECONDS,
    )
    # Originate's Timeout is this plus the ring time.
    max_post_dial_seconds: int = setting(
        "how long a call may wait for alerting (post-dial delay; 3-8 s is common on mobile "
        "networks), then it ends `no_alerting`",
        details=(
            "A call that has not alerted this long plus its ring time after its INVITE "
            "(Asterisk's DialBegin; the Originate's time if the event filter lacks DialBegin) "
            "is hung up"
        ),
        default=15,
        ge=0,
        le=MAX_POST_DIAL_SECONDS,
    )
    max_concurrent: int = setting(
        "calls up at once, ringing or waiting for alerting, per node and per gateway: your "
        "trunk's channel limit",
        details=(
            "A node's own `max_concurrent` overrides it. It must cover `max_per_second` times "
            "(post-dial delay + ring time): 10/s times (6 s + 8 s) needs 140"
        ),
        default=150,
        ge=1,
        le=MAX_CONCURRENT_CALLS,
    )
    max_per_second: float = setting(
        "Originate actions per second, per node and per gateway: your trunk's CPS limit",
        details=(
            "A node's own `max_per_second` overrides it. Above the limit carriers answer 486 "
            "or 503 in bursts"
        ),
        default=10.0,
        gt=0,
        le=MAX_CALLS_PER_SECOND,
    )
    max_queue: int = setting(
        "calls waiting for a slot beyond this are refused with `503 overloaded`",
        details=(
            "A queue that would take minutes to drain only makes every user wait past "
            "their code's use"
        ),
        default=1000,
        ge=1,
    )
    pbx_wait_seconds: float = setting(
        "while AMI to every node is down, a queued call waits this long for one, then fails "
        "`pbx_unavailable`; once every node has been down this long, creates answer "
        "`503 pbx_unavailable`",
        details="0: refused as soon as the last node is down",
        default=10.0,
        ge=0,
        le=300,
    )


@section
class VoiceConfig:
    caller_id: str | None = setting(
        "the number voice calls show: the operator's published number, not a pool's",
        default=None,
        empty="voice calls are refused with `422`",
        pattern=E164_NUMBER,
        example="+622180001000",
    )
    cli_format: str = setting(
        "how `caller_id` is handed to Asterisk, as a pool's `cli_format` hands its caller IDs",
        default="e164",
        choices=DIAL_FORMATS,
    )
    context: str = setting(
        "the dialplan context a voice call runs in once answered, as in "
        "`asterisk-config/extensions.conf`",
        default="otp-voice",
        pattern=DIALPLAN_CONTEXT,
    )
    locales: tuple[str, ...] = setting(
        "the locales whose prompts are installed on the PBX (`asterisk-config/prompts.sh`): "
        "the languages a voice call can speak",
        default=("en", "id"),
        nonempty=True,
        pattern=LOCALE,
        also="no two equal",
    )
    default_locale: str = setting(
        "the locale of a request that names none", default="en", also="one of `voice.locales`"
    )
    repeat: int = setting(
        "how many times a voice call says the code", default=3, ge=1, le=MAX_VOICE_REPEAT
    )
    max_seconds: int = setting(
        "the longest a voice call lasts once answered: the gateway hangs it up then, whatever "
        "the dialplan does",
        default=30,
        ge=5,
        le=MAX_VOICE_SECONDS,
    )
    ring_seconds: int = setting(
        "how long a voice call rings, counted from alerting, before it ends `no_answer`",
        default=30,
        ge=5,
        le=MAX_RING_SECONDS,
    )
    fallback_after_seconds: int | None = setting(
        "the default of a request's `fallback_after_seconds`: how long after a delivered "
        "flash call that was not checked the next channel starts; empty (`null`): never",
        default=60,
        ge=0,
        le=MAX_VOICE_WAIT_SECONDS,
    )
    next_min_gap_seconds: int = setting(
        "the least time between two `POST /v1/verifications/{id}/next` of one verification; "
        "one asked sooner gets `429`",
        default=30,
        ge=0,
        le=MAX_VOICE_WAIT_SECONDS,
    )
    per_phone_per_hour: int = setting(
        "voice calls to one phone per rolling hour: each is billed",
        default=2,
        ge=1,
        le=MAX_VOICE_PER_PHONE_PER_HOUR,
    )
    per_phone_per_day: int = setting(
        "voice calls to one phone per rolling 24 hours",
        default=5,
        ge="per_phone_per_hour",
        le=MAX_VOICE_PER_PHONE_PER_DAY,
    )
    key_daily_calls: int = setting(
        "voice calls per API key per rolling 24 hours: each key's voice budget",
        default=1000,
        ge=1,
        le=MAX_VOICE_KEY_DAILY_CALLS,
    )


@section
class VerificationConfig:
    ttl_seconds: int = setting("a pending verification expires after this", default=300, ge=30)
    max_attempts: int = setting("wrong codes before `max_attempts_reached`", default=5, ge=1, le=20)


@section
class EarlyMediaConfig:
    """Where a 183 (early media) with no 180 counts as the phone alerting.

    Empty (the default): nowhere. A lone 183 is then `progress_only`, not delivered."""

    regions: tuple[str, ...] = setting(
        "destination regions where it does, e.g. `[ID]`", default=(), pattern=REGION
    )
    carriers: tuple[str, ...] = setting(
        "carriers whose 183 does, named as `GET /v1/numbers/{phone}` names them, e.g. "
        "`[Telkomsel]`",
        default=(),
    )

    def applies(self, region: str, carrier: str | None) -> bool:
        return region in self.regions or (carrier is not None and carrier in self.carriers)


@section
class NumbersConfig:
    default_region: str = setting(
        "region for national input such as `081234567890`",
        default="ID",
        pattern=Format(REGION.regex, "an ISO 3166 alpha-2 code such as ID"),
    )
    allowed_regions: tuple[str, ...] = setting(
        "destination regions the gateway calls", default=("ID",), nonempty=True, pattern=REGION
    )
    allowed_types: tuple[str, ...] = setting(
        "number types the gateway calls, as phonenumbers types them",
        default=("mobile", "fixed_line_or_mobile"),
        choices=NUMBER_TYPES,
    )
    refuse_invalid_days: int = setting(
        "a number the network reported invalid is refused this many days, then tried once "
        "more; `0` never refuses",
        default=30,
        ge=0,
        le=3650,
    )
    blocked_prefixes: tuple[str, ...] = setting(
        'E.164 prefixes never called, such as `["+62809"]`: revenue-share and test ranges',
        default=(),
        pattern=Format(_E164ISH, "+ followed by digits, e.g. +62809"),
    )
    early_media_is_alerting: EarlyMediaConfig = setting(
        "where a 183 with no 180 means the phone rings (a personal ringback tone): there a "
        "lone 183 counts as a 180 (`delivered`, not `progress_only`)",
        default=EarlyMediaConfig(),
    )


@section
class Window:
    """At most `count` events in any `seconds`."""

    # Written inline in YAML and in the reference: {count: N, seconds: S}.
    inline: ClassVar[bool] = True

    count: int = setting("at most this many", ge=1)
    seconds: int = setting("in any this many seconds", ge=1, le=MAX_WINDOW_SECONDS, hint="31 days")


_PER_KEY = "the limit per key"


@section
class LimitsConfig:
    per_phone: tuple[Window, ...] = setting(
        "calls to one number: phone bombing", default=(Window(3, 600), Window(10, 86400))
    )
    per_prefix: tuple[Window, ...] = setting(
        "calls to numbers equal but for their last `prefix_hidden_digits` digits: range "
        "walking, toll fraud",
        default=(Window(20, 3600),),
    )
    prefix_hidden_digits: int = setting(
        "how many trailing digits `per_prefix` ignores", default=4, ge=1, le=8
    )
    global_calls: tuple[Window, ...] = setting(
        "a ceiling on all calls, whoever asks: the operator's bill",
        default=(Window(3000, 60),),
    )
    key_requests_per_minute: int = setting(
        "requests of any kind per API key per minute", default=600, ge=1
    )
    key_daily_calls: int = setting(
        "calls per API key per rolling 24 hours: a budget",
        details="Counted by the minute: a call counts until its minute leaves the window",
        default=10_000,
        ge=1,
    )
    # 20 per 30 days leaves a 4-digit code 1 chance in 500 a month (check-config).
    failed_checks_per_phone_per_day: int = setting(
        "wrong codes against one phone, across its verifications, with one API key, per "
        "rolling day",
        default=10,
        ge=1,
    )
    failed_checks_per_phone_per_day_all_keys: int = setting(
        "the same with any key: a higher ceiling, which another service's users reach only "
        "together, so that they cannot lock the phone out",
        default=30,
        ge="failed_checks_per_phone_per_day",
        hint=_PER_KEY,
    )
    failed_checks_per_phone_per_30_days: int = setting(
        "wrong codes against one phone with one API key per rolling 30 days; past it checks "
        "get 429 until the window passes or an admin key calls "
        "`DELETE /v1/numbers/{phone}/failed-checks`",
        details=(
            "This bounds the guessing odds, which `check-config` prints: see "
            "[Guessing odds and code length](security.md#guessing-odds-and-code-length)"
        ),
        default=20,
        ge=1,
    )
    failed_checks_per_phone_per_30_days_all_keys: int = setting(
        "the same with any key",
        default=60,
        ge="failed_checks_per_phone_per_30_days",
        hint=_PER_KEY,
    )


@section
class SecurityConfig:
    code_secret: str = setting(
        "key of the HMAC that stores codes: a leaked database then reveals no code",
        details=(
            "It also seals the code a later step (a voice call) must say. Changing it makes "
            "the codes of pending verifications fail their checks, and their later steps fail"
        ),
        secret=True,
        env="OTP_CODE_SECRET",
        min_length=16,
        hint="use a long random string",
    )


@section
class WebhooksConfig:
    secret: str | None = setting(
        "Standard Webhooks secret, `whsec_` followed by base64; without it a request with a "
        "`callback_url` is refused with `400`",
        details='Make one with `echo "whsec_$(openssl rand -base64 32)"`',
        default=None,
        secret=True,
        env="OTP_WEBHOOK_SECRET",
        empty="webhooks off",
        also=f"decodes to at least {MIN_WEBHOOK_SECRET_BYTES} bytes",
    )
    timeout_seconds: float = setting("per delivery attempt", default=5.0, gt=0, le=60)
    retry_base_seconds: float = setting(
        "the first retry's delay; it doubles each time, with jitter, to at most an hour",
        default=5.0,
        gt=0,
        le=3600,
    )
    give_up_seconds: int = setting(
        "stop retrying this long after the event", default=86400, ge=60, le=7 * 86400
    )
    allowed_networks: tuple[str, ...] = setting(
        "networks (CIDRs) a receiver may be in although they are not globally routable, for a "
        "receiver on this host or the LAN; any API key can then have the gateway post there",
        details=(
            "Empty: webhooks reach public addresses only. `check-config` warns when it is set"
        ),
        default=(),
        also="each a network in CIDR notation",
        example=("127.0.0.1/32", "10.20.0.0/16"),
    )

    def reaches(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether a delivery may connect to `address`: one in allowed_networks, or a
        globally routable one that carries no inside IPv4 address (NAT64, 6to4)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 on the wire
        if any(address in ipaddress.ip_network(n, strict=False) for n in self.allowed_networks):
            return True
        carried = []
        if isinstance(address, ipaddress.IPv6Address):
            if any(address in prefix for prefix in NAT64_PREFIXES):
                carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
            if address.sixtofour is not None:
                carried.append(address.sixtofour)
        return all(a.is_global and not a.is_multicast for a in (address, *carried))


@section
class LoggingConfig:
    format: str = setting(
        "`auto`: JSON lines unless stderr is a terminal", default="auto", choices=LOG_FORMATS
    )
    level: str = setting("the least severe level logged", default="info", choices=LOG_LEVELS)


@section
class InstanceConfig:
    name: str = setting(
        "this gateway among those sharing a database: the owner of the calls it places, in "
        "the logs, metrics and the dashboard; give each gateway its own",
        default="",
        empty="host name and `http.port`, e.g. `gw1:8080`",
        pattern=INSTANCE_NAME,
    )
    lease_seconds: float = setting(
        "the gateway renews a lease in the database every third of this; when it stops "
        "(killed, or cut off), another gateway adopts its calls this long after its last "
        "renewal",
        details="See [Running more than one](operations.md#running-more-than-one)",
        default=10.0,
        ge=MIN_LEASE_SECONDS,
        le=MAX_LEASE_SECONDS,
    )


@section
class Config:
    """The whole file, its sections in the order the example and the reference show
    them; the required ones are keyword-only. A section's description heads it there."""

    http: HttpConfig = setting(
        "The API's listener, and the operator routes' own", default=HttpConfig()
    )
    database: DatabaseConfig = setting(
        "Where the state lives: a SQLite file for one gateway, or a PostgreSQL database "
        "several gateways share (see [Running more than one]"
        "(operations.md#running-more-than-one))",
        default=DatabaseConfig(),
    )
    asterisk: AsteriskConfig = setting(
        "Asterisk, over AMI. With `nodes`, the mapping's `host`, `port`, `username`, "
        "`secret` and `channel` are each node's defaults; `dial_format` and "
        "`settle_seconds` are the mapping's only",
        kw_only=True,
    )
    pools: tuple[PoolConfig, ...] = setting(
        "The caller IDs. A verification uses a pool that names the destination's region (or, "
        "when none does, one that names no region), chosen by weight among those healthy for "
        "the destination's carrier",
        nonempty=True,
        example=(PoolConfig("default", prefix="+6221500"),),
        kw_only=True,
    )
    calls: CallsConfig = setting(
        "Calls. A typical trunk contract: 10 calls per second (CPS), and channels for 10/s "
        "times post-dial delay plus ring (6 s + 8 s). Above the carrier's limits calls come "
        "back 486 or 503: set `max_per_second` and `max_concurrent` from your contract",
        default=CallsConfig(),
    )
    voice: VoiceConfig = setting(
        "Voice calls: when a flash call cannot land, the gateway can place a call that speaks "
        "the verification's code in the user's language (the dialplan context `otp-voice`). "
        "Off while `caller_id` is unset",
        default=VoiceConfig(),
    )
    caller_health: CallerHealthConfig = setting(
        "Pool health: the gateway learns, per pool and carrier, which caller-ID ranges stop "
        "reaching a carrier, quarantines them while another pool delivers, and probes them",
        default=CallerHealthConfig(),
    )
    conversion: ConversionConfig = setting(
        "Conversion watch: destination blocks, carriers and countries whose verifications are "
        "created and rarely approved (traffic pumping) are flagged, and in `block` mode refused",
        default=ConversionConfig(),
    )
    alerts: AlertsConfig = setting(
        "Operator alerts: pool health changes and conversion flags", default=AlertsConfig()
    )
    verification: VerificationConfig = setting(
        "Verifications: how long a code lives, how many guesses it allows",
        default=VerificationConfig(),
    )
    numbers: NumbersConfig = setting(
        "Which destinations the gateway calls", default=NumbersConfig()
    )
    limits: LimitsConfig = setting(
        "Abuse limits. Each answers `429 rate_limited` with `Retry-After`, without saying "
        "which fired. Calls are counted in the database, so the limits hold across a restart "
        "(the per-key request rate is counted in memory). A window is "
        "`{count: N, seconds: S}`: at most N in any S seconds; an empty list turns a "
        "windowed limit off",
        default=LimitsConfig(),
    )
    security: SecurityConfig = setting(
        "What keeps stored codes secret",
        kw_only=True,
    )
    webhooks: WebhooksConfig = setting(
        "Webhooks to a request's `callback_url`, signed the Standard Webhooks way",
        default=WebhooksConfig(),
    )
    logging: LoggingConfig = setting(
        "Logs go to stderr: JSON lines when stderr is not a terminal (systemd, containers), "
        "readable lines when it is",
        default=LoggingConfig(),
    )
    instance: InstanceConfig = setting(
        "Several gateways on one PostgreSQL database: each one's name and lease (see "
        "[Running more than one](operations.md#running-more-than-one))",
        default=InstanceConfig(),
    )
    test_numbers: dict[str, str] = setting(
        "Sandbox: E.164 phone to fixed code, both quoted. Verifications to these phones are "
        "never dialed and accept that code (client-app QA, store reviews); `check-config` "
        "warns while it is set",
        details="See [Sandbox numbers](../api/concepts.md#sandbox-numbers-test_numbers)",
        default_factory=dict,
        empty="off",
        also="each phone an E.164 number a pool serves, its code as long as that pool's codes",
        example={"+6281200000001": "1234"},
    )


def load(path: str | Path, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Read, interpolate and validate a YAML file; raise ConfigError listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return parse(text, os.environ if environ is None else environ)


def parse(text: str, environ: typing.Mapping[str, str]) -> Config:
    """Validate YAML text into a Config; raise ConfigError listing every problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"]) from None
    problems: list[str] = []
    config = _build(Config, {} if raw is None else raw, "", environ, problems)
    if not problems:
        problems.extend(_check(config))
    if problems:
        raise ConfigError(problems)
    return typing.cast(Config, config)


def _build(
    kind: Any, raw: Any, path: str, environ: typing.Mapping[str, str], problems: list[str]
) -> Any:
    """Convert `raw` to `kind`, appending a key-path message per problem."""
    where = path or "(top level)"
    before = len(problems)
    if isinstance(raw, str) and _ENV_REF.search(raw):
        raw = _interpolate(raw, where, environ, problems)
        if kind in (int, float, bool):
            # "${PORT}" stands for a number: read the substituted text as YAML would.
            with contextlib.suppress(yaml.YAMLError):
                raw = yaml.safe_load(raw)
    if isinstance(kind, type) and is_dataclass(kind):
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping")
            return None
        known = {f.name: f for f in fields(kind)}
        for key in raw:
            if key not in known:
                problems.append(f"{_join(path, str(key))}: unknown key")
        hints = typing.get_type_hints(kind)
        values = {}
        for name, spec in known.items():
            key_path = _join(path, name)
            if name in raw:
                values[name] = _build(hints[name], raw[name], key_path, environ, problems)
            elif spec.default is MISSING and spec.default_factory is MISSING:
                problems.append(f"{key_path}: required")
        return None if len(problems) > before else kind(**values)
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        # An optional value left empty ("${OTP_WEBHOOK_SECRET:-}" unset) is absent.
        return None if raw in (None, "") else _build(options[0], raw, path, environ, problems)
    if origin is dict:
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a mapping")
            return None
        key_kind, value_kind = typing.get_args(kind)
        return {
            _build(key_kind, k, f"{path}[{k!r}]", environ, problems): _build(
                value_kind, v, f"{path}[{k!r}]", environ, problems
            )
            for k, v in raw.items()
        }
    if origin is tuple:
        if not isinstance(raw, list):
            problems.append(f"{where}: must be a list")
            return None
        item_kind = typing.get_args(kind)[0]
        items = [
            _build(item_kind, item, f"{path}[{i}]", environ, problems) for i, item in enumerate(raw)
        ]
        return tuple(items)
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if kind is str and isinstance(raw, int | float) and not isinstance(raw, bool):
        problems.append(f'{where}: must be a string (quote it: "{raw}")')
        return None
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        problems.append(f"{where}: must be {_type_name(kind)}, not {_type_name(type(raw))}")
        return None
    return raw


def _interpolate(
    value: str, where: str, environ: typing.Mapping[str, str], problems: list[str]
) -> str:
    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(f"{where}: environment variable {name} is not set")
        return ""

    return _ENV_REF.sub(substitute, value)


def _check(config: Config) -> list[str]:
    """Every rule: each key's own (its setting()), then those that span keys."""
    problems = _check_settings(config, "")

    def need(ok: bool, path: str, message: str) -> None:
        if not ok:
            problems.append(f"{path}: {message}")

    http = config.http
    need(http.operator_port != http.port, "http.operator_port", "must differ from http.port")
    problems.extend(_check_database(config.database))
    problems.extend(_check_asterisk(config.asterisk, config.pools))
    problems.extend(_check_voice(config.voice))
    hooks = config.webhooks
    if hooks.secret is not None:
        try:
            Webhook(hooks.secret)
        except Exception:  # the library raises several kinds for a bad secret
            problems.append("webhooks.secret: must be whsec_ followed by base64")
        else:
            # Decoded as the library does: the prefix off, padding added.
            decoded = base64.b64decode(hooks.secret.removeprefix("whsec_") + "==")
            need(
                len(decoded) >= MIN_WEBHOOK_SECRET_BYTES,
                "webhooks.secret",
                f"must decode to at least {MIN_WEBHOOK_SECRET_BYTES} bytes, not {len(decoded)} "
                '(make one with: echo "whsec_$(openssl rand -base64 32)")',
            )
    if config.alerts.url is not None:
        need(
            urllib.parse.urlsplit(config.alerts.url).scheme in ("http", "https")
            and bool(urllib.parse.urlsplit(config.alerts.url).hostname),
            "alerts.url",
            "must be an http or https URL",
        )
        need(
            hooks.secret is not None,
            "alerts.url",
            "needs webhooks.secret: alerts are signed like webhooks",
        )
    for i, network in enumerate(hooks.allowed_networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.append(
                f"webhooks.allowed_networks[{i}]: must be a network in CIDR notation, "
                "e.g. 127.0.0.1/32 or 10.20.0.0/16"
            )

    names = [p.name for p in config.pools]
    for i, pool in enumerate(config.pools):
        at = f"pools[{i}]"
        need(names.count(pool.name) == 1, f"{at}.name", f"duplicate pool name {pool.name!r}")
        if (pool.prefix is None) == (not pool.numbers):
            problems.append(f"{at}: set either prefix or numbers, not both")
        if pool.prefix is not None:
            need(
                len(pool.prefix) - 1 + pool.code_length <= 15,
                f"{at}",
                "prefix plus code_length is longer than an E.164 number (15 digits)",
            )
        if len(set(pool.numbers)) != len(pool.numbers):
            problems.append(f"{at}.numbers: has duplicates")
        codes = {n[-pool.code_length :] for n in pool.numbers}
        if pool.numbers and len(codes) != len(pool.numbers):
            problems.append(
                f"{at}.numbers: two numbers share their last "
                f"{pool.code_length} digits, so their codes collide"
            )
        for j, region in enumerate(pool.regions):
            need(
                region in config.numbers.allowed_regions,
                f"{at}.regions[{j}]",
                "is not in numbers.allowed_regions",
            )
        if not 0 < pool.code_length <= 15:
            continue  # no entropy to speak of (and 10**-400 is 0, 10**3000000 is slow)
        if pool.codes < MIN_POOL_CODES and not pool.allow_low_entropy:
            problems.append(
                f"{at}: only {pool.codes} codes ({entropy_bits(pool):.1f} bits); at least "
                f"{MIN_POOL_CODES} are needed, or set allow_low_entropy: true"
            )
    problems.extend(_check_test_numbers(config))
    return problems


def _check_settings(section: Any, path: str) -> list[str]:
    """The rules declared with each key's setting(), in `section` (a dataclass at `path`)
    and the sections, lists of sections and list items below it: one problem per key."""
    problems: list[str] = []
    for spec in fields(section):
        value = getattr(section, spec.name)
        if value is None:
            continue  # an optional key left out
        about, at = setting_of(spec), _join(path, spec.name)
        problem = about.problem(value, section, path)
        if problem:
            problems.append(f"{at}: {problem}")
        if is_dataclass(value):
            problems.extend(_check_settings(value, at))
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                if is_dataclass(item):
                    problems.extend(_check_settings(item, f"{at}[{i}]"))
                elif problem := about.item_problem(item):
                    problems.append(f"{at}[{i}]: {problem}")
    return problems


def _check_test_numbers(config: Config) -> list[str]:
    """Each sandbox phone is a normalised E.164 number in an allowed region, and its
    code has the length of the codes of the pool that serves it."""
    problems = []
    for phone, code in config.test_numbers.items():
        at = f"test_numbers[{phone!r}]"
        try:
            parsed = phonenumbers.parse(phone)
        except phonenumbers.NumberParseException:
            parsed = None
        if parsed is None or phonenumbers.format_number(parsed, E164) != phone:
            problems.append(f"{at}: must be an E.164 number such as +6281200000001 (quoted)")
            continue
        region = phonenumbers.region_code_for_number(parsed)
        pool = None
        if region is not None and region in config.numbers.allowed_regions:
            pool = next(iter(pools_for(config.pools, region)), None)
        if pool is None:
            problems.append(f"{at}: no pool serves its region {region}")
        elif not (code.isascii() and code.isdigit() and len(code) == pool.code_length):
            problems.append(
                f"{at}: the code must be {pool.code_length} digits, the code length "
                f"of pool {pool.name} that serves it"
            )
    return problems


class _ServesRegions(typing.Protocol):
    @property
    def regions(self) -> typing.Collection[str]: ...


_P = TypeVar("_P", bound=_ServesRegions)


def pools_for(pools: typing.Sequence[_P], region: str) -> list[_P]:
    """The pools a destination in `region` may use: those that name the region, or when
    none does, those that name no region (serve every allowed one); in config order."""
    named = [p for p in pools if region in p.regions]
    return named or [p for p in pools if not p.regions]


def _check_voice(voice: VoiceConfig) -> list[str]:
    """The locales' rules across keys: no two equal, the default one of them."""
    problems: list[str] = []
    if len(set(voice.locales)) != len(voice.locales):
        problems.append("voice.locales: has duplicates")
    if voice.default_locale not in voice.locales:
        problems.append(
            f"voice.default_locale: {voice.default_locale!r} is not in voice.locales "
            "(the locales whose prompts the PBX has)"
        )
    return problems


def shutdown_seconds(config: Config) -> float:
    """The longest a SIGTERM may take: ringing calls end (post-dial delay, ring time and
    a grace), then the requests still in flight are answered. systemd's TimeoutStopSec
    and Compose's stop_grace_period must be longer, or calls are cut off."""
    calls, voice = config.calls, config.voice
    # A voice call rings, then talks on once answered (voice.max_seconds).
    longest_call = max(calls.max_ring_seconds, voice.ring_seconds + voice.max_seconds)
    return (
        calls.max_post_dial_seconds
        + longest_call
        + SHUTDOWN_GRACE_S
        + config.http.request_timeout_seconds
    )


def entropy_bits(pool: PoolConfig) -> float:
    """log2 of the number of codes a pool can present."""
    return math.log2(pool.codes)


def wrong_codes_per_30_days(limits: LimitsConfig, per_key: bool) -> int:
    """The most wrong codes the limits let through against one phone in 30 days: with
    one API key, or with any number of them."""
    if per_key:
        return min(
            limits.failed_checks_per_phone_per_30_days, 30 * limits.failed_checks_per_phone_per_day
        )
    return min(
        limits.failed_checks_per_phone_per_30_days_all_keys,
        30 * limits.failed_checks_per_phone_per_day_all_keys,
    )


def guessing_odds(codes: int, attempts: int, guesses: int) -> float:
    """The chance that `guesses` wrong codes find a code among `codes`, spent `attempts`
    at a time: each verification has a new code, so the guesser at best tries `attempts`
    different codes against each, 1 - (1 - a/N)^(g // a) * (1 - (g % a)/N)."""
    full, rest = divmod(guesses, attempts)
    miss = (1 - min(attempts, codes) / codes) ** full * (1 - min(rest, codes) / codes)
    return 1 - miss


def _odds(chance: float) -> str:
    return f"1 in {round(1 / chance)} ({100 * chance:.3g}%)" if chance > 0 else "none"


def _check_asterisk(ami: AsteriskConfig, pools: tuple[PoolConfig, ...] = ()) -> list[str]:
    """What spans the nodes: channels (the pools' too), names and AMI addresses unique.
    Each key's own rules (a node's where it is written) are its setting()'s."""
    problems: list[str] = []
    channels = {"asterisk.channel": ami.channel} | {
        f"asterisk.nodes[{i}].channel": node.channel for i, node in enumerate(ami.nodes)
    }
    channels |= {f"pools[{i}].channel": pool.channel for i, pool in enumerate(pools)}
    for path, channel in channels.items():
        if channel is None:
            continue
        if "{number}" not in channel:
            problems.append(f"{path}: must contain {{number}}")
        # The AMI filter passes the events of channels whose Uniqueid starts with otp-;
        # a Local/ channel's far leg has a Uniqueid of its own, and its events never come.
        if not channel.startswith("PJSIP/"):
            problems.append(f"{path}: must be a PJSIP channel, PJSIP/{{number}}@<endpoint>")
    names: dict[str, str] = {}
    addresses: dict[tuple[str, int], str] = {}
    for i, node in enumerate(ami.nodes):
        path = f"asterisk.nodes[{i}]"
        if node.name in names:
            problems.append(f"{path}.name: {node.name!r} is also {names[node.name]}'s name")
        names.setdefault(node.name, path)
        address = (node.host or ami.host, node.port or ami.port)
        if address in addresses:
            problems.append(
                f"{path}: {address[0]}:{address[1]} is also {addresses[address]}'s AMI address"
            )
        addresses.setdefault(address, path)
    return problems


def nodes(config: Config) -> tuple[AsteriskNode, ...]:
    """The Asterisk nodes, each key resolved: asterisk.nodes, or the asterisk mapping."""
    ami, calls = config.asterisk, config.calls
    return tuple(
        AsteriskNode(
            name=node.name,
            host=node.host or ami.host,
            port=node.port or ami.port,
            username=node.username or ami.username,
            secret=node.secret or ami.secret,
            channel=node.channel or ami.channel,
            settle_seconds=ami.settle_seconds,
            max_per_second=node.max_per_second or calls.max_per_second,
            max_concurrent=node.max_concurrent or calls.max_concurrent,
        )
        for node in ami.nodes or (NodeConfig(ami.name),)
    )


def instance_name(config: Config) -> str:
    """This gateway's name: instance.name, or its host name and API port."""
    return config.instance.name or f"{socket.gethostname()}:{config.http.port}"


def database_url(database: DatabaseConfig) -> str:
    """What the gateway opens: `url`, or the SQLite file at `path` (the older spelling)."""
    return SQLITE_SCHEME + database.path if database.path else database.url


def redacted(url: str) -> str:
    """`url` without its password, for logs and messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc}"))


def _check_database(database: DatabaseConfig) -> list[str]:
    problems: list[str] = []
    url = database.url
    if database.path and url != DEFAULT_DATABASE_URL:
        problems.append("database.path: the older spelling of database.url; set only url")
    if url.startswith(SQLITE_SCHEME):
        if not url.removeprefix(SQLITE_SCHEME):
            problems.append("database.url: sqlite:/// needs a file (sqlite:///var/gateway.sqlite3)")
        return problems
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        problems.append(
            "database.url: must be sqlite:///FILE or postgresql://USER:PASSWORD@HOST:PORT/DB"
        )
        return problems
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.hostname:
        problems.append("database.url: names no host (postgresql://USER:PASSWORD@HOST:PORT/DB)")
    if port is not None and not 1 <= port <= 65535:
        problems.append("database.url: the port must be a number 1-65535")
    if not parts.path.strip("/"):
        problems.append("database.url: names no database (postgresql://...:PORT/DB)")
    if not url.isprintable() or any(c.isspace() for c in url):
        problems.append("database.url: must be one line without spaces")
    return problems


def summary(config: Config) -> list[str]:
    """Human lines describing a valid config, without any secret."""
    lines = [
        f"http: {config.http.host}:{config.http.port}, operator routes (/metrics, "
        f"/dashboard) on {config.http.operator_host}:{config.http.operator_port}, "
        f"at most {config.http.max_connections} connections",
        f"database: {redacted(database_url(config.database))}, "
        + (
            f"finished verifications kept {config.database.retention_days} days"
            if config.database.retention_days
            else "kept for ever"
        ),
        f"shutdown: up to {shutdown_seconds(config):g}s after SIGTERM (systemd "
        "TimeoutStopSec and Compose stop_grace_period must be longer)",
        *(
            f"asterisk node {node.name}: {node.username}@{node.host}:{node.port}, "
            f"channel {node.channel}, {node.max_per_second:g} calls/s, "
            f"{node.max_concurrent} at once"
            for node in nodes(config)
        ),
        f"asterisk: dial format {config.asterisk.dial_format}",
        f"calls: ring {config.calls.ring_seconds}s (max {config.calls.max_ring_seconds}s) "
        f"after up to {config.calls.max_post_dial_seconds}s of post-dial delay, "
        f"{config.calls.max_per_second:g}/s, {config.calls.max_concurrent} at once",
        f"numbers: default region {config.numbers.default_region}, "
        f"allowed regions {', '.join(config.numbers.allowed_regions)}, "
        f"types {', '.join(config.numbers.allowed_types)}",
        _voice_summary(config.voice),
    ]
    if config.http.operator_host not in ("127.0.0.1", "::1", "localhost"):
        lines.append(
            f"warning: operator routes listen on {config.http.operator_host}: /metrics names "
            "API keys; let only the operator's network reach that port"
        )
    if config.webhooks.secret is not None and config.webhooks.allowed_networks:
        lines.append(
            "warning: webhooks.allowed_networks lets callback URLs reach "
            f"{', '.join(config.webhooks.allowed_networks)}: any API key can have the "
            "gateway post there"
        )
    limits, attempts = config.limits, config.verification.max_attempts
    lines.append(
        "limits: wrong codes per phone: per API key "
        f"{limits.failed_checks_per_phone_per_day} a day and "
        f"{limits.failed_checks_per_phone_per_30_days} per 30 days; across keys "
        f"{limits.failed_checks_per_phone_per_day_all_keys} a day and "
        f"{limits.failed_checks_per_phone_per_30_days_all_keys} per 30 days"
    )
    for pool in config.pools:
        source = (
            pool.prefix + "X" * pool.code_length if pool.prefix else f"{len(pool.numbers)} numbers"
        )
        regions = ", ".join(pool.regions) or "all allowed regions"
        lines.append(
            f"pool {pool.name}: {source}, {pool.codes} codes ({entropy_bits(pool):.1f} bits), "
            f"serves {regions}"
        )
        if pool.codes < MIN_POOL_CODES:
            chance = config.verification.max_attempts / pool.codes
            lines.append(
                f"  warning: allow_low_entropy is set: a guesser with "
                f"{config.verification.max_attempts} attempts wins 1 time in "
                f"{1 / min(chance, 1):.0f}; use this pool only where that risk is accepted"
            )
        one_key, any_key = (
            guessing_odds(pool.codes, attempts, wrong_codes_per_30_days(limits, per_key))
            for per_key in (True, False)
        )
        lines.append(
            f"  guessing one phone's code: {_odds(one_key)} per 30 days through one API key, "
            f"{_odds(any_key)} through any number of keys"
        )
        # Every call to another phone: the per-phone limits never apply.
        per_call = min(attempts, limits.failed_checks_per_phone_per_day, pool.codes)
        lines.append(
            f"  guessing at large: one API key's {limits.key_daily_calls} calls a day, each to "
            f"another phone, find about {limits.key_daily_calls * per_call / pool.codes:.3g} "
            "codes a day"
        )
    if config.test_numbers:
        lines.append(
            f"warning: test_numbers is set: {len(config.test_numbers)} phones are never "
            "called and accept a fixed code (sandbox); empty it in production"
        )
    return lines


def _voice_summary(voice: VoiceConfig) -> str:
    if voice.caller_id is None:
        return "voice: off (voice.caller_id is unset: voice calls are refused)"
    fallback = (
        "never" if voice.fallback_after_seconds is None else f"{voice.fallback_after_seconds}s"
    )
    return (
        f"voice: caller ID {voice.caller_id} into context {voice.context}, locales "
        f"{', '.join(voice.locales)} (default {voice.default_locale}), ring "
        f"{voice.ring_seconds}s, at most {voice.max_seconds}s answered, fallback after "
        f"{fallback}; per phone {voice.per_phone_per_hour} an hour and "
        f"{voice.per_phone_per_day} a day, per API key {voice.key_daily_calls} a day"
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(kind: Any) -> str:
    names: dict[Any, str] = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        dict: "a mapping",
        list: "a list",
        type(None): "empty",
    }
    return names.get(kind, str(getattr(kind, "__name__", kind)))


def _number(value: float) -> str:
    """A bound as a message shows it: 10, not 10.0."""
    return str(int(value)) if float(value).is_integer() else str(value)
