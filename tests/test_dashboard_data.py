"""The dashboard's figures: the store's per-minute and by-cause queries, the data
function, and the routes served without an API key on the operator's listener."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.api import views
from gateway.api.shapes import AlertMode
from gateway.app import create_app, create_operator_app
from gateway.caller_health import RouteReport
from gateway.config import PoolConfig
from gateway.dashboard import CHART_MINUTES, WINDOW_S, Live, dashboard_data
from gateway.numbers import Numbers
from gateway.store import AlertKind, AlertRecord, Store, open_store
from tests.conftest import TEST_POOL, make_call, make_config, make_verification
from tests.fakes import FakePbx

AppClient = TestClient[web.Request, web.Application]

# A clock-minute boundary, so the expected buckets are easy to read.
T0 = 1_700_000_040.0
assert T0 % 60 == 0
PHONE = "+6281234567890"
CLI_PREFIX = "+6221500"  # the prefix of TEST_POOL: make_config's and make_verification's
# Two more pools: one with a trunk of its own, one no call went through.
BACKUP = PoolConfig(
    name="backup", prefix="+6221600", regions=("ID",), weight=3, channel="PJSIP/{number}@trunk-b"
)
SPARE = PoolConfig(name="spare", prefix="+6221700")
MIN_CALLS = 2
PROBE_S = 300.0
# Every (kind, mode) an open alert may have, in the order the data lists them.
NO_ALERTS = [
    {"kind": kind.value, "mode": mode.value, "count": 0}
    for kind, mode in itertools.product(AlertKind, AlertMode)
]


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    """A store on each backend."""
    opened = await open_store(database)
    yield opened
    await opened.close()


class Calls:
    """Stores verifications with calls at chosen times; ids are numbered."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.n = 0

    async def add(
        self,
        *,
        dialed_at: float | None,
        ended_at: float | None = None,
        outcome: str = "delivered",
        cause: int | None = 19,
        carrier: str | None = "Telkomsel",
        phone: str = PHONE,
        reason: str | None = None,
        owner: str | None = None,
        route: RouteReport | None = None,
    ) -> str:
        """A call dialed at `dialed_at` (None: never) that ended at `ended_at` (None: live)."""
        self.n += 1
        queued_at = (dialed_at or ended_at or T0) - 0.5
        vid, cid = f"vrf_{self.n}", f"call_{self.n}"
        await self.store.create_verification(
            make_verification(
                vid,
                phone=phone,
                created_at=queued_at,
                api_key_id=f"key_{self.n}",  # each its own: a new one never supersedes
                carrier=carrier,
            ),
            make_call(cid, vid, phone=phone, queued_at=queued_at, owner=owner),
        )
        if dialed_at is not None:
            await self.store.call_progress(cid, "dialing", "dialed_at", dialed_at, "dialing")
        if ended_at is not None:
            delivered = outcome in ("delivered", "answered")
            await self.store.end_call(
                cid,
                call_status="completed" if delivered else "failed",
                outcome=outcome,
                cause=cause,
                sip_code=None,
                reason=reason,
                at=ended_at,
                fail_verification=not delivered,
                delivered=delivered,
                route=route,
            )
        return cid


def route(
    pool: str, delivered: bool, carrier: str = "Telkomsel", peers: tuple[str, ...] = ()
) -> RouteReport:
    """What a call's end says of its pool's route to `carrier` (caller_health)."""
    return RouteReport(
        pool=pool,
        carrier=carrier,
        delivered=delivered,
        peers=peers,
        min_calls=MIN_CALLS,
        probe_seconds=PROBE_S,
        recent_calls=10,
    )


def alert(
    aid: str, kind: AlertKind, target: str, mode: str = "report", at: float = T0
) -> AlertRecord:
    """A conversion alert raised at `at`."""
    return AlertRecord(
        id=aid,
        kind=kind,
        target=target,
        created=20,
        approved=1,
        mode=mode,
        raised_at=at,
        blocked_until=at + 600 if mode == "block" else None,
    )


@pytest.fixture
def calls(store: Store) -> Calls:
    return Calls(store)


# -- Store.calls_dialed --------------------------------------------------------


async def test_calls_dialed_counts_each_minute_and_fills_empty_ones(
    store: Store, calls: Calls
) -> None:
    await calls.add(dialed_at=T0 + 1, ended_at=T0 + 4)
    await calls.add(dialed_at=T0 + 59.9, ended_at=T0 + 62)
    await calls.add(dialed_at=T0 + 150, ended_at=T0 + 152, outcome="busy", cause=17)
    assert await store.calls_dialed(T0, T0 + 240, 60) == [2, 0, 1, 0]


async def test_calls_dialed_counts_live_calls_and_not_undialed_ones(
    store: Store, calls: Calls
) -> None:
    await calls.add(dialed_at=T0 + 10)  # ringing now
    await calls.add(dialed_at=None)  # still queued
    await calls.add(dialed_at=None, ended_at=T0 + 20, outcome="error", cause=None)  # canceled
    assert await store.calls_dialed(T0, T0 + 60, 60) == [1]


async def test_calls_dialed_leaves_out_calls_outside_the_window(store: Store, calls: Calls) -> None:
    await calls.add(dialed_at=T0 - 0.1, ended_at=T0 + 3)  # dialed before, ended inside
    await calls.add(dialed_at=T0 + 120, ended_at=T0 + 123)  # at `until`: not included
    await calls.add(dialed_at=T0 + 30, ended_at=T0 + 33)
    assert await store.calls_dialed(T0, T0 + 120, 60) == [1, 0]


async def test_calls_dialed_last_bucket_may_be_partial(store: Store, calls: Calls) -> None:
    await calls.add(dialed_at=T0 + 70, ended_at=T0 + 72)
    assert await store.calls_dialed(T0, T0 + 75, 60) == [0, 1]
    assert await store.calls_dialed(T0, T0, 60) == []


# -- Store.ended_by_cause ------------------------------------------------------


async def test_ended_by_cause_groups_dialed_calls_most_frequent_first(
    store: Store, calls: Calls
) -> None:
    for _ in range(3):
        await calls.add(dialed_at=T0, ended_at=T0 + 3)
    await calls.add(dialed_at=T0, ended_at=T0 + 1, outcome="busy", cause=17)
    await calls.add(dialed_at=T0, ended_at=T0 + 1, outcome="busy", cause=17)
    await calls.add(dialed_at=T0, ended_at=T0 + 1, outcome="invalid_number", cause=1)
    await calls.add(dialed_at=T0, ended_at=T0 + 1, outcome="error", cause=None)  # refused
    assert await store.ended_by_cause(T0, T0 + 60) == [
        ("delivered", 19, 3),
        ("busy", 17, 2),
        ("error", None, 1),
        ("invalid_number", 1, 1),
    ]


async def test_ended_by_cause_counts_only_dialed_calls_ended_in_the_window(
    store: Store, calls: Calls
) -> None:
    await calls.add(dialed_at=T0 - 10, ended_at=T0 - 7)  # ended before the window
    await calls.add(dialed_at=T0 + 50, ended_at=T0 + 60)  # ended at `until`
    await calls.add(dialed_at=T0 + 10)  # live: no outcome yet
    await calls.add(dialed_at=None, ended_at=T0 + 5, outcome="error", cause=None)  # never dialed
    await calls.add(dialed_at=T0 + 1, ended_at=T0 + 2, outcome="rejected", cause=21)
    # Hung up by the gateway before it alerted (superseded): no verdict on the trunk.
    await calls.add(dialed_at=T0 + 1, ended_at=T0 + 2, outcome="error", cause=21, reason="canceled")
    assert await store.ended_by_cause(T0, T0 + 60) == [("rejected", 21, 1)]
    assert await store.call_stats(T0, T0 + 60) == [("Telkomsel", "rejected", 1)]


# -- dashboard_data ------------------------------------------------------------


async def test_dashboard_data_figures(store: Store, calls: Calls, database: str) -> None:
    now = T0 + 30  # half-way through the current clock minute
    await calls.add(dialed_at=now - 20, ended_at=now - 18)
    await calls.add(dialed_at=now - 50, ended_at=now - 47, carrier="XL")
    await calls.add(dialed_at=now - 55, ended_at=now - 54, outcome="busy", cause=17)
    await calls.add(dialed_at=now - 70, ended_at=now - 67)
    await calls.add(dialed_at=now - 5)  # ringing
    await calls.add(dialed_at=now - 1800, ended_at=now - 1797, outcome="invalid_number", cause=1)
    await calls.add(dialed_at=now - 2 * WINDOW_S, ended_at=now - 2 * WINDOW_S + 3)  # too old
    numbers = Numbers(make_config(database), store)

    data = await dashboard_data(store, numbers, Live(True, 1, 2), now)

    assert (data["pbx_connected"], data["in_flight"], data["queued"]) == (True, 1, 2)
    assert data["calls_last_minute"] == 4  # all but now-70 and now-1800
    minutes = data["calls_per_minute"]
    assert len(minutes) == CHART_MINUTES
    assert minutes[-1] == {"minute": "2023-11-14T22:14:00.000Z", "calls": 2}  # now-20, now-5
    assert minutes[-2]["calls"] == 3  # now-50, now-55, now-70: the minute before
    assert minutes[-31]["calls"] == 1  # now-1800
    assert sum(m["calls"] for m in minutes) == 6
    window = data["window"]
    assert (window["seconds"], window["calls"], window["delivered"]) == (WINDOW_S, 5, 3)
    assert window["delivery_rate"] == 0.6
    none_said = {"intercepted": 0, "manual": 0, "unspecified": 0, "intercepted_share": None}
    assert [c.pop("approved_by_source") for c in window["by_carrier"]] == [none_said] * 2
    assert window["by_carrier"] == [
        {
            "carrier": "Telkomsel",
            "calls": 4,
            "delivered": 2,
            "uncertain": 0,
            "failed": 2,
            "delivery_rate": 0.5,
            "by_outcome": {"delivered": 2, "busy": 1, "invalid_number": 1},
        },
        {
            "carrier": "XL",
            "calls": 1,
            "delivered": 1,
            "uncertain": 0,
            "failed": 0,
            "delivery_rate": 1.0,
            "by_outcome": {"delivered": 1},
        },
    ]
    assert window["by_cause"] == [
        {"outcome": "delivered", "hangup_cause": 19, "cause_name": "No answer", "calls": 3},
        {"outcome": "busy", "hangup_cause": 17, "cause_name": "User busy", "calls": 1},
        {
            "outcome": "invalid_number",
            "hangup_cause": 1,
            "cause_name": "Unallocated number",
            "calls": 1,
        },
    ]


async def test_dashboard_data_lists_the_gateways_sharing_the_database(
    store: Store, calls: Calls, database: str
) -> None:
    now = T0 + 30
    await store.register_instance("gw-1", "i1", T0 - 600, lease_until=now + 8)
    await store.register_instance("gw-2", "i2", T0 - 500, lease_until=now + 9)
    await store.register_instance("gw-3", "i3", T0 - 400, lease_until=now - 5)  # killed
    await store.register_instance("gw-4", "i4", T0 - 300, lease_until=now + 9)
    await store.end_lease("gw-4", "i4", now - 60)  # stopped
    await calls.add(dialed_at=now - 5, owner="gw-1")  # live
    await calls.add(dialed_at=now - 4, owner="gw-1")
    await calls.add(dialed_at=now - 9, ended_at=now - 2, owner="gw-2")  # ended
    numbers = Numbers(make_config(database), store)

    data = await dashboard_data(store, numbers, Live(True, 0, 0, instance="gw-2"), now)

    assert [(i["name"], i["this"], i["state"], i["live_calls"]) for i in data["instances"]] == [
        ("gw-1", False, "running", 2),
        ("gw-2", True, "running", 0),
        ("gw-3", False, "lost", 0),
        ("gw-4", False, "stopped", 0),
    ]
    assert data["instances"][0]["started_at"] == views.timestamp(T0 - 600)


async def test_dashboard_data_passes_the_nodes_through(store: Store, database: str) -> None:
    nodes = [
        {
            "name": "ast-1",
            "connected": True,
            "down_seconds": 0.0,
            "calls_live": 3,
            "calls_ringing": 1,
            "max_concurrent": 30,
            "max_per_second": 5.0,
            "calls_placed": 41,
        },
        {
            "name": "ast-2",
            "connected": False,
            "down_seconds": 12.5,
            "calls_live": 0,
            "calls_ringing": 0,
            "max_concurrent": 20,
            "max_per_second": 2.0,
            "calls_placed": 7,
        },
    ]
    numbers = Numbers(make_config(database), store)

    data = await dashboard_data(store, numbers, Live(True, 3, 0, nodes=nodes), T0)

    assert data["nodes"] == nodes
    assert (await dashboard_data(store, numbers, Live(True, 0, 0), T0))["nodes"] == []


async def test_dashboard_data_holds_no_phone_number_or_caller_id(
    store: Store, calls: Calls, database: str
) -> None:
    await calls.add(dialed_at=T0 + 1, ended_at=T0 + 3, route=route(TEST_POOL.name, True))
    block = PHONE[:-4]  # the number without its hidden digits: an alert's target
    await store.raise_alert(alert("alr_1", AlertKind.BLOCK, block, "block"))
    config = make_config(database)
    numbers = Numbers(config, store)
    data = await dashboard_data(
        store,
        numbers,
        Live(False, 0, 0),
        T0 + 10,
        pools=config.pools,
        channel=config.asterisk.channel,
    )
    assert data["pools"][0]["carriers"][0]["calls"] == 1
    assert sum(entry["count"] for entry in data["open_alerts"]) == 1
    text = json.dumps(data)
    secrets = (PHONE, PHONE[1:], PHONE[3:], block, block[1:], block[3:], "alr_1")
    for secret in (*secrets, CLI_PREFIX, CLI_PREFIX[1:], "hmac-of-code"):
        assert secret not in text


async def test_dashboard_data_without_calls(store: Store, database: str) -> None:
    config = make_config(database)
    numbers = Numbers(config, store)
    data = await dashboard_data(
        store, numbers, Live(False, 0, 0), T0, pools=config.pools, channel=config.asterisk.channel
    )
    assert data["calls_last_minute"] == 0
    assert [m["calls"] for m in data["calls_per_minute"]] == [0] * CHART_MINUTES
    assert data["window"]["delivery_rate"] is None
    assert (data["window"]["by_carrier"], data["window"]["by_cause"]) == ([], [])
    # The configured pool, no call judged its route yet; no alert open.
    assert data["pools"] == [
        {"name": "default", "regions": [], "weight": 1, "trunk": "otp-trunk", "carriers": []}
    ]
    assert data["open_alerts"] == NO_ALERTS


async def test_dashboard_data_shows_each_pools_health_as_v1_pools_does(
    store: Store, calls: Calls, database: str
) -> None:
    now = T0 + 30
    default = TEST_POOL.name
    # To XL: the default pool delivers, the backup pool fails twice: quarantined.
    await calls.add(
        dialed_at=now - 101,
        ended_at=now - 100,
        carrier="XL",
        route=route(default, True, "XL", ("backup",)),
    )
    for at in (now - 90, now - 80):
        await calls.add(
            dialed_at=at - 1,
            ended_at=at,
            outcome="rejected",
            cause=21,
            carrier="XL",
            route=route("backup", False, "XL", (default,)),
        )
    # To Telkomsel: the default pool delivers once, then fails twice; no other pool
    # delivers there, so it is held active.
    await calls.add(dialed_at=now - 71, ended_at=now - 70, route=route(default, True))
    for at in (now - 60, now - 50):
        await calls.add(
            dialed_at=at - 1,
            ended_at=at,
            outcome="rejected",
            cause=21,
            route=route(default, False),
        )
    # A carrier phonenumbers does not name, and a pool no longer configured.
    await calls.add(
        dialed_at=now - 41, ended_at=now - 40, carrier=None, route=route(default, True, "")
    )
    await calls.add(dialed_at=now - 31, ended_at=now - 30, route=route("retired", True))
    config = make_config(database, pools=(TEST_POOL, BACKUP, SPARE))
    numbers = Numbers(config, store)

    data = await dashboard_data(
        store,
        numbers,
        Live(True, 0, 0),
        now,
        pools=config.pools,
        channel=config.asterisk.channel,
    )

    def carrier(name: str | None, since: float, recent: str, **fields: object) -> dict[str, object]:
        calls, delivered = len(recent), recent.count("d")
        return {
            "carrier": name,
            "state": "active",
            "since": views.timestamp(since),
            "calls": calls,
            "delivered": delivered,
            "rate": round(delivered / calls, 4),
            "failures_in_a_row": 0,
            "held": False,
            "next_probe_at": None,
        } | fields

    assert data["pools"] == [
        {
            "name": "default",
            "regions": [],
            "weight": 1,
            "trunk": "otp-trunk",
            "carriers": [
                carrier(None, now - 40, "d"),
                carrier("Telkomsel", now - 70, "dff", failures_in_a_row=2, held=True),
                carrier("XL", now - 100, "d"),
            ],
        },
        {
            "name": "backup",
            "regions": ["ID"],
            "weight": 3,
            "trunk": "trunk-b",
            "carriers": [
                carrier(
                    "XL",
                    now - 80,
                    "ff",
                    state="quarantined",
                    failures_in_a_row=2,
                    next_probe_at=views.timestamp(now - 80 + PROBE_S),
                )
            ],
        },
        {"name": "spare", "regions": [], "weight": 1, "trunk": "otp-trunk", "carriers": []},
    ]
    # Each pool as GET /v1/pools shows it (gateway.api.handlers.list_pools).
    rows = await store.pool_health()
    assert data["pools"] == [
        msgspec.to_builtins(
            views.pool(pool, config.asterisk.channel, [r for r in rows if r.pool == pool.name])
        )
        for pool in config.pools
    ]


async def test_dashboard_data_counts_open_alerts_by_kind_and_mode(
    store: Store, database: str
) -> None:
    await store.raise_alert(alert("alr_1", AlertKind.BLOCK, "+62811", "report"))
    await store.raise_alert(alert("alr_2", AlertKind.BLOCK, "+62812", "report"))
    await store.raise_alert(alert("alr_3", AlertKind.BLOCK, "+62813", "block"))
    await store.raise_alert(alert("alr_4", AlertKind.COUNTRY, "ID", "block"))
    await store.raise_alert(alert("alr_5", AlertKind.CARRIER, "XL", "report"))
    await store.clear_alert("alr_5", T0 + 5, "recovered")  # cleared: not counted
    numbers = Numbers(make_config(database), store)

    data = await dashboard_data(store, numbers, Live(True, 0, 0), T0 + 10)

    counts = {(e["kind"], e["mode"]): e["count"] for e in data["open_alerts"]}
    assert [(e["kind"], e["mode"]) for e in data["open_alerts"]] == [
        (e["kind"], e["mode"]) for e in NO_ALERTS
    ]
    assert counts == {
        ("block", "report"): 2,
        ("block", "block"): 1,
        ("carrier", "report"): 0,
        ("carrier", "block"): 0,
        ("country", "report"): 0,
        ("country", "block"): 1,
    }


# -- the routes ----------------------------------------------------------------


@pytest.fixture
async def client(database: str) -> AsyncIterator[AppClient]:
    """A client of the operator's listener, the API's started first (its resources)."""
    app = create_app(make_config(database), pbx=FakePbx())
    async with TestServer(app), TestClient(TestServer(create_operator_app(app))) as test_client:
        yield test_client


async def test_page_and_assets_are_served_without_an_api_key(
    client: AppClient,
) -> None:
    page = await client.get("/dashboard")
    assert page.status == 200
    assert page.content_type == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    html = await page.text()
    for asset in ("dashboard/assets/dashboard.js", "dashboard/assets/dashboard.css"):
        assert asset in html
        served = await client.get("/" + asset)
        assert served.status == 200, asset
        assert len(await served.read()) > 1000


async def test_data_is_served_without_an_api_key(client: AppClient) -> None:
    response = await client.get("/dashboard/data")
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    data = await response.json()
    assert (data["pbx_connected"], data["in_flight"], data["queued"]) == (True, 0, 0)
    assert len(data["calls_per_minute"]) == CHART_MINUTES
    # The config's single node, the fake PBX logged in, nothing placed yet.
    assert [(n["name"], n["connected"]) for n in data["nodes"]] == [("asterisk", True)]
    assert data["nodes"][0]["down_seconds"] == 0
    assert (data["nodes"][0]["calls_live"], data["nodes"][0]["calls_placed"]) == (0, 0)
    # The config's pool (make_config's TEST_POOL), no call yet; no alert open.
    assert data["pools"] == [
        {"name": "default", "regions": [], "weight": 1, "trunk": "otp-trunk", "carriers": []}
    ]
    assert data["open_alerts"] == NO_ALERTS


async def test_asset_directory_is_not_listed(client: AppClient) -> None:
    assert (await client.get("/dashboard/assets/")).status in (403, 404)
    assert (await client.get("/dashboard/assets/../index.html")).status == 404
