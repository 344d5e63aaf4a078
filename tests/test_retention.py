"""Retention: old finished verifications go, with their calls, events and webhooks, in
batches that let the API's queries through; the app runs it while it serves."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import DatabaseConfig
from gateway.retention import DAY_S, Retention, forget_old
from gateway.store import Store, open_store
from tests.conftest import make_call, make_config, make_verification, raw_query
from tests.fakes import FakePbx

T0 = 1_700_000_000.0
BEFORE = T0 + 10 * DAY_S  # the cut-off of the tests: what is older goes
PHONE = "+6281234567890"
TABLES = ("verifications", "calls", "call_events", "webhook_outbox")


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    """A store on each backend."""
    opened = await open_store(database)
    yield opened
    await opened.close()


async def counts(database: str) -> dict[str, int]:
    """Rows per table, read on a connection of its own: what is really stored."""
    return {t: int((await raw_query(database, f"SELECT COUNT(*) FROM {t}"))[0][0]) for t in TABLES}


async def ids(database: str) -> set[str]:
    return {row[0] for row in await raw_query(database, "SELECT id FROM verifications")}


async def add(store: Store, vid: str, created_at: float, *, webhook: str | None = None) -> None:
    """A verification with a callback URL, its call rung and ended (failed: busy), so it
    has call events and a webhook; `webhook` is what became of that: delivered,
    given_up, or None (still to deliver)."""
    record = make_verification(
        vid, phone=PHONE, created_at=created_at, callback_url="https://example.test/hook"
    )
    call_id = "call_" + vid
    call = make_call(call_id, vid, phone=PHONE, queued_at=created_at)
    await store.create_verification(record, call)
    await store.call_progress(call_id, "ringing", "ringing_at", created_at + 2, "ringing")
    if webhook == "live":  # the call has not ended
        return
    await store.end_call(
        call_id,
        call_status="failed",
        outcome="busy",
        cause=17,
        sip_code=486,
        reason=None,
        at=created_at + 3,
        fail_verification=True,
    )
    [hook] = await store.webhooks_of(vid)
    if webhook is not None:
        await store.webhook_attempted(
            hook.id,
            at=created_at + 4,
            status=200 if webhook == "delivered" else 500,
            error=None,
            delivered=webhook == "delivered",
            next_attempt_at=None,
        )


async def test_old_finished_verifications_go_with_their_calls_events_and_webhooks(
    store: Store, database: str
) -> None:
    await add(store, "vrf_delivered", T0, webhook="delivered")
    await add(store, "vrf_given_up", T0 + 1, webhook="given_up")
    await add(store, "vrf_new", BEFORE + 1, webhook="delivered")
    before = await counts(database)
    assert before["call_events"] >= 3 and before["webhook_outbox"] == 3

    assert await forget_old(store, BEFORE) == 2

    assert await ids(database) == {"vrf_new"}
    assert await counts(database) == {
        "verifications": 1,
        "calls": 1,
        "call_events": before["call_events"] // 3,
        "webhook_outbox": 1,
    }
    assert await forget_old(store, BEFORE) == 0  # nothing left to do


async def test_what_is_still_in_use_is_kept_however_old(store: Store, database: str) -> None:
    await add(store, "vrf_webhook_due", T0, webhook=None)  # a delivery still to try
    await add(store, "vrf_ringing", T0 + 1, webhook="live")  # a call still up
    await add(store, "vrf_done", T0 + 2, webhook="delivered")
    await store.set_status("vrf_ringing", "approved", T0 + 3)  # approved, still ringing

    assert await forget_old(store, BEFORE) == 1

    assert await ids(database) == {"vrf_webhook_due", "vrf_ringing"}


async def test_a_pending_verification_is_kept_however_old(store: Store, database: str) -> None:
    await add(store, "vrf_pending", T0, webhook="live")
    await store.end_call(
        "call_vrf_pending",
        call_status="completed",
        outcome="delivered",
        cause=16,
        sip_code=None,
        reason="ring_timeout",
        at=T0 + 10,
        fail_verification=False,
    )
    assert await forget_old(store, BEFORE) == 0
    assert await ids(database) == {"vrf_pending"}


async def test_the_sweep_goes_in_batches_and_lets_other_queries_through(
    store: Store, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(12):
        # Every fourth still has a webhook to deliver: kept, and stepped over.
        await add(store, f"vrf_{n:02}", T0 + n, webhook=None if n % 4 == 0 else "delivered")
    await add(store, "vrf_new", BEFORE + 1, webhook="delivered")
    seen: list[str] = []
    forget = store.forget_verifications

    async def counted(before: float, after: int, limit: int) -> tuple[int, int | None]:
        seen.append("batch")
        return await forget(before, after, limit)

    monkeypatch.setattr(store, "forget_verifications", counted)
    # The sweep's own pause between batches (BATCH_PAUSE_S): a shorter one left a
    # PostgreSQL round trip on a loaded machine no time to fit in (CI, 2026-12-07).

    async def other_queries() -> None:
        while True:
            await store.ping()
            seen.append("query")
            await asyncio.sleep(0)

    queries = asyncio.create_task(other_queries())
    try:
        assert await forget_old(store, BEFORE, batch=3) == 9
    finally:
        queries.cancel()
    assert await ids(database) == {"vrf_00", "vrf_04", "vrf_08", "vrf_new"}
    batches = [i for i, what in enumerate(seen) if what == "batch"]
    assert len(batches) == 5  # 13 rows, 3 at a time
    # Between two batches the others' queries ran.
    assert all("query" in seen[a:b] for a, b in itertools.pairwise(batches))


async def test_the_sweep_repeats_and_stops(store: Store, database: str) -> None:
    now = [T0 + 100 * DAY_S]
    await add(store, "vrf_a", T0, webhook="delivered")
    sweeps = Retention(store, days=90, clock=lambda: now[0], interval=0.05)
    sweeps.start()
    try:
        await until(lambda: ids_are(database, set()))
        await add(store, "vrf_b", T0 + 1, webhook="delivered")
        await until(lambda: ids_are(database, set()))  # the next sweep
    finally:
        await sweeps.stop()


async def test_no_sweep_with_zero_days(store: Store, database: str) -> None:
    await add(store, "vrf_a", T0, webhook="delivered")
    sweeps = Retention(store, days=0, interval=0.01)
    sweeps.start()
    await asyncio.sleep(0.1)
    await sweeps.stop()
    assert await ids(database) == {"vrf_a"}


async def test_the_app_sweeps_while_it_serves(database: str) -> None:
    store = await open_store(database)
    try:
        await add(store, "vrf_old", time.time() - 40 * DAY_S, webhook="delivered")
        await add(store, "vrf_recent", time.time() - 20 * DAY_S, webhook="delivered")
    finally:
        await store.close()
    config = make_config(DatabaseConfig(url=database, retention_days=31))
    pbx = FakePbx()
    async with TestServer(create_app(config, pbx=pbx), host="127.0.0.1"):
        await until(lambda: ids_are(database, {"vrf_recent"}))
    await pbx.close()


async def ids_are(database: str, expected: set[str]) -> bool:
    return await ids(database) == expected


async def until(done: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not await done():
            await asyncio.sleep(0.02)
