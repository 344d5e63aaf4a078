"""The store's side of pool health and the conversion watch, on both backends: routes
judged as calls end, probes claimed, conversion counted, alerts raised and cleared,
and migration 14."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.caller_health import PoolChange, PoolHealthRecord, PoolState, RouteReport
from gateway.store import (
    AlertKind,
    AlertRecord,
    CallStatus,
    Inserted,
    Store,
    VerificationRecord,
    VerificationStatus,
    open_store,
)
from gateway.store.schema import POSTGRESQL as PG_MIGRATIONS
from gateway.store.schema import SQLITE as MIGRATIONS
from tests.conftest import NewDatabase, make_call, make_verification, raw_query
from tests.test_store import make_schema, raw_insert

CARRIER = "Telkomsel"
CARRIER_TARGET = "ID:Telkomsel"  # a carrier alert names the carrier with its country
OTHER_CARRIER = "Indosat Ooredoo Hutchison"
MIN_CALLS = 2
PROBE_S = 300.0
# A minute's start, so the tests place verifications in minutes exactly.
MINUTE = 28_333_340
BASE = MINUTE * 60.0
BLOCK = "+62812345"
OTHER_BLOCK = "+62815999"

ACTIVE = PoolState.ACTIVE
QUARANTINED = PoolState.QUARANTINED
PROBING = PoolState.PROBING


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    """A store on each backend."""
    opened = await open_store(database)
    yield opened
    await opened.close()


# -- routes judged as calls end ---------------------------------------------------------


def route(
    pool: str,
    delivered: bool | None,
    peers: tuple[str, ...] = (),
    carrier: str = CARRIER,
) -> RouteReport:
    return RouteReport(
        pool=pool,
        carrier=carrier,
        delivered=delivered,
        peers=peers,
        min_calls=MIN_CALLS,
        probe_seconds=PROBE_S,
        recent_calls=10,
    )


_calls = iter(range(1, 1_000_000))


async def placed_call(store: Store, *, dialed: bool = True, pool: str = "a") -> str:
    """A new verification and its call (dialing since BASE, or still queued); its call id."""
    n = next(_calls)
    record = make_verification(
        f"vrf_{n}", phone=f"+628123{n:07d}", created_at=BASE, pool=pool, carrier=CARRIER
    )
    call = make_call(
        f"call_{n}",
        record.id,
        phone=record.phone,
        queued_at=BASE,
        status=CallStatus.DIALING if dialed else CallStatus.QUEUED,
        dialed_at=BASE if dialed else None,
    )
    assert isinstance(await store.create_verification(record, call), Inserted)
    return call.id


async def end_with(
    store: Store, call_id: str, report: RouteReport | None, at: float
) -> list[PoolChange]:
    delivered = report is not None and report.delivered is True
    return await store.end_call(
        call_id,
        call_status=CallStatus.COMPLETED if delivered else CallStatus.FAILED,
        outcome="delivered" if delivered else "rejected",
        cause=16 if delivered else 21,
        sip_code=None if delivered else 603,
        reason=None,
        at=at,
        fail_verification=not delivered,
        delivered=delivered,
        route=report,
    )


async def judge(store: Store, report: RouteReport, at: float) -> list[PoolChange]:
    """A dialed call of `report.pool` ends at `at` with `report`'s verdict."""
    return await end_with(store, await placed_call(store, pool=report.pool), report, at)


async def test_a_dialed_calls_end_judges_its_pools_route(store: Store) -> None:
    assert await judge(store, route("a", False), BASE + 10) == []
    assert await store.pool_states(CARRIER) == [
        PoolHealthRecord(
            pool="a",
            carrier=CARRIER,
            state=ACTIVE,
            since=BASE + 10,
            failures=1,
            recent="f",
            held=False,
            probe_at=None,
            updated_at=BASE + 10,
        )
    ]


async def test_a_call_never_dialed_judges_nothing(store: Store) -> None:
    call_id = await placed_call(store, dialed=False)
    assert await end_with(store, call_id, route("a", False), BASE + 10) == []
    assert await store.pool_health() == []
    found = await store.verification("vrf_" + call_id.removeprefix("call_"))
    assert found is not None and found[1].outcome == "rejected"  # the call did end


async def test_a_call_without_a_route_judges_nothing(store: Store) -> None:
    call_id = await placed_call(store)
    assert await end_with(store, call_id, None, BASE + 10) == []
    assert await store.pool_health() == []


async def test_a_call_is_judged_once_however_often_its_end_is_reported(store: Store) -> None:
    call_id = await placed_call(store)
    await end_with(store, call_id, route("a", False), BASE + 10)
    await end_with(store, call_id, route("a", False), BASE + 11)
    (row,) = await store.pool_states(CARRIER)
    assert (row.failures, row.recent) == (1, "f")


async def test_end_call_returns_the_changes_it_made(store: Store) -> None:
    await judge(store, route("b", True, ("a",)), BASE + 1)
    assert await judge(store, route("a", False, ("b",)), BASE + 2) == []
    changes = await judge(store, route("a", False, ("b",)), BASE + 3)
    assert changes == [PoolChange("a", CARRIER, ACTIVE, QUARANTINED, BASE + 3, MIN_CALLS, "ff")]
    states = {r.pool: r for r in await store.pool_states(CARRIER)}
    assert states["a"].state is QUARANTINED
    assert states["a"].probe_at == BASE + 3 + PROBE_S
    assert (states["b"].state, states["b"].recent) == (ACTIVE, "d")
    # Quarantined already: the next failure changes no state.
    assert await judge(store, route("a", False, ("b",)), BASE + 4) == []


async def test_a_held_pool_is_stored_held_and_quarantined_by_its_peers_delivery(
    store: Store,
) -> None:
    for n in range(MIN_CALLS):
        await judge(store, route("a", False, ("b",)), BASE + n)
    (held,) = await store.pool_states(CARRIER)
    assert (held.state, held.held) == (ACTIVE, True)
    changes = await judge(store, route("b", True, ("a",)), BASE + 10)
    assert [(c.pool, c.old, c.new) for c in changes] == [("a", ACTIVE, QUARANTINED)]
    states = {r.pool: r for r in await store.pool_states(CARRIER)}
    assert (states["a"].state, states["a"].held) == (QUARANTINED, False)


async def test_pool_states_are_per_carrier_and_pool_health_lists_every_row_in_order(
    store: Store,
) -> None:
    await judge(store, route("b", True, carrier=CARRIER), BASE + 1)
    await judge(store, route("a", False, carrier=CARRIER), BASE + 2)
    await judge(store, route("a", True, carrier=OTHER_CARRIER), BASE + 3)
    await judge(store, route("a", None, carrier=""), BASE + 4)  # says nothing: no row
    await judge(store, route("b", False, carrier=""), BASE + 5)
    assert {r.pool for r in await store.pool_states(CARRIER)} == {"a", "b"}
    assert [r.pool for r in await store.pool_states(OTHER_CARRIER)] == ["a"]
    assert [r.pool for r in await store.pool_states("")] == ["b"]
    assert await store.pool_states("Smartfren") == []
    assert [(r.pool, r.carrier, r.recent) for r in await store.pool_health()] == [
        ("a", OTHER_CARRIER, "d"),
        ("a", CARRIER, "f"),
        ("b", "", "f"),
        ("b", CARRIER, "d"),
    ]
    held = [r.held for r in await store.pool_health()]
    assert all(type(h) is bool for h in held)  # PostgreSQL's BOOLEAN, SQLite's INTEGER


async def test_concurrent_ends_of_one_carriers_calls_are_judged_in_turn(
    new_database: NewDatabase,
) -> None:
    """Two gateways on one database end a pool's calls at once: every verdict counts."""
    database = new_database()
    stores = [await open_store(database), await open_store(database)]
    try:
        calls = [await placed_call(stores[0]) for _ in range(8)]
        await asyncio.gather(
            *(
                end_with(stores[n % 2], call_id, route("a", False, ("b",)), BASE + 10 + n)
                for n, call_id in enumerate(calls)
            )
        )
        (row,) = await stores[1].pool_states(CARRIER)
        assert (row.failures, row.recent, row.held) == (8, "f" * 8, True)
    finally:
        for opened in stores:
            await opened.close()


# -- probes ------------------------------------------------------------------------------


async def quarantine(store: Store, at: float) -> PoolHealthRecord:
    """Pool a quarantined for CARRIER at `at` (b delivers): its probe is due at + PROBE_S."""
    await judge(store, route("b", True, ("a",)), at - 10)
    for n in range(MIN_CALLS):
        await judge(store, route("a", False, ("b",)), at - MIN_CALLS + 1 + n)
    states = {r.pool: r for r in await store.pool_states(CARRIER)}
    assert states["a"].state is QUARANTINED
    assert states["a"].probe_at == at + PROBE_S
    return states["a"]


async def test_a_probe_is_claimed_only_when_due(store: Store) -> None:
    before = await quarantine(store, BASE)
    due = BASE + PROBE_S
    assert await store.claim_probe("a", CARRIER, due - 1, due + PROBE_S) is None
    change = await store.claim_probe("a", CARRIER, due, due + PROBE_S)
    assert change == PoolChange(
        "a", CARRIER, QUARANTINED, PROBING, due, before.failures, before.recent
    )
    states = {r.pool: r for r in await store.pool_states(CARRIER)}
    assert states["a"] == dataclasses.replace(
        before, state=PROBING, since=due, probe_at=due + PROBE_S, updated_at=due
    )


async def test_a_probe_is_claimed_once(store: Store) -> None:
    await quarantine(store, BASE)
    due = BASE + PROBE_S
    assert await store.claim_probe("a", CARRIER, due + 5, due + 5 + PROBE_S) is not None
    assert await store.claim_probe("a", CARRIER, due + 5, due + 5 + PROBE_S) is None
    assert await store.claim_probe("a", CARRIER, due + 6, due + 6 + PROBE_S) is None


async def test_of_concurrent_claims_exactly_one_takes_the_probe(
    new_database: NewDatabase,
) -> None:
    database = new_database()
    stores = [await open_store(database), await open_store(database)]
    try:
        await quarantine(stores[0], BASE)
        due = BASE + PROBE_S
        claims = await asyncio.gather(
            *(stores[n % 2].claim_probe("a", CARRIER, due, due + PROBE_S) for n in range(10))
        )
        assert sum(c is not None for c in claims) == 1
    finally:
        for opened in stores:
            await opened.close()


async def test_a_probe_that_never_ended_is_claimable_again_at_its_next_time(
    store: Store,
) -> None:
    await quarantine(store, BASE)
    due = BASE + PROBE_S
    assert await store.claim_probe("a", CARRIER, due, due + PROBE_S) is not None
    again = due + PROBE_S
    assert await store.claim_probe("a", CARRIER, again - 1, again + PROBE_S) is None
    change = await store.claim_probe("a", CARRIER, again, again + PROBE_S)
    assert change is not None
    assert (change.old, change.new, change.at) == (PROBING, PROBING, again)
    (row,) = [r for r in await store.pool_states(CARRIER) if r.pool == "a"]
    assert (row.state, row.since, row.probe_at) == (PROBING, again, again + PROBE_S)


async def test_no_probe_for_an_active_or_unknown_pool(store: Store) -> None:
    await judge(store, route("a", True), BASE)
    assert await store.claim_probe("a", CARRIER, BASE + 10_000, BASE + 20_000) is None
    assert await store.claim_probe("x", CARRIER, BASE + 10_000, BASE + 20_000) is None
    assert await store.claim_probe("a", OTHER_CARRIER, BASE + 10_000, BASE + 20_000) is None


async def test_a_delivered_probe_restores_the_pool_in_the_store(store: Store) -> None:
    await quarantine(store, BASE)
    due = BASE + PROBE_S
    await store.claim_probe("a", CARRIER, due, due + PROBE_S)
    changes = await judge(store, route("a", True, ("b",)), due + 5)
    assert [(c.old, c.new) for c in changes] == [(PROBING, ACTIVE)]
    (row,) = [r for r in await store.pool_states(CARRIER) if r.pool == "a"]
    assert (row.state, row.failures, row.probe_at, row.since) == (ACTIVE, 0, None, due + 5)


async def test_a_failed_probe_quarantines_the_pool_until_a_new_probe_time(store: Store) -> None:
    await quarantine(store, BASE)
    due = BASE + PROBE_S
    await store.claim_probe("a", CARRIER, due, due + PROBE_S)
    changes = await judge(store, route("a", False, ("b",)), due + 5)
    assert [(c.old, c.new) for c in changes] == [(PROBING, QUARANTINED)]
    (row,) = [r for r in await store.pool_states(CARRIER) if r.pool == "a"]
    assert (row.state, row.probe_at) == (QUARANTINED, due + 5 + PROBE_S)
    assert await store.claim_probe("a", CARRIER, due + 6, due + 6 + PROBE_S) is None


# -- conversion counting ----------------------------------------------------------------


def conversion_record(
    vid: str,
    *,
    phone: str | None = None,
    at: float = BASE + 10,
    block: str | None = BLOCK,
    carrier: str | None = CARRIER,
    **fields: Any,
) -> VerificationRecord:
    n = int(vid.rsplit("_", 1)[1])
    return make_verification(
        vid,
        phone=phone or f"{block or BLOCK}{n:05d}",
        created_at=at,
        phone_prefix=block,
        carrier=carrier,
        **fields,
    )


async def add(store: Store, record: VerificationRecord) -> VerificationRecord:
    call = make_call(
        "call" + record.id.removeprefix("vrf"),
        record.id,
        phone=record.phone,
        queued_at=record.created_at,
    )
    assert isinstance(await store.create_verification(record, call), Inserted)
    return record


async def conversion_rows(database: str) -> list[tuple[Any, ...]]:
    return [
        tuple(row)
        for row in await raw_query(
            database,
            "SELECT block, minute, carrier, region, created, approved FROM conversion "
            "ORDER BY block, minute",
        )
    ]


async def test_a_create_is_counted_in_its_block_and_minute(store: Store, database: str) -> None:
    await add(store, conversion_record("vrf_1", at=BASE + 10))
    await add(store, conversion_record("vrf_2", at=BASE + 59.9))
    await add(store, conversion_record("vrf_3", at=BASE + 60))
    await add(store, conversion_record("vrf_4", block=OTHER_BLOCK, carrier=None))
    assert await conversion_rows(database) == [
        (BLOCK, MINUTE, CARRIER, "ID", 2, 0),
        (BLOCK, MINUTE + 1, CARRIER, "ID", 1, 0),
        (OTHER_BLOCK, MINUTE, "", "ID", 1, 0),
    ]


async def test_an_approval_is_counted_in_the_minute_its_verification_was_created(
    store: Store, database: str
) -> None:
    await add(store, conversion_record("vrf_1", at=BASE + 50))
    await add(store, conversion_record("vrf_2", at=BASE + 55))
    assert await store.spend_attempt("vrf_1", False, BASE + 65) is not None  # a wrong code
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 2, 0)]
    approved = await store.spend_attempt("vrf_1", True, BASE + 70)
    assert isinstance(approved, VerificationRecord) and approved.status == "approved"
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 2, 1)]
    assert await store.spend_attempt("vrf_1", True, BASE + 71) is None  # approved once
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 2, 1)]


async def test_max_attempts_reached_is_no_approval(store: Store, database: str) -> None:
    await add(store, conversion_record("vrf_1", attempts_remaining=1))
    found = await store.spend_attempt("vrf_1", False, BASE + 20)
    assert isinstance(found, VerificationRecord) and found.status == "max_attempts_reached"
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 1, 0)]


async def test_a_cancel_takes_the_verification_out_of_its_count(
    store: Store, database: str
) -> None:
    await add(store, conversion_record("vrf_1", at=BASE + 10))
    await add(store, conversion_record("vrf_2", at=BASE + 20))
    assert await store.set_status("vrf_1", VerificationStatus.CANCELED, BASE + 70)
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 1, 0)]
    # Only a pending one is canceled, once.
    assert not await store.set_status("vrf_1", VerificationStatus.CANCELED, BASE + 71)
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 1, 0)]


async def test_an_expired_verification_stays_counted_unconverted(
    store: Store, database: str
) -> None:
    await add(store, conversion_record("vrf_1", expires_at=BASE + 60))
    await add(store, conversion_record("vrf_2", at=BASE + 20))
    assert await store.expire_due(BASE + 60) == ["vrf_1"]
    assert await store.set_status("vrf_2", VerificationStatus.EXPIRED, BASE + 70)
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 2, 0)]


async def test_a_failed_verification_is_taken_out_of_its_count(store: Store, database: str) -> None:
    """Never delivered: pool health's matter, not conversion's."""
    await add(store, conversion_record("vrf_1", at=BASE + 10))
    await add(store, conversion_record("vrf_2", at=BASE + 20))
    assert await store.set_status("vrf_1", VerificationStatus.FAILED, BASE + 70)
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 1, 0)]
    assert not await store.set_status("vrf_1", VerificationStatus.FAILED, BASE + 71)
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 1, 0)]


async def test_a_call_that_fails_its_verification_takes_it_out_of_its_count(
    store: Store, database: str
) -> None:
    for n in (1, 2, 3):
        await add(store, conversion_record(f"vrf_{n}", at=BASE + n))
    common: dict[str, Any] = {"cause": 21, "sip_code": 603, "reason": None, "at": BASE + 30}
    failed = CallStatus.FAILED
    await store.end_call(
        "call_1", call_status=failed, outcome="rejected", fail_verification=True, **common
    )
    # A step to come: the verification stays pending, and counted.
    await store.end_call(
        "call_2",
        call_status=failed,
        outcome="rejected",
        fail_verification=True,
        next_at=BASE + 40,
        **common,
    )
    await store.end_call(
        "call_3",
        call_status=CallStatus.COMPLETED,
        outcome="delivered",
        fail_verification=False,
        delivered=True,
        **common,
    )
    assert [await status_of(store, f"vrf_{n}") for n in (1, 2, 3)] == [
        "failed",
        "pending",
        "pending",
    ]
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 2, 0)]
    # Its end reported again: taken out once.
    await store.end_call(
        "call_1", call_status=failed, outcome="rejected", fail_verification=True, **common
    )
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 2, 0)]


async def test_a_verification_that_failed_after_a_delivered_call_stays_counted(
    store: Store, database: str
) -> None:
    # The flash call delivered the code and nobody checked it; the voice step that
    # followed failed: never converted, like a pumped one.
    await add(store, conversion_record("vrf_1", at=BASE + 1))
    common: dict[str, Any] = {"cause": None, "sip_code": None, "reason": None}
    await store.end_call(
        "call_1",
        call_status=CallStatus.COMPLETED,
        outcome="delivered",
        fail_verification=False,
        delivered=True,
        at=BASE + 10,
        **common,
    )
    assert await store.set_status("vrf_1", VerificationStatus.FAILED, BASE + 70)
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 1, 0)]


async def test_a_superseded_verification_leaves_its_own_minutes_count(
    store: Store, database: str
) -> None:
    phone = BLOCK + "00001"
    await add(store, conversion_record("vrf_1", phone=phone, at=BASE + 10))
    await add(store, conversion_record("vrf_2", phone=phone, at=BASE + 70))  # asked again
    assert await status_of(store, "vrf_1") == "canceled"
    assert await conversion_rows(database) == [
        (BLOCK, MINUTE, CARRIER, "ID", 0, 0),
        (BLOCK, MINUTE + 1, CARRIER, "ID", 1, 0),
    ]


async def test_another_keys_verification_of_the_phone_is_not_superseded(
    store: Store, database: str
) -> None:
    phone = BLOCK + "00001"
    await add(store, conversion_record("vrf_1", phone=phone, at=BASE + 10))
    await add(store, conversion_record("vrf_2", phone=phone, at=BASE + 20, api_key_id="key_2"))
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 2, 0)]


async def test_sandbox_verifications_are_never_counted(store: Store, database: str) -> None:
    phone = BLOCK + "00001"
    await add(store, conversion_record("vrf_1", phone=phone, sandbox=True))
    assert await conversion_rows(database) == []
    await store.spend_attempt("vrf_1", True, BASE + 20)
    assert await conversion_rows(database) == []
    await add(store, conversion_record("vrf_2", phone=phone, sandbox=True, at=BASE + 30))
    assert await store.set_status("vrf_2", VerificationStatus.CANCELED, BASE + 40)
    assert await conversion_rows(database) == []
    # A real one superseding a sandbox one takes nothing off for it.
    await add(store, conversion_record("vrf_3", phone=phone, sandbox=True, at=BASE + 50))
    await add(store, conversion_record("vrf_4", phone=phone, at=BASE + 55))
    assert await status_of(store, "vrf_3") == "canceled"
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 1, 0)]


async def test_a_real_verification_superseded_by_a_sandbox_one_leaves_its_count(
    store: Store, database: str
) -> None:
    phone = BLOCK + "00001"
    await add(store, conversion_record("vrf_1", phone=phone, at=BASE + 10))
    await add(store, conversion_record("vrf_2", phone=phone, sandbox=True, at=BASE + 20))
    assert await status_of(store, "vrf_1") == "canceled"
    assert await conversion_rows(database) == [(BLOCK, MINUTE, CARRIER, "ID", 0, 0)]


async def test_a_verification_without_a_block_is_not_counted(store: Store, database: str) -> None:
    await add(store, conversion_record("vrf_1", block=None, phone="+6281234500001"))
    assert await conversion_rows(database) == []


async def status_of(store: Store, vid: str) -> str:
    found = await store.verification(vid)
    assert found is not None
    return found[0].status


# -- conversion_counts and forget_conversion ------------------------------------------------


async def fill(store: Store) -> None:
    """BLOCK (CARRIER): 3 in MINUTE (1 approved), 2 in MINUTE + 1, 1 in MINUTE + 2;
    OTHER_BLOCK (no carrier): 2 in MINUTE, 1 approved."""
    n = iter(range(1, 100))
    for minute, created, approved in ((0, 3, 1), (1, 2, 0), (2, 1, 0)):
        for k in range(created):
            record = await add(
                store, conversion_record(f"vrf_{next(n)}", at=BASE + minute * 60 + k)
            )
            if k < approved:
                await store.spend_attempt(record.id, True, record.created_at + 1)
    for k in range(2):
        record = await add(
            store,
            conversion_record(f"vrf_{next(n)}", at=BASE + k, block=OTHER_BLOCK, carrier=None),
        )
        if k == 0:
            await store.spend_attempt(record.id, True, record.created_at + 1)


async def test_conversion_counts_per_block_carrier_and_country(store: Store) -> None:
    await fill(store)
    counts = await store.conversion_counts(BASE, BASE + 180, 1)
    assert sorted(counts) == sorted(
        [
            (AlertKind.BLOCK, BLOCK, 6, 1),
            (AlertKind.BLOCK, OTHER_BLOCK, 2, 1),
            # OTHER_BLOCK's carrier is not known: no carrier target.
            (AlertKind.CARRIER, CARRIER_TARGET, 6, 1),
            (AlertKind.COUNTRY, "ID", 8, 2),
        ]
    )
    assert all(type(kind) is AlertKind for kind, *_ in counts)
    assert all(type(c) is int and type(a) is int for *_, c, a in counts)


async def test_conversion_counts_leave_out_targets_under_min_created(store: Store) -> None:
    await fill(store)
    counts = await store.conversion_counts(BASE, BASE + 180, 3)
    assert sorted(counts) == sorted(
        [
            (AlertKind.BLOCK, BLOCK, 6, 1),
            (AlertKind.CARRIER, CARRIER_TARGET, 6, 1),
            (AlertKind.COUNTRY, "ID", 8, 2),
        ]
    )
    assert await store.conversion_counts(BASE, BASE + 180, 9) == []


@pytest.mark.parametrize(
    ("since", "until", "block"),
    [
        (BASE, BASE + 120, 5),  # minutes 0 and 1: [since, until) holds their starts
        (BASE, BASE + 60, 3),
        (BASE + 0.5, BASE + 180, 3),  # minute 0 starts before since
        (BASE + 60, BASE + 180, 3),
        (BASE - 3600, BASE, 0),
        (BASE + 180, BASE + 3600, 0),
    ],
)
async def test_conversion_counts_the_minutes_that_start_in_the_window(
    store: Store, since: float, until: float, block: int
) -> None:
    await fill(store)
    counts = {
        (kind, target): created
        for kind, target, created, _ in await store.conversion_counts(since, until, 1)
    }
    assert counts.get((AlertKind.BLOCK, BLOCK), 0) == block


# The bound is a minute number, an integer, on both backends: asyncpg truncates a float
# bound to an int4 parameter (28333342.008 becomes 28333342), which left out, on
# PostgreSQL only, a minute that starts before `until` and contains it.
async def test_conversion_counts_a_minute_that_starts_before_until_on_both_backends(
    store: Store,
) -> None:
    await fill(store)
    counts = {
        (kind, target): created
        for kind, target, created, _ in await store.conversion_counts(BASE, BASE + 120.5, 1)
    }
    # Minute 2 starts at BASE + 120, inside [since, until): its one verification counts.
    assert counts[(AlertKind.BLOCK, BLOCK)] == 6


async def test_forget_conversion_drops_the_minutes_before(store: Store, database: str) -> None:
    await fill(store)
    assert await store.forget_conversion(BASE + 30) == 0  # minute 0 starts before, ends after
    assert await store.forget_conversion(BASE + 60) == 2  # minute 0 of both blocks
    assert [row[:2] for row in await conversion_rows(database)] == [
        (BLOCK, MINUTE + 1),
        (BLOCK, MINUTE + 2),
    ]


# -- alerts ------------------------------------------------------------------------------------


def alert(
    aid: str,
    kind: AlertKind = AlertKind.BLOCK,
    target: str = BLOCK,
    *,
    at: float = BASE,
    blocked_until: float | None = None,
) -> AlertRecord:
    return AlertRecord(
        id=aid,
        kind=kind,
        target=target,
        created=10,
        approved=1,
        mode="block" if blocked_until is not None else "report",
        raised_at=at,
        blocked_until=blocked_until,
    )


async def test_an_alert_reads_back_as_raised(store: Store) -> None:
    raised = alert("alr_1", blocked_until=BASE + 600)
    assert await store.raise_alert(raised)
    assert await store.alert("alr_1") == raised
    assert await store.alert("alr_none") is None
    found = await store.alert("alr_1")
    assert found is not None and type(found.kind) is AlertKind
    assert found.rate == 0.1


async def test_a_target_has_one_open_alert_at_a_time(store: Store) -> None:
    assert await store.raise_alert(alert("alr_1"))
    assert not await store.raise_alert(alert("alr_2"))  # another gateway's, same target
    assert await store.alert("alr_2") is None
    assert await store.raise_alert(alert("alr_3", AlertKind.BLOCK, OTHER_BLOCK))
    assert await store.raise_alert(alert("alr_4", AlertKind.CARRIER, BLOCK))  # another kind
    cleared = await store.clear_alert("alr_1", BASE + 10, "recovered")
    assert cleared is not None
    assert await store.raise_alert(alert("alr_5", at=BASE + 20))  # open again
    assert not await store.raise_alert(alert("alr_6", at=BASE + 30))


async def test_alerts_are_listed_newest_first_open_or_all(store: Store) -> None:
    await store.raise_alert(alert("alr_b", AlertKind.BLOCK, "+62811", at=BASE + 10))
    await store.raise_alert(alert("alr_a", AlertKind.BLOCK, "+62812", at=BASE + 10))
    await store.raise_alert(alert("alr_c", AlertKind.CARRIER, CARRIER, at=BASE + 30))
    await store.raise_alert(alert("alr_d", AlertKind.COUNTRY, "ID", at=BASE + 20))
    await store.clear_alert("alr_d", BASE + 40, "expired")
    assert [a.id for a in await store.alerts(True, 100)] == ["alr_c", "alr_a", "alr_b"]
    assert [a.id for a in await store.alerts(False, 100)] == ["alr_c", "alr_d", "alr_a", "alr_b"]
    assert [a.id for a in await store.alerts(False, 2)] == ["alr_c", "alr_d"]
    (cleared,) = [a for a in await store.alerts(False, 100) if a.id == "alr_d"]
    assert (cleared.cleared_at, cleared.cleared_by) == (BASE + 40, "expired")


async def test_an_alert_is_cleared_once(store: Store) -> None:
    raised = alert("alr_1", blocked_until=BASE + 600)
    await store.raise_alert(raised)
    cleared = await store.clear_alert("alr_1", BASE + 60, "expired")
    assert cleared == dataclasses.replace(raised, cleared_at=BASE + 60, cleared_by="expired")
    assert await store.clear_alert("alr_1", BASE + 61, "admin") is None
    assert await store.alert("alr_1") == cleared
    assert await store.clear_alert("alr_none", BASE + 61, "admin") is None


@pytest.mark.parametrize(
    ("kind", "target", "left"),
    [
        (AlertKind.BLOCK, BLOCK, {OTHER_BLOCK}),
        (AlertKind.CARRIER, CARRIER_TARGET, {OTHER_BLOCK}),  # OTHER_BLOCK has no carrier
        (AlertKind.COUNTRY, "ID", set()),
        (AlertKind.BLOCK, "+62899", {BLOCK, OTHER_BLOCK}),
    ],
)
async def test_an_admin_lifting_an_alert_forgets_its_targets_counts(
    store: Store, database: str, kind: AlertKind, target: str, left: set[str]
) -> None:
    await fill(store)
    await store.raise_alert(alert("alr_1", kind, target))
    assert await store.clear_alert("alr_1", BASE + 200, "admin") is not None
    assert {row[0] for row in await conversion_rows(database)} == left


async def test_after_a_lift_the_earlier_verifications_count_nothing(
    store: Store, database: str
) -> None:
    # Still pending at the lift, they end after it: their rows go below zero (a cancel)
    # or approve with nothing created; the counts read them as nothing.
    for n in (1, 2, 3):
        await add(store, conversion_record(f"vrf_{n}", at=BASE + n))
    await store.raise_alert(alert("alr_1"))
    assert await store.clear_alert("alr_1", BASE + 30, "admin") is not None
    assert await conversion_rows(database) == []
    assert await store.set_status("vrf_1", VerificationStatus.CANCELED, BASE + 40)
    assert await store.set_status("vrf_2", VerificationStatus.FAILED, BASE + 40)
    await store.spend_attempt("vrf_3", True, BASE + 41)
    assert await store.conversion_counts(BASE - 60, BASE + 120, 0) == [
        (AlertKind.BLOCK, BLOCK, 0, 0),
        (AlertKind.CARRIER, CARRIER_TARGET, 0, 0),
        (AlertKind.COUNTRY, "ID", 0, 0),
    ]


async def test_an_alert_whose_block_expired_forgets_its_targets_counts(
    store: Store, database: str
) -> None:
    # The block is over: the target is flagged again only by verifications made after.
    await fill(store)
    await store.raise_alert(alert("alr_1", AlertKind.BLOCK, BLOCK))
    assert await store.clear_alert("alr_1", BASE + 200, "expired") is not None
    assert {row[0] for row in await conversion_rows(database)} == {OTHER_BLOCK}


async def test_an_alert_that_recovered_keeps_the_counts(store: Store, database: str) -> None:
    await fill(store)
    before = await conversion_rows(database)
    await store.raise_alert(alert("alr_1"))
    assert await store.clear_alert("alr_1", BASE + 200, "recovered") is not None
    assert await conversion_rows(database) == before


# -- migration 14 --------------------------------------------------------------------------------


def test_migration_14_is_on_both_backends() -> None:
    assert len(MIGRATIONS) == len(PG_MIGRATIONS) >= 14
    for script in (MIGRATIONS[13], PG_MIGRATIONS[13]):
        for table in ("pool_health", "conversion", "alerts"):
            assert f"CREATE TABLE {table}" in script


async def test_migration_14_adds_pool_health_conversion_and_alerts_to_a_schema_13_database(
    database: str,
) -> None:
    await make_schema(database, 13)  # before pool health
    old = make_verification("vrf_old", phone=BLOCK + "00009", created_at=BASE, carrier=CARRIER)
    old = dataclasses.replace(old, phone_prefix=BLOCK)
    old_call = make_call("call_old", "vrf_old", phone=old.phone, queued_at=BASE)
    await raw_insert(database, "verifications", dataclasses.asdict(old))
    await raw_insert(database, "calls", dataclasses.asdict(old_call))

    store = await open_store(database)
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        assert await store.verification("vrf_old") == (old, old_call)
        # Nothing was counted for the verifications already there; new ones are.
        assert await store.conversion_counts(BASE - 3600, BASE + 3600, 1) == []
        await add(store, conversion_record("vrf_999999", at=BASE + 5))
        assert (AlertKind.BLOCK, BLOCK, 1, 0) in await store.conversion_counts(BASE, BASE + 60, 1)
        # Approving the one from before counts its approval only.
        await store.spend_attempt("vrf_old", True, BASE + 10)
        assert (AlertKind.BLOCK, BLOCK, 1, 1) in await store.conversion_counts(BASE, BASE + 60, 1)
        assert await store.pool_health() == []
        await judge(store, route("a", False), BASE + 20)
        assert [r.pool for r in await store.pool_health()] == ["a"]
        assert await store.alerts(False, 10) == []
        assert await store.raise_alert(alert("alr_1"))
        assert not await store.raise_alert(alert("alr_2"))  # the partial unique index
    finally:
        await store.close()
    reopened = await open_store(database)
    try:
        assert await reopened.schema_version() == len(MIGRATIONS)
        assert [a.id for a in await reopened.alerts(True, 10)] == ["alr_1"]
    finally:
        await reopened.close()
