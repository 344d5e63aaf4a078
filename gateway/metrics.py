"""Prometheus metrics, one registry per app (tests run several apps in one process).

Events are counted where they happen (the dialer, the API middleware, the store's
status changes); levels (queue depth, calls in flight, AMI state, webhook backlog) and
the per-key budget are read when /metrics is scraped.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.alerts import MAX_OPEN
from gateway.caller_health import PoolState
from gateway.outcomes import CANCELED, MAX_Q850_CAUSE, Outcome
from gateway.store import VERIFICATION_STATUSES, AlertKind, Store, VerificationStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DAY = 86400.0

# POST to the far end's first ring: queueing, pacing, Originate, and the network's setup.
RINGING_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
# Which limit refused a request (the API's answer never says; the operator should know).
RATE_LIMITS = (
    "phone",
    "phone_prefix",
    "api_key_daily",
    "global",
    "key_requests_per_minute",
    "failed_checks",  # wrong codes per phone and API key, per day
    "failed_checks_all_keys",
    "failed_checks_30_days",
    "failed_checks_30_days_all_keys",
)


def _cause_label(cause: int | None) -> str:
    """A hangup cause as a label: one of at most 130 values, whatever a caller passes."""
    if cause is None:
        return "none"
    return str(cause) if 0 <= cause <= MAX_Q850_CAUSE else "other"


class _VerificationStatuses(Collector):
    """otp_verifications_total by status, from the store's own tally of the changes it
    committed (every status change happens in one store method or another)."""

    def __init__(self, tally: Callable[[], Mapping[VerificationStatus, int]]) -> None:
        self._tally = tally

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "otp_verifications",
            "Verifications that reached each status (pending: created)",
            labels=["status"],
        )
        tally = self._tally()
        for status in VERIFICATION_STATUSES:
            family.add_metric([status], tally.get(status, 0))
        yield family


class _StoreCpu(Collector):
    """otp_store_cpu_seconds_total: the CPU the store's own work took in this process."""

    def __init__(self, seconds: Callable[[], float | None]) -> None:
        self._seconds = seconds

    def collect(self) -> Iterable[Metric]:
        seconds = self._seconds()
        if seconds is not None:
            yield CounterMetricFamily(
                "otp_store_cpu_seconds",
                "CPU time the gateway spent running its SQLite store's transactions",
                value=seconds,
            )


class Metrics:
    """The gateway's metrics."""

    def __init__(self, key_daily_calls: int) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "otp_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "otp_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.calls = Counter(
            "otp_calls",
            "Calls ended, by outcome (docs/api/concepts.md#call-outcomes-and-number-health)",
            ["outcome"],
            registry=r,
        )
        self.trunk_rejections = Counter(
            "otp_trunk_rejections",
            "Calls the trunk refused (SIP 401, 403, 407: account, caller ID, call rate)",
            ["trunk", "sip_code"],
            registry=r,
        )
        self.hangup_causes = Counter(
            "otp_call_hangup_causes",
            "Calls ended, by Q.850 hangup cause ('none' when the call never reached the network, "
            "'other' for a value outside 0-127)",
            ["cause"],
            registry=r,
        )
        self.ringing_seconds = Histogram(
            "otp_call_ringing_latency_seconds",
            "From the POST that created a verification to the far end ringing",
            buckets=RINGING_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "otp_rate_limited",
            "Requests refused by a rate limit, by the limit that fired",
            ["limit"],
            registry=r,
        )
        self.ami_reconnects = Counter(
            "otp_ami_reconnects", "AMI logins after the first one (reconnections)", registry=r
        )
        self.sandbox = Counter(
            "otp_sandbox_verifications",
            "Verifications to configured test_numbers (never dialed)",
            registry=r,
        )
        self.queued = Gauge("otp_calls_queued", "Calls waiting to be placed", registry=r)
        self.in_flight = Gauge("otp_calls_in_flight", "Calls placed and not yet ended", registry=r)
        self.ami_connected = Gauge(
            "otp_ami_connected", "1 while logged in to AMI of any node, else 0", registry=r
        )
        self.node_up = Gauge(
            "otp_node_up",
            "1 while logged in to the Asterisk node's AMI, else 0",
            ["node"],
            registry=r,
        )
        self.node_placed = Counter(
            "otp_node_calls_placed", "Calls originated on each Asterisk node", ["node"], registry=r
        )
        self.node_ringing = Gauge(
            "otp_node_calls_ringing",
            "Calls ringing on each Asterisk node now",
            ["node"],
            registry=r,
        )
        self.webhook_backlog = Gauge(
            "otp_webhooks_pending", "Webhooks not yet delivered nor given up", registry=r
        )
        self.key_calls = Gauge(
            "otp_api_key_calls_24h",
            "Calls requested by each API key in the last 24 hours (the daily budget's use)",
            ["api_key", "name"],
            registry=r,
        )
        self.key_budget = Gauge(
            "otp_api_key_daily_call_budget",
            "Calls each API key may request in a rolling day (limits.key_daily_calls)",
            registry=r,
        )
        self.key_budget.set(key_daily_calls)
        self.pool_state = Enum(
            "otp_pool_state",
            "Each pool's state for each carrier its calls reached (caller_health)",
            ["pool", "carrier"],
            states=[state.value for state in PoolState],
            registry=r,
        )
        self.pool_recent_calls = Gauge(
            "otp_pool_recent_calls",
            "Each pool's latest calls to each carrier that judged its route "
            "(caller_health.recent_calls at most)",
            ["pool", "carrier"],
            registry=r,
        )
        self.pool_recent_delivered = Gauge(
            "otp_pool_recent_delivered",
            "Of those, the calls delivered",
            ["pool", "carrier"],
            registry=r,
        )
        self.pool_changes = Counter(
            "otp_pool_state_changes",
            "Pool state changes this gateway made, by the state entered",
            ["pool", "state"],
            registry=r,
        )
        self.conversion_alerts = Counter(
            "otp_conversion_alerts",
            "Conversion alerts this gateway raised, by kind of target",
            ["kind"],
            registry=r,
        )
        self.open_alerts = Gauge(
            "otp_conversion_alerts_open",
            "Conversion alerts not cleared, by kind of target and mode",
            ["kind", "mode"],
            registry=r,
        )
        for outcome in [*Outcome, CANCELED]:  # every outcome shows, at 0 until it happens
            self.calls.labels(outcome=outcome)
        for limit in RATE_LIMITS:
            self.rate_limited.labels(limit=limit)
        self._logins: dict[str, int] = {}
        # The labelled children of the counters every call and request touches, by
        # their label values: labels() costs about 3 us a call, a dict lookup 0.1.
        self._ended: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self._placed: dict[str, Counter] = {}
        self._answered: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def watch(
        self,
        store: Store,
        queued: Callable[[], int],
        in_flight: Callable[[], int],
        connected: Callable[[], bool],
    ) -> None:
        """Read these levels at each scrape."""
        self.queued.set_function(queued)
        self.in_flight.set_function(in_flight)
        self.ami_connected.set_function(lambda: float(connected()))
        self.registry.register(_VerificationStatuses(lambda: store.status_tally))
        self.registry.register(_StoreCpu(lambda: store.cpu_seconds))

    def watch_node(self, name: str, up: Callable[[], bool], ringing: Callable[[], int]) -> None:
        """Read an Asterisk node's levels at each scrape."""
        self.node_up.labels(node=name).set_function(lambda: float(up()))
        self.node_ringing.labels(node=name).set_function(ringing)
        self.node_placed.labels(node=name)  # shows at 0 until a call is placed

    # -- the dialer's events (gateway.dialer.CallMetrics) ----------------------

    def call_ringing(self, since_request: float) -> None:
        self.ringing_seconds.observe(max(since_request, 0.0))

    def call_ended(self, outcome: str, cause: int | None) -> None:
        key = (outcome, _cause_label(cause))
        counters = self._ended.get(key)
        if counters is None:
            counters = self._ended[key] = (
                self.calls.labels(outcome=outcome),
                self.hangup_causes.labels(cause=key[1]),
            )
        for counter in counters:
            counter.inc()

    def trunk_rejected(self, trunk: str, sip_code: int | None) -> None:
        self.trunk_rejections.labels(trunk=trunk, sip_code=str(sip_code)).inc()

    def pbx_connected(self, node: str) -> None:
        self._logins[node] = self._logins.get(node, 0) + 1
        if self._logins[node] > 1:
            self.ami_reconnects.inc()

    def call_placed(self, node: str) -> None:
        counter = self._placed.get(node)
        if counter is None:
            counter = self._placed[node] = self.node_placed.labels(node=node)
        counter.inc()

    # -- the alerts' (gateway.alerts.AlertMetrics) --------------------------------

    def pool_changed(self, pool: str, state: str) -> None:
        self.pool_changes.labels(pool=pool, state=state).inc()

    def conversion_flagged(self, kind: str) -> None:
        self.conversion_alerts.labels(kind=kind).inc()

    # -- the API's ---------------------------------------------------------------

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._answered.get(key)
        if children is None:
            children = self._answered[key] = (
                self.requests.labels(method=method, route=route, status=str(status)),
                self.request_seconds.labels(route=route),
            )
        children[0].inc()
        children[1].observe(seconds)

    async def render(self, store: Store) -> bytes:
        """The text exposition, after refreshing the figures read from the store."""
        names = {k.id: k.name for k in await store.api_keys()}
        self.key_calls.clear()
        for key_id, calls in (await store.calls_by_key(time.time() - DAY)).items():
            self.key_calls.labels(api_key=key_id, name=names.get(key_id, "")).set(calls)
        self.webhook_backlog.set(await store.pending_webhooks())
        for gauge in (self.pool_state, self.pool_recent_calls, self.pool_recent_delivered):
            gauge.clear()
        for row in await store.pool_health():
            labels = {"pool": row.pool, "carrier": row.carrier or "unknown"}
            self.pool_state.labels(**labels).state(row.state)
            self.pool_recent_calls.labels(**labels).set(row.calls)
            self.pool_recent_delivered.labels(**labels).set(row.delivered)
        self.open_alerts.clear()
        for kind, mode in itertools.product(AlertKind, ("report", "block")):
            self.open_alerts.labels(kind=kind, mode=mode)
        for alert in await store.alerts(True, MAX_OPEN):
            self.open_alerts.labels(kind=alert.kind, mode=alert.mode).inc()
        return generate_latest(self.registry)
