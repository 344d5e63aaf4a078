"""Pools and alerts over the HTTP API, served by the real app factory on a FakePbx: GET
/v1/pools, GET and DELETE /v1/alerts, suspended destinations, and new calls kept off a
quarantined pool."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession, web
from aiohttp.test_utils import TestServer

from gateway import apikeys
from gateway.api.typedefs import ALERTS, STORE
from gateway.app import create_app
from gateway.caller_health import PoolState
from gateway.config import (
    CallsConfig,
    Config,
    ConversionConfig,
    LimitsConfig,
    PoolConfig,
    VoiceConfig,
    Window,
)
from gateway.pbx import Dial
from gateway.store import AlertKind, AlertRecord, Store, open_store
from gateway.times import timestamp
from tests.conftest import NewDatabase, make_config, raw_query
from tests.fakes import FakePbx, fresh_mobile, until
from tests.test_store import raw_insert

PROBLEM = "application/problem+json"
TELKOMSEL = "Telkomsel"  # phonenumbers' carrier of +62812... (fresh_mobile's numbers)
INDOSAT_MOBILE = "+6281512345678"
# A Telkomsel mobile and its destination block (without its last prefix_hidden_digits: 4).
SUSPENDED_PHONE = "+6281277712345"
SUSPENDED_BLOCK = "+628127771"
POOL_A = PoolConfig(name="a", prefix="+6221500")
POOL_B = PoolConfig(name="b", prefix="+6221600", channel="PJSIP/{number}@trunk-b", weight=3)


def pools_config(database: str, **overrides: Any) -> Config:
    """Two pools serving every region; short rings, pacing and range limits out of the way."""
    settings: dict[str, Any] = {
        "calls": CallsConfig(ring_seconds=1, max_concurrent=50, max_per_second=1000),
        "limits": LimitsConfig(per_prefix=(Window(1000, 3600),)),
        "pools": (POOL_A, POOL_B),
    }
    return make_config(database, **(settings | overrides))


@dataclasses.dataclass
class Api:
    url: str
    key: str  # scope verify
    admin_key: str
    http: ClientSession
    pbx: FakePbx
    app: web.Application
    database: str

    @property
    def store(self) -> Store:
        return self.app[STORE]

    async def request(
        self, method: str, path: str, *, admin: bool = False, **kw: Any
    ) -> ClientResponse:
        key = self.admin_key if admin else self.key
        headers = {"Authorization": f"Bearer {key}"}
        return await self.http.request(method, self.url + path, headers=headers, **kw)

    async def call(
        self, method: str, path: str, *, admin: bool = False, **kw: Any
    ) -> tuple[int, Any]:
        async with await self.request(method, path, admin=admin, **kw) as response:
            if response.status == 204:
                return 204, None
            return response.status, await response.json(content_type=None)

    async def create(self, phone: str | None = None) -> dict[str, Any]:
        status, body = await self.call(
            "POST", "/v1/verifications", json={"phone": phone or fresh_mobile()}
        )
        assert status == 201, body
        return dict(body)

    async def dial_of(self, verification: dict[str, Any]) -> Dial:
        number = verification["phone"].lstrip("+")

        async def placed() -> Dial | None:
            return next((d for d in self.pbx.placed if d.number == number), None)

        dial = await until(placed)
        assert dial is not None
        return dial


ApiFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def start_api(new_database: NewDatabase) -> AsyncIterator[ApiFactory]:
    servers: list[TestServer] = []
    sessions: list[ClientSession] = []
    pbxs: list[FakePbx] = []

    async def start(config: Callable[[str], Config] = pools_config) -> Api:
        database = new_database()
        store = await open_store(database)
        try:
            _, key = await apikeys.create_key(store, "test")
            _, admin_key = await apikeys.create_key(store, "operator", scope="admin")
        finally:
            await store.close()
        fake = FakePbx()
        pbxs.append(fake)
        app = create_app(config(database), pbx=fake)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        session = ClientSession()
        sessions.append(session)
        url = str(server.make_url("")).rstrip("/")
        return Api(url, key, admin_key, session, fake, app, database)

    yield start
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()
    for fake in pbxs:
        await fake.close()


@pytest.fixture
async def api(start_api: ApiFactory) -> Api:
    return await start_api()


async def expect_problem(
    api: Api, method: str, path: str, status: int, code: str, **kw: Any
) -> tuple[ClientResponse, dict[str, Any]]:
    async with await api.request(method, path, **kw) as response:
        body: dict[str, Any] = await response.json(content_type=None)
        assert response.status == status, body
        assert response.content_type == PROBLEM
        assert body["code"] == code
        return response, body


async def health_row(api: Api, pool: str, carrier: str, **fields: Any) -> None:
    """A pool_health row, as calls would have left it."""
    now = time.time()
    row: dict[str, Any] = {
        "pool": pool,
        "carrier": carrier,
        "state": "active",
        "since": now - 100,
        "failures": 0,
        "recent": "",
        "held": False,
        "probe_at": None,
        "updated_at": now - 50,
    }
    await raw_insert(api.database, "pool_health", row | fields)


async def verifications_stored(api: Api) -> int:
    ((count,),) = await raw_query(api.database, "SELECT COUNT(*) FROM verifications")
    return int(count)


# -- admin only ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/pools"), ("GET", "/v1/alerts"), ("DELETE", "/v1/alerts/alr_x")],
)
async def test_a_verify_key_gets_403_on_pool_and_alert_routes(
    api: Api, method: str, path: str
) -> None:
    _, problem = await expect_problem(api, method, path, 403, "insufficient_scope")
    assert problem["required_scope"] == "admin"


# -- GET /v1/pools -------------------------------------------------------------------------


async def test_pools_lists_each_pool_with_what_its_calls_taught(api: Api) -> None:
    since, probe_at = time.time() - 100, time.time() + 200
    await health_row(
        api,
        "a",
        TELKOMSEL,
        state="quarantined",
        since=since,
        failures=3,
        recent="dfff",
        probe_at=probe_at,
    )
    await health_row(api, "a", "", since=since, failures=2, recent="ff", held=True)
    status, body = await api.call("GET", "/v1/pools", admin=True)
    assert status == 200, body
    assert body == {
        "pools": [
            {
                "name": "a",
                "regions": [],
                "weight": 1,
                "trunk": "otp-trunk",  # the node's channel
                "carriers": [
                    {
                        "carrier": None,  # '' in the store: not known
                        "state": "active",
                        "since": timestamp(since),
                        "calls": 2,
                        "delivered": 0,
                        "rate": 0.0,
                        "failures_in_a_row": 2,
                        "held": True,
                        "next_probe_at": None,
                    },
                    {
                        "carrier": TELKOMSEL,
                        "state": "quarantined",
                        "since": timestamp(since),
                        "calls": 4,
                        "delivered": 1,
                        "rate": 0.25,
                        "failures_in_a_row": 3,
                        "held": False,
                        "next_probe_at": timestamp(probe_at),
                    },
                ],
            },
            {
                "name": "b",
                "regions": [],
                "weight": 3,
                "trunk": "trunk-b",
                "carriers": [],
            },
        ]
    }


async def test_an_active_pool_shows_no_next_probe_and_no_rate_without_calls(api: Api) -> None:
    await health_row(api, "b", TELKOMSEL, probe_at=time.time() + 10)
    _, body = await api.call("GET", "/v1/pools", admin=True)
    (carrier,) = body["pools"][1]["carriers"]
    assert (carrier["state"], carrier["next_probe_at"], carrier["rate"]) == ("active", None, None)


# -- GET and DELETE /v1/alerts -------------------------------------------------------------


def alert(aid: str, target: str, at: float, kind: AlertKind = AlertKind.BLOCK) -> AlertRecord:
    return AlertRecord(
        id=aid,
        kind=kind,
        target=target,
        created=60,
        approved=3,
        mode="block",
        raised_at=at,
        blocked_until=at + 3600,
    )


async def test_alerts_are_listed_open_or_all_and_lifted_by_an_admin(api: Api) -> None:
    now = time.time()
    await api.store.raise_alert(alert("alr_old", "+62811111", now - 60))
    await api.store.raise_alert(alert("alr_new", "+62812222", now - 10))
    await api.store.raise_alert(alert("alr_gone", "+62813333", now - 30))
    await api.store.clear_alert("alr_gone", now - 20, "expired")

    status, body = await api.call("GET", "/v1/alerts", admin=True)
    assert status == 200, body
    assert [a["id"] for a in body["alerts"]] == ["alr_new", "alr_old"]
    assert body["alerts"][0] == {
        "id": "alr_new",
        "kind": "block",
        "target": "+62812222",
        "created": 60,
        "approved": 3,
        "rate": 0.05,
        "mode": "block",
        "raised_at": timestamp(now - 10),
        "blocked_until": timestamp(now - 10 + 3600),
        "cleared_at": None,
        "cleared_by": None,
    }
    _, everything = await api.call("GET", "/v1/alerts?state=all", admin=True)
    assert [a["id"] for a in everything["alerts"]] == ["alr_new", "alr_gone", "alr_old"]
    _, first = await api.call("GET", "/v1/alerts?state=all&limit=1", admin=True)
    assert [a["id"] for a in first["alerts"]] == ["alr_new"]

    assert await api.call("DELETE", "/v1/alerts/alr_old", admin=True) == (204, None)
    await expect_problem(api, "DELETE", "/v1/alerts/alr_old", 404, "not_found", admin=True)
    await expect_problem(api, "DELETE", "/v1/alerts/alr_gone", 404, "not_found", admin=True)
    await expect_problem(api, "DELETE", "/v1/alerts/alr_none", 404, "not_found", admin=True)
    _, left = await api.call("GET", "/v1/alerts", admin=True)
    assert [a["id"] for a in left["alerts"]] == ["alr_new"]
    _, everything = await api.call("GET", "/v1/alerts?state=all", admin=True)
    (lifted,) = [a for a in everything["alerts"] if a["id"] == "alr_old"]
    assert lifted["cleared_by"] == "admin" and lifted["cleared_at"] is not None


@pytest.mark.parametrize(
    ("query", "field"),
    [("state=bogus", "state"), ("limit=0", "limit"), ("limit=501", "limit")],
)
async def test_a_bad_alerts_query_is_a_400(api: Api, query: str, field: str) -> None:
    _, problem = await expect_problem(
        api, "GET", f"/v1/alerts?{query}", 400, "invalid_request", admin=True
    )
    assert problem.get("field") == field


# -- suspended destinations -----------------------------------------------------------------


def block_mode(database: str) -> Config:
    return pools_config(database, conversion=ConversionConfig(mode="block"))


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        (AlertKind.BLOCK, SUSPENDED_BLOCK),
        (AlertKind.CARRIER, f"ID:{TELKOMSEL}"),
        (AlertKind.COUNTRY, "ID"),
    ],
)
async def test_a_create_to_a_suspended_destination_is_refused_and_stores_nothing(
    start_api: ApiFactory, kind: AlertKind, target: str
) -> None:
    api = await start_api(block_mode)
    await api.store.raise_alert(alert("alr_1", target, time.time(), kind))
    await api.app[ALERTS].sweep()  # this gateway's look learns it
    before = await verifications_stored(api)
    response, problem = await expect_problem(
        api,
        "POST",
        "/v1/verifications",
        429,
        "destination_suspended",
        json={"phone": SUSPENDED_PHONE},
    )
    assert 3590 <= int(response.headers["Retry-After"]) <= 3600
    assert problem["detail"]
    assert await verifications_stored(api) == before
    assert api.pbx.originated == []

    if kind is not AlertKind.COUNTRY:  # another block, another carrier: taken
        await api.create(INDOSAT_MOBILE)
    # Lifted: the destination is taken again at once.
    assert await api.call("DELETE", "/v1/alerts/alr_1", admin=True) == (204, None)
    await api.create(SUSPENDED_PHONE)


async def test_a_report_mode_alert_refuses_nothing(api: Api) -> None:
    record = dataclasses.replace(
        alert("alr_1", SUSPENDED_BLOCK, time.time()), mode="report", blocked_until=None
    )
    await api.store.raise_alert(record)
    await api.app[ALERTS].sweep()
    await api.create(SUSPENDED_PHONE)


async def test_a_suspension_learnt_is_over_once_its_block_ends(start_api: ApiFactory) -> None:
    api = await start_api(block_mode)
    record = dataclasses.replace(
        alert("alr_1", SUSPENDED_BLOCK, time.time()), blocked_until=time.time() + 1
    )
    await api.store.raise_alert(record)
    await api.app[ALERTS].sweep()
    await expect_problem(
        api,
        "POST",
        "/v1/verifications",
        429,
        "destination_suspended",
        json={"phone": SUSPENDED_PHONE},
    )

    async def taken() -> bool:
        async with await api.request(
            "POST", "/v1/verifications", json={"phone": SUSPENDED_PHONE}
        ) as response:
            return response.status == 201

    await until(taken)


# -- pools chosen by health ---------------------------------------------------------------------


async def test_creates_use_the_pool_healthy_for_the_carrier(api: Api) -> None:
    # b has three times a's weight: only its quarantine keeps every call on a.
    await health_row(
        api,
        "b",
        TELKOMSEL,
        state="quarantined",
        failures=10,
        recent="f" * 10,
        probe_at=time.time() + 3600,
    )
    for _ in range(8):
        created = await api.create()
        assert created["cli"]["prefix"] == "+6221500"
        dial = await api.dial_of(created)
        assert dial.caller_id.startswith("6221500")
        assert dial.channel is None  # pool a has no channel: the node's
    # The quarantine is Telkomsel's: an Indosat number may still use pool b.
    await api.create(INDOSAT_MOBILE)


async def test_a_pools_channel_reaches_the_dial(api: Api) -> None:
    await health_row(
        api,
        "a",
        TELKOMSEL,
        state="quarantined",
        failures=10,
        recent="f" * 10,
        probe_at=time.time() + 3600,
    )
    for _ in range(3):
        created = await api.create()
        assert created["cli"]["prefix"] == "+6221600"
        dial = await api.dial_of(created)
        assert dial.caller_id.startswith("6221600")
        assert dial.channel == "PJSIP/{number}@trunk-b"  # pool b's own trunk


async def test_a_due_probe_takes_one_create_and_its_delivery_restores_the_pool(api: Api) -> None:
    await health_row(
        api,
        "a",
        TELKOMSEL,
        state="quarantined",
        failures=10,
        recent="f" * 10,
        probe_at=time.time() - 1,
    )
    probe = await api.create(fresh_mobile("0"))  # alerts, then rings out: delivered
    assert probe["cli"]["prefix"] == "+6221500"
    (row,) = [r for r in await api.store.pool_states(TELKOMSEL) if r.pool == "a"]
    assert row.state is PoolState.PROBING
    following = await api.create()  # the probe is taken: b
    assert following["cli"]["prefix"] == "+6221600"

    async def restored() -> bool:
        states = {r.pool: r for r in await api.store.pool_states(TELKOMSEL)}
        return states["a"].state is PoolState.ACTIVE

    await until(restored)
    (row,) = [r for r in await api.store.pool_states(TELKOMSEL) if r.pool == "a"]
    assert (row.failures, row.recent[-1], row.probe_at) == (0, "d", None)


async def test_a_probe_claimed_by_a_refused_create_is_given_back(start_api: ApiFactory) -> None:
    # One call per phone and hour: the second create to the phone is refused (429) after
    # it claimed the probe; the probe is due again at once, for the next create.
    def one_per_phone(database: str) -> Config:
        limits = LimitsConfig(per_prefix=(Window(1000, 3600),), per_phone=(Window(1, 3600),))
        return pools_config(database, limits=limits)

    api = await start_api(one_per_phone)
    phone = fresh_mobile("0")
    await api.create(phone)  # before the quarantine: any pool
    await health_row(
        api, "a", TELKOMSEL, state="quarantined", failures=10, recent="f" * 10,
        probe_at=time.time() - 1,
    )  # fmt: skip
    await expect_problem(
        api, "POST", "/v1/verifications", 429, "rate_limited", json={"phone": phone}
    )
    (row,) = [r for r in await api.store.pool_states(TELKOMSEL) if r.pool == "a"]
    assert row.state is PoolState.QUARANTINED
    assert row.probe_at is not None and row.probe_at <= time.time()
    probe = await api.create()  # takes the probe given back
    assert probe["cli"]["prefix"] == "+6221500"


async def test_a_voice_first_create_takes_no_probe(start_api: ApiFactory) -> None:
    def with_voice(database: str) -> Config:
        return pools_config(database, voice=VoiceConfig(caller_id="+622180001000"))

    api = await start_api(with_voice)
    await health_row(
        api, "a", TELKOMSEL, state="quarantined", failures=10, recent="f" * 10,
        probe_at=time.time() - 1,
    )  # fmt: skip
    status, body = await api.call(
        "POST", "/v1/verifications", json={"phone": fresh_mobile(), "channels": ["voice"]}
    )
    assert status == 201, body
    (row,) = [r for r in await api.store.pool_states(TELKOMSEL) if r.pool == "a"]
    assert row.state is PoolState.QUARANTINED  # still due, for a flash call
