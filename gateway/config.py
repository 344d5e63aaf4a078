"""YAML configuration to frozen dataclasses: defaults, ${ENV} interpolation, key-path errors.

Nothing else in the gateway reads YAML or the environment.
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
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import phonenumbers
import yaml
from phonenumbers import PhoneNumberFormat
from standardwebhooks import Webhook

# A pool below this many codes can be guessed too easily: 1 in 10,000 per attempt,
# five attempts per verification, is the usual floor for a 4-digit OTP.
MIN_POOL_CODES = 10_000
MAX_RING_SECONDS = 60  # no network alerts a handset for longer than this
# Mobile networks take 3-8 s from INVITE to alerting, a roaming phone longer; a minute
# without any alerting is no post-dial delay any more.
MAX_POST_DIAL_SECONDS = 60
# Beyond the longest ring, for Asterisk's hangup and its events to arrive at shutdown.
SHUTDOWN_GRACE_S = 5.0
# The longest limit window a config may set is 31 days: retention never forgets a call
# that a limit still counts.
MIN_RETENTION_DAYS = 31
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
_NODE_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NODE_NAME}}}")
# Far above any one trunk's contract; a typo (a rate of 1e6) is caught instead.
MAX_CALLS_PER_SECOND = 10_000
MAX_CONCURRENT_CALLS = 100_000
DEFAULT_DATABASE_URL = SQLITE_SCHEME + "var/gateway.sqlite3"
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
_E164ISH = re.compile(r"\+[1-9][0-9]{1,14}")
_REGION = re.compile(r"[A-Z]{2}")
E164 = PhoneNumberFormat.E164


class ConfigError(Exception):
    """Every problem found in a configuration, each naming its key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # A request the gateway cannot answer in this time gets a 503, not a hung client.
    request_timeout_seconds: float = 10.0
    # A connection with no request for this long is closed: after a response, and from
    # the connect until its headers are complete (so a client that trickles them too).
    keepalive_seconds: float = 15.0
    # Open API connections at most; beyond it a new one is answered 503 and closed,
    # before the process runs out of file descriptors (AMI and the database need some).
    max_connections: int = 1000
    # /metrics and the dashboard: their own listener, on loopback unless said otherwise.
    operator_host: str = "127.0.0.1"
    operator_port: int = 8081


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    # sqlite:///var/gateway.sqlite3 (a file: one gateway) or
    # postgresql://user:password@host:port/db (shared by many gateways).
    url: str = DEFAULT_DATABASE_URL
    # The older spelling of url: sqlite:///<path>.
    path: str = ""
    # PostgreSQL connections per gateway (the API's concurrent transactions).
    pool_size: int = 10
    # Finished verifications, with their calls, events and webhooks, are deleted this
    # many days after their creation; 0 keeps them for ever.
    retention_days: int = 90


@dataclass(frozen=True, slots=True)
class AsteriskConfig:
    secret: str = field(repr=False)
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "otp-gateway"
    channel: str = "PJSIP/{number}@otp-trunk"
    dial_format: str = "e164_no_plus"
    # Wait after each AMI login before placing calls: Asterisk may still be booting.
    settle_seconds: float = 2.0
    # The node's name (in call.node, logs and metrics) when `nodes` is empty.
    name: str = "asterisk"
    # Several Asterisk nodes: each call goes to a logged-in node with room. Empty: this
    # mapping is the one node.
    nodes: tuple[NodeConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One of asterisk.nodes. A key it leaves out is the asterisk mapping's;
    max_per_second and max_concurrent are calls' (the node's own trunk contract)."""

    name: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    secret: str | None = field(default=None, repr=False)
    channel: str | None = None
    max_per_second: float | None = None
    max_concurrent: int | None = None


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


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    prefix: str | None = None
    code_length: int = 4
    numbers: tuple[str, ...] = ()
    cli_format: str = "e164_no_plus"
    # Destination regions this pool serves; empty means every allowed region.
    regions: tuple[str, ...] = ()
    allow_low_entropy: bool = False

    @property
    def codes(self) -> int:
        """How many different codes the pool can present."""
        return len(self.numbers) if self.numbers else 10**self.code_length


@dataclass(frozen=True, slots=True)
class CallsConfig:
    ring_seconds: int = 8  # counted from alerting (the first 180, or a lone 183)
    max_ring_seconds: int = 15
    # How long a call may wait for alerting (post-dial delay) before it ends no_alerting;
    # Originate's Timeout is this plus the ring time.
    max_post_dial_seconds: int = 15
    # A typical trunk contract: 10 calls per second (CPS), and channels for 10/s times
    # post-dial delay plus ring (6 s + 8 s). Above the carrier's limits calls come back
    # 486 or 503; set both from your contract.
    max_concurrent: int = 150
    max_per_second: float = 10.0
    # Calls waiting for a slot beyond this are refused (503 overloaded): a queue that
    # would take minutes to drain only makes every user wait past their code's use.
    max_queue: int = 1000
    # While AMI is down a queued call waits this long for it, then fails pbx_unavailable;
    # once AMI has been down this long, creates are refused (503 pbx_unavailable).
    pbx_wait_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class VerificationConfig:
    ttl_seconds: int = 300
    max_attempts: int = 5


@dataclass(frozen=True, slots=True)
class EarlyMediaConfig:
    """Where a 183 (early media) with no 180 counts as the phone alerting.

    Empty (the default): nowhere. A lone 183 is then `progress_only`, not delivered."""

    regions: tuple[str, ...] = ()  # ISO 3166 alpha-2 codes of the destination
    carriers: tuple[str, ...] = ()  # carrier names as the number lookup gives them

    def applies(self, region: str, carrier: str | None) -> bool:
        return region in self.regions or (carrier is not None and carrier in self.carriers)


@dataclass(frozen=True, slots=True)
class NumbersConfig:
    default_region: str = "ID"
    allowed_regions: tuple[str, ...] = ("ID",)
    allowed_types: tuple[str, ...] = ("mobile", "fixed_line_or_mobile")
    # A number the network called invalid is refused this long, then tried once more.
    refuse_invalid_days: int = 30
    # Destinations never called (E.164 prefixes): revenue-share ranges, test ranges.
    blocked_prefixes: tuple[str, ...] = ()
    # Carriers whose 183 means the phone rings (a ringback tone, no 180 ever).
    early_media_is_alerting: EarlyMediaConfig = EarlyMediaConfig()


@dataclass(frozen=True, slots=True)
class Window:
    """At most `count` events in any `seconds`."""

    count: int
    seconds: int


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    # Phone bombing: calls to one number.
    per_phone: tuple[Window, ...] = (Window(3, 600), Window(10, 86400))
    # Range walking (toll fraud): calls to numbers sharing all but their last digits.
    per_prefix: tuple[Window, ...] = (Window(20, 3600),)
    prefix_hidden_digits: int = 4
    # A ceiling on all calls, whoever asks: the operator's bill.
    global_calls: tuple[Window, ...] = (Window(3000, 60),)
    # Per API key: requests of any kind per minute, and calls per rolling day.
    key_requests_per_minute: int = 600
    key_daily_calls: int = 10_000
    # Guessing: wrong checks against one phone, across its verifications, made with one
    # API key, per rolling day and per 30 days. The ceilings across keys are higher, so
    # that a stranger guessing through another service cannot lock the owner out.
    # 20 per 30 days leaves a 4-digit code 1 chance in 500 a month (check-config).
    failed_checks_per_phone_per_day: int = 10
    failed_checks_per_phone_per_day_all_keys: int = 30
    failed_checks_per_phone_per_30_days: int = 20
    failed_checks_per_phone_per_30_days_all_keys: int = 60


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    # Key of the HMAC that stores codes; a leaked database then reveals no code.
    code_secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class WebhooksConfig:
    # Standard Webhooks secret ("whsec_" + base64). Without it callback_url is refused.
    secret: str | None = field(default=None, repr=False)
    timeout_seconds: float = 5.0  # per delivery attempt
    retry_base_seconds: float = 5.0  # the first retry's delay; doubles, with jitter
    give_up_seconds: int = 86400  # stop retrying this long after the event
    # Networks (CIDRs) a receiver may be in although they are not globally routable: a
    # receiver on this host or the LAN. Empty: deliveries reach public addresses only.
    allowed_networks: tuple[str, ...] = ()

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


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str = "auto"  # auto: JSON lines unless stderr is a terminal
    level: str = "info"


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    # This gateway's name among those sharing a database: the owner of the calls it
    # places, in logs, metrics and the dashboard. Empty: its host name and http.port.
    name: str = ""
    # It renews a lease in the database every third of this; when it stops renewing
    # (killed, or cut off), the others adopt its calls this long after its last renewal.
    lease_seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class Config:
    asterisk: AsteriskConfig
    pools: tuple[PoolConfig, ...]
    security: SecurityConfig
    http: HttpConfig = HttpConfig()
    database: DatabaseConfig = DatabaseConfig()
    calls: CallsConfig = CallsConfig()
    verification: VerificationConfig = VerificationConfig()
    numbers: NumbersConfig = NumbersConfig()
    limits: LimitsConfig = LimitsConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    logging: LoggingConfig = LoggingConfig()
    instance: InstanceConfig = InstanceConfig()
    # Sandbox: E.164 phone -> fixed code. Verifications to these phones are never
    # dialed and accept that code (client-app QA, store reviews). Empty: off.
    test_numbers: dict[str, str] = field(default_factory=dict)


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
    """Rules that span values: ranges, formats, pools."""
    problems: list[str] = []

    def need(ok: bool, path: str, message: str) -> None:
        if not ok:
            problems.append(f"{path}: {message}")

    http = config.http
    need(1 <= http.port <= 65535, "http.port", "must be 1-65535")
    need(1 <= http.operator_port <= 65535, "http.operator_port", "must be 1-65535")
    need(http.operator_port != http.port, "http.operator_port", "must differ from http.port")
    need(
        0 < http.keepalive_seconds <= 300, "http.keepalive_seconds", "must be above 0, at most 300"
    )
    need(
        1 <= http.max_connections <= MAX_CONNECTIONS,
        "http.max_connections",
        f"must be 1-{MAX_CONNECTIONS}",
    )
    need(
        config.database.retention_days == 0
        or MIN_RETENTION_DAYS <= config.database.retention_days <= 3650,
        "database.retention_days",
        f"must be 0 (keep for ever) or {MIN_RETENTION_DAYS}-3650",
    )
    problems.extend(_check_database(config.database))
    need(
        MIN_LEASE_SECONDS <= config.instance.lease_seconds <= MAX_LEASE_SECONDS,
        "instance.lease_seconds",
        f"must be {MIN_LEASE_SECONDS:g}-{MAX_LEASE_SECONDS:g}",
    )
    need(
        len(config.instance.name) <= MAX_INSTANCE_NAME
        and all(c.isalnum() or c in "-_.:" for c in config.instance.name),
        "instance.name",
        f"at most {MAX_INSTANCE_NAME} letters, digits and - _ . :",
    )
    problems.extend(_check_asterisk(config.asterisk))
    need(
        len(config.security.code_secret) >= 16,
        "security.code_secret",
        "must be at least 16 characters (use a long random string)",
    )

    calls = config.calls
    need(
        1 <= calls.max_ring_seconds <= MAX_RING_SECONDS,
        "calls.max_ring_seconds",
        f"must be 1-{MAX_RING_SECONDS}",
    )
    need(
        1 <= calls.ring_seconds <= calls.max_ring_seconds,
        "calls.ring_seconds",
        "must be between 1 and calls.max_ring_seconds",
    )
    need(
        0 <= calls.max_post_dial_seconds <= MAX_POST_DIAL_SECONDS,
        "calls.max_post_dial_seconds",
        f"must be 0-{MAX_POST_DIAL_SECONDS}",
    )
    need(
        1 <= calls.max_concurrent <= MAX_CONCURRENT_CALLS,
        "calls.max_concurrent",
        f"must be 1-{MAX_CONCURRENT_CALLS}",
    )
    need(calls.max_queue >= 1, "calls.max_queue", "must be at least 1")
    need(0 <= calls.pbx_wait_seconds <= 300, "calls.pbx_wait_seconds", "must be 0 to 300")
    need(
        0 < calls.max_per_second <= MAX_CALLS_PER_SECOND,
        "calls.max_per_second",
        f"must be above 0 and at most {MAX_CALLS_PER_SECOND}",
    )
    need(config.verification.ttl_seconds >= 30, "verification.ttl_seconds", "must be at least 30")
    need(1 <= config.verification.max_attempts <= 20, "verification.max_attempts", "must be 1-20")

    numbers = config.numbers
    need(
        bool(_REGION.fullmatch(numbers.default_region)),
        "numbers.default_region",
        "must be an ISO 3166 alpha-2 code such as ID",
    )
    need(bool(numbers.allowed_regions), "numbers.allowed_regions", "must not be empty")
    need(0 <= numbers.refuse_invalid_days <= 3650, "numbers.refuse_invalid_days", "must be 0-3650")
    for i, prefix in enumerate(numbers.blocked_prefixes):
        need(
            bool(_E164ISH.fullmatch(prefix)),
            f"numbers.blocked_prefixes[{i}]",
            "must be + followed by digits, e.g. +62809",
        )
    need(
        0 < config.http.request_timeout_seconds <= 300,
        "http.request_timeout_seconds",
        "must be above 0 and at most 300",
    )
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
    for i, network in enumerate(hooks.allowed_networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.append(
                f"webhooks.allowed_networks[{i}]: must be a network in CIDR notation, "
                "e.g. 127.0.0.1/32 or 10.20.0.0/16"
            )
    need(0 < hooks.timeout_seconds <= 60, "webhooks.timeout_seconds", "must be above 0, at most 60")
    need(
        0 < hooks.retry_base_seconds <= 3600,
        "webhooks.retry_base_seconds",
        "must be above 0, at most 3600",
    )
    need(
        60 <= hooks.give_up_seconds <= 7 * 86400, "webhooks.give_up_seconds", "must be 60 to 604800"
    )
    limits = config.limits
    for name in ("per_phone", "per_prefix", "global_calls"):
        for i, window in enumerate(getattr(limits, name)):
            need(
                window.count >= 1 and 1 <= window.seconds <= 31 * 86400,
                f"limits.{name}[{i}]",
                "count must be at least 1, seconds 1 to 31 days",
            )
    need(1 <= limits.prefix_hidden_digits <= 8, "limits.prefix_hidden_digits", "must be 1-8")
    for name in (
        "key_requests_per_minute",
        "key_daily_calls",
        "failed_checks_per_phone_per_day",
        "failed_checks_per_phone_per_30_days",
    ):
        need(getattr(limits, name) >= 1, f"limits.{name}", "must be at least 1")
    for name in ("failed_checks_per_phone_per_day", "failed_checks_per_phone_per_30_days"):
        need(
            getattr(limits, f"{name}_all_keys") >= getattr(limits, name),
            f"limits.{name}_all_keys",
            f"must be at least limits.{name} (the limit per key)",
        )
    for i, region in enumerate(numbers.allowed_regions):
        need(
            bool(_REGION.fullmatch(region)),
            f"numbers.allowed_regions[{i}]",
            "must be an ISO 3166 alpha-2 code",
        )
    for i, region in enumerate(numbers.early_media_is_alerting.regions):
        need(
            bool(_REGION.fullmatch(region)),
            f"numbers.early_media_is_alerting.regions[{i}]",
            "must be an ISO 3166 alpha-2 code",
        )
    for i, kind in enumerate(numbers.allowed_types):
        need(kind in NUMBER_TYPES, f"numbers.allowed_types[{i}]", f"must be one of {NUMBER_TYPES}")

    need(bool(config.pools), "pools", "at least one pool is needed")
    names = [p.name for p in config.pools]
    for i, pool in enumerate(config.pools):
        at = f"pools[{i}]"
        need(names.count(pool.name) == 1, f"{at}.name", f"duplicate pool name {pool.name!r}")
        need(pool.cli_format in DIAL_FORMATS, f"{at}.cli_format", f"must be one of {DIAL_FORMATS}")
        need(
            pool.code_length in CODE_LENGTHS,
            f"{at}.code_length",
            f"must be {CODE_LENGTHS.start}-{CODE_LENGTHS.stop - 1}",
        )
        if (pool.prefix is None) == (not pool.numbers):
            problems.append(f"{at}: set either prefix or numbers, not both")
        if pool.prefix is not None:
            need(
                bool(_E164ISH.fullmatch(pool.prefix)),
                f"{at}.prefix",
                "must be + followed by digits, e.g. +6221500",
            )
            need(
                len(pool.prefix) - 1 + pool.code_length <= 15,
                f"{at}",
                "prefix plus code_length is longer than an E.164 number (15 digits)",
            )
        for j, number in enumerate(pool.numbers):
            need(
                bool(_E164ISH.fullmatch(number)),
                f"{at}.numbers[{j}]",
                "must be an E.164 number such as +622150001234",
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
                region in numbers.allowed_regions,
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
    need(config.logging.format in LOG_FORMATS, "logging.format", f"must be one of {LOG_FORMATS}")
    need(config.logging.level in LOG_LEVELS, "logging.level", f"must be one of {LOG_LEVELS}")
    problems.extend(_check_test_numbers(config))
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
        pool = next(
            (p for p in config.pools if region in (p.regions or config.numbers.allowed_regions)),
            None,
        )
        if pool is None:
            problems.append(f"{at}: no pool serves its region {region}")
        elif not (code.isascii() and code.isdigit() and len(code) == pool.code_length):
            problems.append(
                f"{at}: the code must be {pool.code_length} digits, the code length "
                f"of pool {pool.name} that serves it"
            )
    return problems


def shutdown_seconds(config: Config) -> float:
    """The longest a SIGTERM may take: ringing calls end (post-dial delay, ring time and
    a grace), then the requests still in flight are answered. systemd's TimeoutStopSec
    and Compose's stop_grace_period must be longer, or calls are cut off."""
    calls = config.calls
    return (
        calls.max_post_dial_seconds
        + calls.max_ring_seconds
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


def _check_asterisk(ami: AsteriskConfig) -> list[str]:
    """The asterisk mapping, and each node's own keys (a key it inherits is checked
    where it is written); names and addresses unique."""
    problems: list[str] = []

    def need(ok: bool, path: str, message: str) -> None:
        if not ok:
            problems.append(f"{path}: {message}")

    def check_ami(path: str, port: int | None, values: dict[str, str | None]) -> None:
        need(port is None or 1 <= port <= 65535, f"{path}.port", "must be 1-65535")
        for key, value in values.items():
            if value is None:
                continue
            need(bool(value), f"{path}.{key}", "must not be empty")
            need(value.isprintable(), f"{path}.{key}", "must be one line of printable text")
        channel = values.get("channel")
        if channel is not None:
            need("{number}" in channel, f"{path}.channel", "must contain {number}")
            # The AMI filter passes the events of channels whose Uniqueid starts with
            # otp-; a Local/ channel's far leg has a Uniqueid of its own, and its events
            # never come.
            need(
                channel.startswith("PJSIP/"),
                f"{path}.channel",
                "must be a PJSIP channel, PJSIP/{number}@<endpoint>",
            )

    check_ami(
        "asterisk",
        ami.port,
        {"username": ami.username, "secret": ami.secret, "channel": ami.channel},
    )
    need(0 <= ami.settle_seconds <= 30, "asterisk.settle_seconds", "must be 0-30")
    need(ami.dial_format in DIAL_FORMATS, "asterisk.dial_format", f"must be one of {DIAL_FORMATS}")
    names: dict[str, str] = {}
    addresses: dict[tuple[str, int], str] = {}
    for i, node in enumerate(ami.nodes or (NodeConfig(ami.name),)):
        path = f"asterisk.nodes[{i}]" if ami.nodes else "asterisk"
        need(
            bool(_NODE_NAME.fullmatch(node.name)),
            f"{path}.name",
            f"1-{MAX_NODE_NAME} letters, digits and - _ .",
        )
        if not ami.nodes:
            break
        check_ami(
            path,
            node.port,
            {
                "host": node.host,
                "username": node.username,
                "secret": node.secret,
                "channel": node.channel,
            },
        )
        need(
            node.max_per_second is None or 0 < node.max_per_second <= MAX_CALLS_PER_SECOND,
            f"{path}.max_per_second",
            f"must be above 0 and at most {MAX_CALLS_PER_SECOND}",
        )
        need(
            node.max_concurrent is None or 1 <= node.max_concurrent <= MAX_CONCURRENT_CALLS,
            f"{path}.max_concurrent",
            f"must be 1-{MAX_CONCURRENT_CALLS}",
        )
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
    if not 1 <= database.pool_size <= MAX_POOL_SIZE:
        problems.append(f"database.pool_size: must be 1-{MAX_POOL_SIZE}")
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
