"""Operator alerts: the conversion watch's sweeps on a real SQLite store and a fake clock,
pool changes told, and the signed posts to alerts.url."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from gateway import alerts as alerts_module
from gateway.alerts import AlertPoster, Alerts
from gateway.caller_health import PoolChange, PoolState
from gateway.config import AlertsConfig, Config, ConversionConfig, WebhooksConfig
from gateway.store import AlertKind, AlertRecord, Inserted, Store, VerificationRecord, open_store
from gateway.times import timestamp
from tests.conftest import make_call, make_config, make_verification
from tests.fakes import until

SECRET = "whsec_" + base64.b64encode(b"unit-test-alerts-secret-0123456789").decode()
MINUTE = 28_333_340
BASE = MINUTE * 60.0  # a minute's start
BLOCK = "+62812345"  # low conversion, no carrier known
GOOD_BLOCK = "+62815999"  # converts well, carrier OTHER_CARRIER
OTHER_CARRIER = "Indosat Ooredoo Hutchison"
MIN_RATE = 0.5
MIN_VERIFICATIONS = 4
WINDOW_S = 600
GRACE_S = 60
BLOCK_S = 600


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Metrics:
    pools: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    flagged: list[str] = dataclasses.field(default_factory=list)

    def pool_changed(self, pool: str, state: str) -> None:
        self.pools.append((pool, state))

    def conversion_flagged(self, kind: str) -> None:
        self.flagged.append(kind)


def conversion(mode: str = "report", **fields: Any) -> ConversionConfig:
    settings: dict[str, Any] = {
        "mode": mode,
        "min_rate": MIN_RATE,
        "min_verifications": MIN_VERIFICATIONS,
        "window_seconds": WINDOW_S,
        "grace_seconds": GRACE_S,
        "block_seconds": BLOCK_S,
    }
    return ConversionConfig(**(settings | fields))


def alerts_config(database: str, mode: str = "report", **fields: Any) -> Config:
    return make_config(database, conversion=conversion(mode, **fields))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(f"sqlite:///{tmp_path / 'gateway.sqlite3'}")
    yield opened
    await opened.close()


@pytest.fixture
def database(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'gateway.sqlite3'}"


_serial = iter(range(1, 1_000_000))


async def created(
    store: Store, block: str, at: float, *, carrier: str | None = None
) -> VerificationRecord:
    n = next(_serial)
    record = make_verification(
        f"vrf_{n}",
        phone=f"{block}{n:05d}",
        created_at=at,
        expires_at=at + 3600,
        phone_prefix=block,
        carrier=carrier,
    )
    call = make_call(f"call_{n}", record.id, phone=record.phone, queued_at=at)
    assert isinstance(await store.create_verification(record, call), Inserted)
    return record


async def traffic(store: Store) -> list[VerificationRecord]:
    """In minute BASE: BLOCK gets MIN_VERIFICATIONS verifications, none approved; GOOD_BLOCK
    gets twice as many, all approved (so the country converts well enough). BLOCK's."""
    low = [await created(store, BLOCK, BASE + 1 + n) for n in range(MIN_VERIFICATIONS)]
    for n in range(2 * MIN_VERIFICATIONS):
        good = await created(store, GOOD_BLOCK, BASE + 10 + n, carrier=OTHER_CARRIER)
        await store.spend_attempt(good.id, True, good.created_at + 5)
    return low


# -- report mode ----------------------------------------------------------------------


async def test_report_mode_flags_a_block_under_min_rate_and_suspends_nothing(
    store: Store, database: str
) -> None:
    await traffic(store)
    clock, metrics = Clock(BASE + 130), Metrics()
    watch = Alerts(alerts_config(database), store, metrics, clock=clock)
    await watch.sweep()
    (alert,) = await store.alerts(True, 10)
    assert dataclasses.replace(alert, id="x") == AlertRecord(
        id="x",
        kind=AlertKind.BLOCK,
        target=BLOCK,
        created=MIN_VERIFICATIONS,
        approved=0,
        mode="report",
        raised_at=BASE + 130,
        blocked_until=None,
    )
    assert alert.id.startswith("alr_")
    assert metrics.flagged == ["block"]
    assert watch.suspended(BLOCK, None, "ID") is None
    # Still low at the next look: one alert, flagged once.
    clock.now += 5
    await watch.sweep()
    assert [a.id for a in await store.alerts(False, 10)] == [alert.id]
    assert metrics.flagged == ["block"]


async def test_a_report_alert_clears_as_recovered_when_approvals_come(
    store: Store, database: str
) -> None:
    low = await traffic(store)
    clock = Clock(BASE + 130)
    watch = Alerts(alerts_config(database), store, clock=clock)
    await watch.sweep()
    (alert,) = await store.alerts(True, 10)
    for record in low[:2]:  # 2 of 4: at min_rate, not under it
        await store.spend_attempt(record.id, True, BASE + 135)
    clock.now = BASE + 140
    await watch.sweep()
    assert await store.alerts(True, 10) == []
    cleared = await store.alert(alert.id)
    assert cleared is not None
    assert (cleared.cleared_at, cleared.cleared_by) == (BASE + 140, "recovered")


async def test_a_target_under_min_verifications_is_not_flagged(store: Store, database: str) -> None:
    for n in range(MIN_VERIFICATIONS - 1):
        await created(store, BLOCK, BASE + n)
    watch = Alerts(alerts_config(database), store, clock=Clock(BASE + 130))
    await watch.sweep()
    assert await store.alerts(False, 10) == []


async def test_carriers_and_countries_are_flagged_too(store: Store, database: str) -> None:
    for n in range(MIN_VERIFICATIONS):
        await created(store, BLOCK, BASE + n, carrier="Telkomsel")
    metrics = Metrics()
    watch = Alerts(alerts_config(database), store, metrics, clock=Clock(BASE + 130))
    await watch.sweep()
    found = {(a.kind, a.target) for a in await store.alerts(True, 10)}
    assert found == {
        (AlertKind.BLOCK, BLOCK),
        (AlertKind.CARRIER, "ID:Telkomsel"),
        (AlertKind.COUNTRY, "ID"),
    }
    assert sorted(metrics.flagged) == ["block", "carrier", "country"]


# -- block mode -------------------------------------------------------------------------


async def test_block_mode_suspends_the_target_for_block_seconds(
    store: Store, database: str
) -> None:
    await traffic(store)
    clock = Clock(BASE + 130)
    watch = Alerts(alerts_config(database, "block"), store, clock=clock)
    assert watch.suspended(BLOCK, None, "ID") is None  # nothing learnt before a look
    await watch.sweep()
    (alert,) = await store.alerts(True, 10)
    assert (alert.mode, alert.blocked_until) == ("block", BASE + 130 + BLOCK_S)
    assert watch.suspended(BLOCK, None, "ID") == BLOCK_S
    assert watch.suspended(BLOCK, "Telkomsel", "MY") == BLOCK_S
    assert watch.suspended(GOOD_BLOCK, OTHER_CARRIER, "ID") is None
    assert watch.suspended(None, None, "ID") is None
    clock.now += 100
    assert watch.suspended(BLOCK, None, "ID") == BLOCK_S - 100


async def test_a_block_expires_after_block_seconds(store: Store, database: str) -> None:
    await traffic(store)
    clock = Clock(BASE + 130)
    watch = Alerts(alerts_config(database, "block"), store, clock=clock)
    await watch.sweep()
    (alert,) = await store.alerts(True, 10)
    clock.now = BASE + 130 + BLOCK_S
    assert watch.suspended(BLOCK, None, "ID") is None  # over, even before the next look
    await watch.sweep()
    assert await store.alerts(True, 10) == []
    cleared = await store.alert(alert.id)
    assert cleared is not None
    assert (cleared.cleared_at, cleared.cleared_by) == (BASE + 130 + BLOCK_S, "expired")


async def test_a_block_is_not_lifted_by_approvals_during_it(store: Store, database: str) -> None:
    low = await traffic(store)
    clock = Clock(BASE + 130)
    watch = Alerts(alerts_config(database, "block"), store, clock=clock)
    await watch.sweep()
    for record in low:
        await store.spend_attempt(record.id, True, BASE + 135)
    clock.now = BASE + 140
    await watch.sweep()
    assert len(await store.alerts(True, 10)) == 1
    assert watch.suspended(BLOCK, None, "ID") == BLOCK_S - 10


async def test_an_admin_lift_ends_the_block_and_starts_the_counts_afresh(
    store: Store, database: str
) -> None:
    await traffic(store)
    clock = Clock(BASE + 130)
    watch = Alerts(alerts_config(database, "block"), store, clock=clock)
    await watch.sweep()
    (alert,) = await store.alerts(True, 10)
    clock.now += 10
    lifted = await watch.lift(alert.id)
    assert lifted is not None
    assert (lifted.id, lifted.cleared_at, lifted.cleared_by) == (alert.id, BASE + 140, "admin")
    assert watch.suspended(BLOCK, None, "ID") is None
    await watch.sweep()  # the same minutes: the block's counts are gone, no new alert
    assert await store.alerts(True, 10) == []
    assert await watch.lift(alert.id) is None
    assert await watch.lift("alr_none") is None


async def test_another_gateways_block_is_learnt_at_the_next_look(
    store: Store, database: str
) -> None:
    await traffic(store)
    clock = Clock(BASE + 130)
    config = alerts_config(database, "block")
    first, second = Alerts(config, store, clock=clock), Alerts(config, store, clock=clock)
    await first.sweep()
    assert second.suspended(BLOCK, None, "ID") is None
    await second.sweep()  # raises nothing of its own: the target has its alert
    assert len(await store.alerts(False, 10)) == 1
    assert second.suspended(BLOCK, None, "ID") == BLOCK_S
    # Lifted on the first: the second goes on refusing until its next look.
    (alert,) = await store.alerts(True, 10)
    await first.lift(alert.id)
    assert second.suspended(BLOCK, None, "ID") == BLOCK_S
    await second.sweep()
    assert second.suspended(BLOCK, None, "ID") is None


# -- the window and the grace --------------------------------------------------------------


async def test_grace_seconds_keep_minutes_that_end_within_them_out(
    store: Store, database: str
) -> None:
    for n in range(MIN_VERIFICATIONS):
        await created(store, BLOCK, BASE + n)
    # Minute BASE ends at BASE + 60: counted once that is grace_seconds old.
    clock = Clock(BASE + 60 + GRACE_S - 1)
    watch = Alerts(alerts_config(database), store, clock=clock)
    await watch.sweep()
    assert await store.alerts(False, 10) == []
    clock.now = BASE + 60 + GRACE_S + 1
    await watch.sweep()
    assert {a.target for a in await store.alerts(True, 10)} == {BLOCK, "ID"}


async def test_verifications_younger_than_grace_seconds_are_not_counted(
    store: Store, database: str
) -> None:
    for n in range(MIN_VERIFICATIONS):
        await created(store, BLOCK, BASE + 30 + n)
    watch = Alerts(alerts_config(database), store, clock=Clock(BASE + 70))
    await watch.sweep()
    assert await store.alerts(False, 10) == []


async def test_minutes_leave_the_window_and_are_forgotten(store: Store, database: str) -> None:
    for n in range(MIN_VERIFICATIONS):
        await created(store, BLOCK, BASE + n)
    clock = Clock(BASE + WINDOW_S + 1)  # minute BASE started before the window
    watch = Alerts(alerts_config(database), store, clock=clock)
    await watch.sweep()
    assert await store.alerts(False, 10) == []
    assert await store.conversion_counts(0, BASE + 86400, 1) != []  # kept: its minute ends later
    clock.now = BASE + WINDOW_S + 60
    await watch.sweep()
    assert await store.conversion_counts(0, BASE + 86400, 1) == []


# -- pool changes ----------------------------------------------------------------------------


def change(new: PoolState, old: PoolState = PoolState.ACTIVE) -> PoolChange:
    return PoolChange("a", "Telkomsel", old, new, BASE + 5, 10, "d" + "f" * 10)


async def test_pool_changes_are_logged_and_counted(
    store: Store, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    watch = Alerts(alerts_config(database), store, metrics, clock=Clock(BASE))
    caplog.set_level(logging.INFO, logger="gateway.alerts")
    watch.pool_changed(
        [
            change(PoolState.QUARANTINED),
            change(PoolState.PROBING, PoolState.QUARANTINED),
            change(PoolState.ACTIVE, PoolState.PROBING),
        ]
    )
    assert metrics.pools == [("a", "quarantined"), ("a", "probing"), ("a", "active")]
    text = caplog.text
    assert "pool a quarantined for carrier Telkomsel: 10 failed calls in a row" in text
    assert "pool a: probing carrier Telkomsel with one call" in text
    assert "pool a restored for carrier Telkomsel" in text


# -- posts to alerts.url ----------------------------------------------------------------------


@dataclasses.dataclass
class Received:
    headers: dict[str, str]
    body: bytes


@dataclasses.dataclass
class Receiver:
    url: str
    got: list[Received]
    answers: list[int]  # the status of each request in turn; 204 once they run out


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    got: list[Received] = []
    answers: list[int] = []

    async def handle(request: web.Request) -> web.Response:
        got.append(Received(dict(request.headers), await request.read()))
        return web.Response(status=answers.pop(0) if answers else 204)

    app = web.Application()
    app.router.add_post("/alerts", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield Receiver(str(server.make_url("/alerts")), got, answers)
    await server.close()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts_module, "POST_RETRY_BASE_S", 0.01)


async def received(receiver: Receiver, count: int) -> list[Received]:
    async def enough() -> bool:
        return len(receiver.got) >= count

    await until(enough)
    await asyncio.sleep(0.05)  # nothing more comes
    return receiver.got


async def test_an_alert_is_posted_signed(receiver: Receiver) -> None:
    poster = AlertPoster(receiver.url, SECRET)
    poster.start()
    try:
        poster.post("conversion.flagged", {"kind": "block", "target": BLOCK}, BASE)
        (delivery,) = await received(receiver, 1)
    finally:
        await poster.stop()
    event = Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert event == {
        "id": delivery.headers["webhook-id"],
        "type": "conversion.flagged",
        "created_at": timestamp(BASE),
        "data": {"kind": "block", "target": BLOCK},
    }
    assert event["id"].startswith("alt_")
    assert delivery.headers["Content-Type"] == "application/json"
    with pytest.raises(Exception, match="No matching signature"):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            delivery.body, delivery.headers
        )


async def test_a_refused_post_is_tried_again(receiver: Receiver, quick_retries: None) -> None:
    receiver.answers.extend([500, 503])
    poster = AlertPoster(receiver.url, SECRET)
    poster.start()
    try:
        poster.post("pool.quarantined", {"pool": "a"}, BASE)
        poster.post("pool.restored", {"pool": "a"}, BASE + 1)
        got = await received(receiver, 4)
    finally:
        await poster.stop()
    assert len(got) == 4
    ids = [d.headers["webhook-id"] for d in got]
    assert ids[0] == ids[1] == ids[2] != ids[3]  # the first alert, tried three times
    assert got[0].body == got[1].body == got[2].body
    for delivery in got:
        Webhook(SECRET).verify(delivery.body, delivery.headers)
    assert [json.loads(d.body)["type"] for d in (got[0], got[3])] == [
        "pool.quarantined",
        "pool.restored",
    ]


async def test_a_post_is_given_up_after_its_tries(
    receiver: Receiver,
    quick_retries: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(alerts_module, "POST_ATTEMPTS", 3)
    receiver.answers.extend([500] * 10)
    poster = AlertPoster(receiver.url, SECRET)
    poster.start()
    try:
        poster.post("pool.quarantined", {"pool": "a"}, BASE)
        await received(receiver, 3)

        async def gave_up() -> bool:
            return "gave up posting alert" in caplog.text

        await until(gave_up)
    finally:
        await poster.stop()
    assert len(receiver.got) == 3


async def test_a_full_queue_drops_the_oldest_alert(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(alerts_module, "POST_QUEUE", 2)
    poster = AlertPoster("http://127.0.0.1:9/alerts", SECRET)  # never started
    for n in range(3):
        poster.post("pool.quarantined", {"n": n}, BASE)
    assert "queue full, dropped alert" in caplog.text
    kept = [json.loads(poster._queue.get_nowait()[1])["data"]["n"] for _ in range(2)]
    assert kept == [1, 2]


async def test_alerts_post_pool_changes_and_conversion_flags_to_alerts_url(
    store: Store, database: str, receiver: Receiver
) -> None:
    await traffic(store)
    config = dataclasses.replace(
        alerts_config(database, "block"),
        alerts=AlertsConfig(url=receiver.url),
        webhooks=WebhooksConfig(secret=SECRET),
    )
    clock = Clock(BASE + 130)
    watch = Alerts(config, store, clock=clock)
    watch.start()
    try:
        watch.pool_changed([change(PoolState.QUARANTINED)])

        async def flagged() -> bool:
            return bool(await store.alerts(True, 10))

        await until(flagged)  # the first look runs at start
        (alert,) = await store.alerts(True, 10)
        await watch.lift(alert.id)
        got = await received(receiver, 3)
    finally:
        await watch.stop()
    events = {e["type"]: e for e in (Webhook(SECRET).verify(d.body, d.headers) for d in got)}
    assert set(events) == {"pool.quarantined", "conversion.flagged", "conversion.lifted"}
    assert events["pool.quarantined"]["data"] == {
        "pool": "a",
        "carrier": "Telkomsel",
        "state": "quarantined",
        "previous_state": "active",
        "failures_in_a_row": 10,
        "recent_calls": 11,
        "recent_delivered": 1,
    }
    assert events["pool.quarantined"]["created_at"] == timestamp(BASE + 5)
    assert events["conversion.flagged"]["data"] == {
        "id": alert.id,
        "kind": "block",
        "target": BLOCK,
        "created": MIN_VERIFICATIONS,
        "approved": 0,
        "rate": 0.0,
        "mode": "block",
        "raised_at": timestamp(BASE + 130),
        "blocked_until": timestamp(BASE + 130 + BLOCK_S),
        "cleared_at": None,
        "cleared_by": None,
    }
    lifted = events["conversion.lifted"]["data"]
    assert (lifted["id"], lifted["cleared_by"]) == (alert.id, "admin")
    assert lifted["cleared_at"] == timestamp(BASE + 130)


def test_without_alerts_url_nothing_is_posted(database: str) -> None:
    watch = Alerts(alerts_config(database), None, clock=Clock(BASE))  # type: ignore[arg-type]
    assert watch._poster is None
    watch.pool_changed([change(PoolState.QUARANTINED)])  # logged and counted only
