"""Pool health per carrier: the pure rules (gateway.caller_health) a call's end applies."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.caller_health import (
    PoolChange,
    PoolHealthRecord,
    PoolState,
    RouteReport,
    after_call,
    fresh,
    route_verdict,
)
from gateway.outcomes import CANCELED, Outcome

CARRIER = "Telkomsel"
T0 = 1_700_000_000.0
MIN_CALLS = 3
PROBE_S = 300.0
RECENT = 10

ACTIVE = PoolState.ACTIVE
QUARANTINED = PoolState.QUARANTINED
PROBING = PoolState.PROBING


def report(
    pool: str = "a",
    delivered: bool | None = False,
    peers: tuple[str, ...] = ("b",),
    *,
    min_calls: int = MIN_CALLS,
    recent_calls: int = RECENT,
) -> RouteReport:
    return RouteReport(
        pool=pool,
        carrier=CARRIER,
        delivered=delivered,
        peers=peers,
        min_calls=min_calls,
        probe_seconds=PROBE_S,
        recent_calls=recent_calls,
    )


def row(pool: str, **fields: object) -> PoolHealthRecord:
    """A pool's row for CARRIER: fresh at T0, with `fields` replaced."""
    return dataclasses.replace(fresh(pool, CARRIER, T0), **fields)  # type: ignore[arg-type]


class Carrier:
    """The rows of every pool for CARRIER, as the store keeps them between calls."""

    def __init__(self, *rows: PoolHealthRecord) -> None:
        self.rows = {r.pool: r for r in rows}

    def end(self, rep: RouteReport, at: float) -> list[PoolChange]:
        """A call ended at `at`: write its rows, return its changes."""
        written, changes = after_call(dict(self.rows), rep, at)
        assert len({r.pool for r in written}) == len(written), "each row written once"
        for record in written:
            assert record.carrier == CARRIER
            self.rows[record.pool] = record
        return changes

    def __getitem__(self, pool: str) -> PoolHealthRecord:
        return self.rows[pool]


# -- route_verdict -------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "reason", "verdict"),
    [
        (Outcome.DELIVERED, None, True),
        (Outcome.ANSWERED, None, True),
        # Delivered is delivered, whoever hung up.
        (Outcome.DELIVERED, CANCELED, True),
        (Outcome.REJECTED, None, False),
        (Outcome.CONGESTION, None, False),
        (Outcome.NO_ALERTING, None, False),
        (Outcome.ERROR, None, False),
        (Outcome.TRUNK_REJECTED, None, False),
        (Outcome.REJECTED, "callee declined", False),
        # The gateway hung up before it alerted: nothing said of the route.
        (Outcome.NO_ALERTING, CANCELED, None),
        (Outcome.REJECTED, CANCELED, None),
        (Outcome.ERROR, CANCELED, None),
        # Lost with a PBX that went away, or failed on the gateway's side: not the route.
        (Outcome.ERROR, "pbx_lost", None),
        (Outcome.ERROR, "gateway_error", None),
        (Outcome.NO_ALERTING, "pbx_lost", None),
        (Outcome.NO_ALERTING, "post_dial_timeout", False),
        # About the phone, not the route.
        (Outcome.BUSY, None, None),
        (Outcome.UNREACHABLE, None, None),
        (Outcome.INVALID_NUMBER, None, None),
        (Outcome.PROGRESS_ONLY, None, None),
        (Outcome.NETWORK_ANSWER, None, None),
        (Outcome.SPOKEN, None, None),
        (Outcome.ANSWERED_EARLY, None, None),
        (Outcome.NO_ANSWER, None, None),
    ],
)
def test_route_verdict(outcome: Outcome, reason: str | None, verdict: bool | None) -> None:
    assert route_verdict(outcome, reason) is verdict
    assert route_verdict(str(outcome), reason) is verdict  # as the store reads it back


def test_every_outcome_has_a_verdict_without_a_reason() -> None:
    delivered = {o for o in Outcome if route_verdict(o, None) is True}
    failed = {o for o in Outcome if route_verdict(o, None) is False}
    assert delivered == {Outcome.DELIVERED, Outcome.ANSWERED}
    assert failed == {
        Outcome.REJECTED,
        Outcome.CONGESTION,
        Outcome.NO_ALERTING,
        Outcome.ERROR,
        Outcome.TRUNK_REJECTED,
    }


# -- fresh -----------------------------------------------------------------------


def test_a_fresh_row_is_active_with_nothing_learnt() -> None:
    record = fresh("a", CARRIER, T0)
    assert record == PoolHealthRecord(
        pool="a",
        carrier=CARRIER,
        state=ACTIVE,
        since=T0,
        failures=0,
        recent="",
        held=False,
        probe_at=None,
        updated_at=T0,
    )
    assert (record.calls, record.delivered) == (0, 0)


# -- after_call: quarantine ----------------------------------------------------------


def test_a_first_call_writes_a_fresh_row_and_changes_nothing() -> None:
    carrier = Carrier()
    assert carrier.end(report("a", delivered=True), T0 + 1) == []
    assert carrier["a"] == row("a", since=T0 + 1, recent="d", updated_at=T0 + 1)
    assert carrier.end(report("b", delivered=False), T0 + 2) == []
    assert carrier["b"] == row("b", since=T0 + 2, failures=1, recent="f", updated_at=T0 + 2)


def test_min_calls_failures_quarantine_a_pool_while_a_peers_latest_call_is_delivered() -> None:
    carrier = Carrier(row("b", recent="fd"))
    for n in range(1, MIN_CALLS):
        assert carrier.end(report("a"), T0 + n) == []
        assert carrier["a"].state is ACTIVE
        assert carrier["a"].failures == n
    changes = carrier.end(report("a"), T0 + 10)
    assert changes == [PoolChange("a", CARRIER, ACTIVE, QUARANTINED, T0 + 10, MIN_CALLS, "fff")]
    assert carrier["a"] == row(
        "a",
        state=QUARANTINED,
        since=T0 + 10,
        failures=MIN_CALLS,
        recent="fff",
        held=False,
        probe_at=T0 + 10 + PROBE_S,
        updated_at=T0 + 10,
    )
    assert carrier["b"] == row("b", recent="fd")  # the peer's row is only read


def test_a_delivered_call_resets_the_failures_in_a_row() -> None:
    carrier = Carrier(row("b", recent="d"))
    carrier.end(report("a"), T0 + 1)
    carrier.end(report("a"), T0 + 2)
    carrier.end(report("a", delivered=True), T0 + 3)
    assert (carrier["a"].failures, carrier["a"].recent) == (0, "ffd")
    assert carrier.end(report("a"), T0 + 4) == []
    assert carrier.end(report("a"), T0 + 5) == []
    assert carrier["a"].state is ACTIVE  # two in a row, not three
    assert carrier.end(report("a"), T0 + 6)[0].new is QUARANTINED


@pytest.mark.parametrize(
    "peer",
    [
        None,  # no call of the peer judged yet
        row("b", recent="df"),  # its latest failed
        row("b", state=QUARANTINED, recent="d", probe_at=T0 + PROBE_S),
        row("b", state=PROBING, recent="d", probe_at=T0 + PROBE_S),
    ],
)
def test_no_pool_is_quarantined_when_no_active_peer_just_delivered(
    peer: PoolHealthRecord | None,
) -> None:
    carrier = Carrier(*([peer] if peer is not None else []))
    for n in range(MIN_CALLS + 2):
        assert carrier.end(report("a"), T0 + n) == []
    assert carrier["a"].state is ACTIVE
    assert carrier["a"].held
    assert carrier["a"].failures == MIN_CALLS + 2
    assert carrier["a"].probe_at is None


def test_a_pool_is_held_not_quarantined_before_min_calls_either() -> None:
    carrier = Carrier()
    for n in range(MIN_CALLS - 1):
        carrier.end(report("a"), T0 + n)
    assert not carrier["a"].held
    carrier.end(report("a"), T0 + 9)
    assert carrier["a"].held


def test_a_pool_serving_alone_is_held_whatever_its_failures() -> None:
    carrier = Carrier()
    for n in range(20):
        assert carrier.end(report("a", peers=()), T0 + n) == []
    assert (carrier["a"].state, carrier["a"].held) == (ACTIVE, True)


def test_a_held_pool_is_quarantined_by_the_peers_delivered_call() -> None:
    carrier = Carrier()
    for n in range(MIN_CALLS):
        carrier.end(report("a"), T0 + n)
    assert (carrier["a"].state, carrier["a"].held) == (ACTIVE, True)

    changes = carrier.end(report("b", delivered=True, peers=("a",)), T0 + 20)
    assert changes == [PoolChange("a", CARRIER, ACTIVE, QUARANTINED, T0 + 20, MIN_CALLS, "fff")]
    assert carrier["a"].state is QUARANTINED
    assert not carrier["a"].held
    assert carrier["a"].since == T0 + 20
    assert carrier["a"].probe_at == T0 + 20 + PROBE_S
    assert carrier["a"].recent == "fff"  # the peer's call is not the held pool's
    assert carrier["b"].recent == "d"
    assert carrier["b"].state is ACTIVE


def test_a_held_pool_is_not_quarantined_by_a_pool_that_is_not_its_peer() -> None:
    carrier = Carrier()
    for n in range(MIN_CALLS):
        carrier.end(report("a", peers=("b",)), T0 + n)
    # Pool c serves another region: a is not among its peers.
    assert carrier.end(report("c", delivered=True, peers=("b",)), T0 + 20) == []
    assert (carrier["a"].state, carrier["a"].held) == (ACTIVE, True)


def test_a_held_pool_that_delivers_is_no_longer_held() -> None:
    carrier = Carrier()
    for n in range(MIN_CALLS):
        carrier.end(report("a"), T0 + n)
    assert carrier.end(report("a", delivered=True), T0 + 10) == []
    assert carrier["a"] == row(
        "a", recent="fffd", failures=0, held=False, since=T0, updated_at=T0 + 10
    )


def test_a_held_pool_is_quarantined_by_its_own_next_failure_once_a_peer_delivers() -> None:
    carrier = Carrier()
    for n in range(MIN_CALLS):
        carrier.end(report("a"), T0 + n)
    # The peer's delivery is news to the held pool's next call too (as if the peer's row
    # were written by a call whose report named no peers).
    carrier.rows["b"] = row("b", recent="d")
    changes = carrier.end(report("a"), T0 + 10)
    assert [(c.pool, c.old, c.new, c.failures) for c in changes] == [
        ("a", ACTIVE, QUARANTINED, MIN_CALLS + 1)
    ]
    assert not carrier["a"].held


def test_two_failing_pools_the_first_to_deliver_quarantines_the_other() -> None:
    carrier = Carrier()
    for n in range(MIN_CALLS):
        carrier.end(report("a", peers=("b",)), T0 + n)
        carrier.end(report("b", peers=("a",)), T0 + n)
    assert carrier["a"].held and carrier["b"].held
    changes = carrier.end(report("b", delivered=True, peers=("a",)), T0 + 10)
    assert [(c.pool, c.new) for c in changes] == [("a", QUARANTINED)]
    assert (carrier["b"].state, carrier["b"].held) == (ACTIVE, False)


def test_the_last_delivering_pool_is_never_quarantined() -> None:
    carrier = Carrier(row("b", recent="d"))
    for n in range(MIN_CALLS):
        carrier.end(report("a"), T0 + n)
    assert carrier["a"].state is QUARANTINED
    # Now b fails too: a is quarantined, so no active peer delivers; b is held.
    for n in range(MIN_CALLS + 1):
        assert carrier.end(report("b", peers=("a",)), T0 + 10 + n) == []
    assert (carrier["b"].state, carrier["b"].held) == (ACTIVE, True)


def test_a_quarantined_pools_late_failure_keeps_it_quarantined_and_its_probe_time() -> None:
    carrier = Carrier(
        row("a", state=QUARANTINED, failures=3, recent="fff", probe_at=T0 + PROBE_S),
        row("b", recent="d"),
    )
    assert carrier.end(report("a"), T0 + 5) == []
    assert carrier["a"].state is QUARANTINED
    assert (carrier["a"].failures, carrier["a"].recent) == (4, "ffff")
    assert carrier["a"].probe_at == T0 + PROBE_S
    assert carrier["a"].since == T0


def test_a_quarantined_pools_late_delivered_call_restores_it() -> None:
    carrier = Carrier(row("a", state=QUARANTINED, failures=3, recent="fff", probe_at=T0 + PROBE_S))
    changes = carrier.end(report("a", delivered=True), T0 + 5)
    assert changes == [PoolChange("a", CARRIER, QUARANTINED, ACTIVE, T0 + 5, 0, "fffd")]
    assert carrier["a"].probe_at is None


# -- after_call: probing ---------------------------------------------------------------


def probing(**fields: object) -> PoolHealthRecord:
    base: dict[str, object] = {
        "state": PROBING,
        "since": T0 + 300,
        "failures": 4,
        "recent": "dffff",
        "probe_at": T0 + 600,  # the claim's next probe time
    }
    return row("a", **(base | fields))


def test_a_delivered_probe_restores_the_pool() -> None:
    carrier = Carrier(probing(), row("b", recent="d"))
    changes = carrier.end(report("a", delivered=True), T0 + 310)
    assert changes == [PoolChange("a", CARRIER, PROBING, ACTIVE, T0 + 310, 0, "dffffd")]
    assert carrier["a"] == row(
        "a", since=T0 + 310, recent="dffffd", updated_at=T0 + 310, failures=0, probe_at=None
    )


def test_a_failed_probe_quarantines_the_pool_again_with_a_new_probe_time() -> None:
    carrier = Carrier(probing(), row("b", recent="d"))
    changes = carrier.end(report("a"), T0 + 310)
    assert changes == [PoolChange("a", CARRIER, PROBING, QUARANTINED, T0 + 310, 5, "dfffff")]
    assert carrier["a"].state is QUARANTINED
    assert carrier["a"].probe_at == T0 + 310 + PROBE_S
    assert carrier["a"].since == T0 + 310
    assert not carrier["a"].held


def test_a_failed_probe_quarantines_even_when_no_peer_delivers() -> None:
    carrier = Carrier(probing())
    changes = carrier.end(report("a", peers=()), T0 + 310)
    assert [(c.old, c.new) for c in changes] == [(PROBING, QUARANTINED)]
    assert carrier["a"].probe_at == T0 + 310 + PROBE_S


def test_a_probe_that_says_nothing_quarantines_the_pool_until_the_claimed_time() -> None:
    carrier = Carrier(probing())
    changes = carrier.end(report("a", delivered=None), T0 + 310)
    assert changes == [PoolChange("a", CARRIER, PROBING, QUARANTINED, T0 + 310, 4, "dffff")]
    assert carrier["a"] == probing(state=QUARANTINED, since=T0 + 310, updated_at=T0 + 310)
    assert carrier["a"].probe_at == T0 + 600


@pytest.mark.parametrize(
    "before",
    [
        None,
        row("a", recent="ff", failures=2),
        row("a", state=QUARANTINED, recent="fff", failures=3, probe_at=T0 + PROBE_S),
    ],
)
def test_a_call_that_says_nothing_writes_nothing_unless_it_is_the_probe(
    before: PoolHealthRecord | None,
) -> None:
    rows = {"a": before} if before is not None else {}
    assert after_call(rows, report("a", delivered=None), T0 + 5) == ([], [])


# -- after_call: recent, changes ---------------------------------------------------------


def test_recent_keeps_the_latest_recent_calls_verdicts_oldest_first() -> None:
    carrier = Carrier()
    verdicts = [True, False] * 4 + [True] * 5  # 13 calls
    for n, delivered in enumerate(verdicts):
        carrier.end(report("a", delivered, peers=(), recent_calls=10), T0 + n)
    assert carrier["a"].recent == "fdfdf" + "ddddd"  # "dfdfdfdf" + "ddddd", the last 10
    assert (carrier["a"].calls, carrier["a"].delivered) == (10, 7)


def test_recent_is_truncated_on_a_failure_too() -> None:
    carrier = Carrier(row("a", recent="d" * 10))
    carrier.end(report("a", False, peers=(), recent_calls=10), T0 + 1)
    assert carrier["a"].recent == "d" * 9 + "f"


def test_each_change_is_reported_once_with_its_old_and_new_state() -> None:
    carrier = Carrier(row("b", recent="d"))
    seen: list[PoolChange] = []
    for n in range(MIN_CALLS + 3):  # quarantined at the third; three more while so
        seen += carrier.end(report("a"), T0 + n)
    seen += carrier.end(report("a", delivered=True), T0 + 20)  # a late delivery: restored
    seen += carrier.end(report("a", delivered=True), T0 + 21)
    assert [(c.pool, c.old, c.new, c.at) for c in seen] == [
        ("a", ACTIVE, QUARANTINED, T0 + MIN_CALLS - 1),
        ("a", QUARANTINED, ACTIVE, T0 + 20),
    ]
    assert seen[0].recent == "fff" and seen[0].failures == MIN_CALLS
    assert seen[1].recent == "ffffffd" and seen[1].failures == 0


def test_since_moves_only_when_the_state_changes() -> None:
    carrier = Carrier(row("b", recent="d"))
    carrier.end(report("a"), T0 + 1)
    carrier.end(report("a"), T0 + 2)
    assert carrier["a"].since == T0 + 1  # the first call's row, fresh then
    assert carrier["a"].updated_at == T0 + 2
    carrier.end(report("a"), T0 + 3)
    assert carrier["a"].since == T0 + 3


def test_after_call_leaves_the_rows_it_is_given_alone() -> None:
    rows = {"a": row("a", recent="ff", failures=2), "b": row("b", recent="d")}
    before = dict(rows)
    after_call(rows, report("a"), T0 + 5)
    assert rows == before
