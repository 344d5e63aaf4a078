"""Pool health per carrier: what a flash call's end says of the pool that placed it.

A pool whose calls to one carrier fail (rejected, congestion, no alerting, error, a trunk
refusal) `min_calls` times in a row, while another active pool's calls to that carrier
are delivered, is quarantined for that carrier: new calls there use the other pools.
Every `probe_seconds` one call tries it again (probing); a delivered probe restores it,
a failed one quarantines it again. The last pool that delivers to a carrier is never
quarantined: it is kept active and marked `held`.

The rules are here, pure; the store applies them in the transaction that ends the call,
so every gateway on one database sees and changes one state.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from gateway.outcomes import CANCELED, Outcome


class PoolState(enum.StrEnum):
    """How a pool stands with one carrier (caller_health)."""

    ACTIVE = "active"  # new calls to the carrier may use it
    QUARANTINED = "quarantined"  # they do not: its calls failed while another pool's delivered
    PROBING = "probing"  # one call is trying it again


@dataclass(frozen=True, slots=True)
class PoolHealthRecord:
    """What the calls from one pool to one carrier taught."""

    pool: str
    carrier: str  # as phonenumbers names it; "" when it names none
    state: PoolState
    since: float  # when it entered `state`
    failures: int  # failed calls in a row
    recent: str  # the latest verdicts, oldest first: "d" delivered, "f" failed
    # Failing past caller_health.min_calls but kept active: no other pool delivers to
    # the carrier (the last pool is never quarantined).
    held: bool
    probe_at: float | None  # quarantined: the next probe may start then
    updated_at: float

    @property
    def calls(self) -> int:
        return len(self.recent)

    @property
    def delivered(self) -> int:
        return self.recent.count("d")


@dataclass(frozen=True, slots=True)
class RouteReport:
    """What a flash call's end says of its pool's route to the destination's carrier,
    and the rules to judge it by (caller_health)."""

    pool: str
    carrier: str
    delivered: bool | None  # True delivered, False failed, None neither (busy, ...)
    peers: tuple[str, ...]  # the other pools that serve the destination
    min_calls: int
    probe_seconds: float
    recent_calls: int


@dataclass(frozen=True, slots=True)
class PoolChange:
    """A pool's state for a carrier changed (logged once, posted to alerts.url)."""

    pool: str
    carrier: str
    old: PoolState
    new: PoolState
    at: float
    failures: int
    recent: str


# What a call's outcome says of the route (its pool's caller IDs, through its trunk, to
# the destination's carrier): it reached the handset, or the network refused it.
# Anything else (busy, unreachable, invalid_number, ...) is about the phone, not the route.
ROUTE_DELIVERED = frozenset({Outcome.DELIVERED, Outcome.ANSWERED})
ROUTE_FAILED = frozenset(
    {
        Outcome.REJECTED,
        Outcome.CONGESTION,
        Outcome.NO_ALERTING,
        Outcome.ERROR,
        Outcome.TRUNK_REJECTED,
    }
)


# Reasons a call ended for which neither the network nor the pool is to blame: the
# gateway hung it up itself (its verification was canceled or superseded), lost it with
# a PBX that went away, or failed on its own side.
NOT_THE_ROUTE = frozenset({CANCELED, "pbx_lost", "gateway_error"})


def route_verdict(outcome: str, reason: str | None) -> bool | None:
    """True: the route delivered; False: the network refused it; None: the call says
    nothing of it."""
    if outcome in ROUTE_DELIVERED:
        return True
    if outcome in ROUTE_FAILED and reason not in NOT_THE_ROUTE:
        return False
    return None


def fresh(pool: str, carrier: str, at: float) -> PoolHealthRecord:
    """A pool no call to `carrier` has judged yet."""
    return PoolHealthRecord(
        pool=pool,
        carrier=carrier,
        state=PoolState.ACTIVE,
        since=at,
        failures=0,
        recent="",
        held=False,
        probe_at=None,
        updated_at=at,
    )


def after_call(
    rows: dict[str, PoolHealthRecord], report: RouteReport, at: float
) -> tuple[list[PoolHealthRecord], list[PoolChange]]:
    """The rows to write after a call of `report.pool` to `report.carrier` ended, and
    the state changes among them. `rows`: every pool's row for that carrier."""
    own = rows.get(report.pool) or fresh(report.pool, report.carrier, at)
    if report.delivered is None:
        if own.state is not PoolState.PROBING:
            return [], []
        # A probe that says nothing (busy, ...): quarantined again; the next probe
        # may start at the time the claim set.
        updated = _replace(own, at, state=PoolState.QUARANTINED)
        return [updated], _changes(own, updated, at)
    recent = (own.recent + ("d" if report.delivered else "f"))[-report.recent_calls :]
    written: list[PoolHealthRecord] = []
    if report.delivered:
        updated = _replace(
            own, at, state=PoolState.ACTIVE, failures=0, recent=recent, held=False, probe_at=None
        )
        written.append(updated)
        # A pool held past min_calls for want of another delivering one has it now.
        for peer in report.peers:
            row = rows.get(peer)
            if row is not None and row.state is PoolState.ACTIVE and row.held:
                written.append(_quarantine(row, at, report.probe_seconds))
    else:
        failures = own.failures + 1
        if own.state is PoolState.PROBING:
            updated = _quarantine(own, at, report.probe_seconds)
            updated = dataclasses.replace(updated, failures=failures, recent=recent)
        elif own.state is PoolState.ACTIVE and failures >= report.min_calls:
            delivering = any(_delivers(rows.get(peer)) for peer in report.peers)
            if delivering:
                updated = _quarantine(own, at, report.probe_seconds)
                updated = dataclasses.replace(updated, failures=failures, recent=recent)
            else:
                updated = _replace(own, at, failures=failures, recent=recent, held=True)
        else:
            updated = _replace(own, at, failures=failures, recent=recent)
        written.append(updated)
    changes = [c for row in written for c in _changes(rows.get(row.pool), row, at)]
    return written, changes


def _delivers(row: PoolHealthRecord | None) -> bool:
    """An active pool whose latest call to the carrier was delivered."""
    return row is not None and row.state is PoolState.ACTIVE and row.recent.endswith("d")


def _quarantine(row: PoolHealthRecord, at: float, probe_seconds: float) -> PoolHealthRecord:
    return _replace(row, at, state=PoolState.QUARANTINED, held=False, probe_at=at + probe_seconds)


def _replace(row: PoolHealthRecord, at: float, **changes: object) -> PoolHealthRecord:
    state = changes.get("state", row.state)
    since = at if state is not row.state else row.since
    return dataclasses.replace(row, since=since, updated_at=at, **changes)  # type: ignore[arg-type]


def _changes(old: PoolHealthRecord | None, new: PoolHealthRecord, at: float) -> list[PoolChange]:
    before = old.state if old is not None else PoolState.ACTIVE
    if before is new.state:
        return []
    return [PoolChange(new.pool, new.carrier, before, new.state, at, new.failures, new.recent)]
