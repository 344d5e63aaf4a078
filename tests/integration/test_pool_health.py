"""Caller-ID pools that heal themselves (issue 19): pool health per carrier.

Pool A dials through the dev Asterisk's `otp-route` endpoint to the routes far end
(tests/sipp/routes.xml), which refuses with 603 every call from A's caller IDs to a
Telkomsel number and rings every other call; pool B dials through the lab trunk to the
lab far end, which rings. Both serve Indonesia. What each pool's calls did is read at
the far ends (the INVITE's From user says which pool placed it), never from the
gateway's own view.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from gateway.config import (
    AlertsConfig,
    CallerHealthConfig,
    CallsConfig,
    LimitsConfig,
    PoolConfig,
    WebhooksConfig,
)
from gateway.pbx import AmiSettings
from tests.conftest import RoutesEnd, phone_number
from tests.fakes import until
from tests.farend import FarEnd, InviteRecord
from tests.integration.conftest import Gateway, GatewayFactory, scrape

pytestmark = pytest.mark.integration

A_PREFIX, B_PREFIX = "+6221500", "+6221700"
TELKOMSEL, INDOSAT = "Telkomsel", "Indosat Ooredoo Hutchison"
MIN_CALLS = 10
PROBE_S = 8
SECRET = "whsec_" + base64.b64encode(b"integration-alerts-secret-012345").decode()


class AlertReceiver:
    """The operator's alert endpoint: keeps each post whose signature holds."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        try:
            Webhook(SECRET).verify(body, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400)
        self.received.append(json.loads(body))
        return web.Response(status=204)


@pytest.fixture
async def alert_receiver() -> AsyncIterator[AlertReceiver]:
    receiver = AlertReceiver()
    app = web.Application()
    app.router.add_post("/alerts", receiver.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    receiver.url = str(server.make_url("/alerts"))
    yield receiver
    await server.close()


def pool_sections(**health: Any) -> dict[str, Any]:
    """Two pools for Indonesia: A through its own trunk (the routes far end), B through
    the node's (the lab far end); B weighs twice A, so B delivers early."""
    return {
        "pools": (
            PoolConfig(
                name="a",
                prefix=A_PREFIX,
                regions=("ID",),
                channel="PJSIP/{number}@otp-route",
                weight=1,
            ),
            PoolConfig(name="b", prefix=B_PREFIX, regions=("ID",), weight=2),
        ),
        "caller_health": CallerHealthConfig(
            **{"min_calls": MIN_CALLS, "probe_seconds": PROBE_S, **health}
        ),
        "calls": CallsConfig(
            ring_seconds=1, max_ring_seconds=10, max_concurrent=200, max_per_second=200
        ),
        # Many calls to one carrier's numbers: no range-walking limit in the way.
        "limits": LimitsConfig(key_requests_per_minute=1_000_000, per_prefix=()),
    }


def pool_of(record: InviteRecord) -> str:
    """Which pool placed a call, from the caller ID the far end saw."""
    if record.from_user.startswith(A_PREFIX.lstrip("+")):
        return "a"
    if record.from_user.startswith(B_PREFIX.lstrip("+")):
        return "b"
    raise AssertionError(f"a caller ID of no pool: {record.from_user}")


class Wire:
    """Both far ends, read together: each number's INVITE, from whichever pool."""

    def __init__(self, far_end: FarEnd, routes_end: RoutesEnd) -> None:
        self.far_end, self.routes_end = far_end, routes_end

    def calls_to(self, number: str) -> list[InviteRecord]:
        records = [*self.far_end.calls_to(number), *self.routes_end.records()]
        return [r for r in records if r.request_user == number]

    async def ended(self, number: str, since: float) -> InviteRecord:
        """The one INVITE to `number` since `since`, once its final response was sent.
        (The lab far end's log outlives each test run: an earlier one may have called it.)"""

        async def settled() -> InviteRecord | None:
            calls = [r for r in self.calls_to(number) if r.invited_at >= since]
            return calls[0] if len(calls) == 1 and calls[0].final_code is not None else None

        return await until(settled, timeout=15.0)


async def call(gateway: Gateway, wire: Wire, network: str) -> tuple[str, InviteRecord]:
    """Create a verification to a fresh number on `network` and wait until its call has
    ended, at the far end and in the gateway: (the verification's id, what the far end got)."""
    number = phone_number(0, network)
    since = time.time()
    status, created = await gateway.post(
        "/v1/verifications", {"phone": f"+{number}", "ring_seconds": 1}
    )
    assert status == 201, created
    record = await wire.ended(number, since)

    async def ended() -> dict[str, Any] | None:
        _, current = await gateway.get(f"/v1/verifications/{created['id']}")
        return current if current["call"]["outcome"] is not None else None

    await until(ended, timeout=15.0)
    return created["id"], record


async def health(gateway: Gateway, pool: str, carrier: str) -> dict[str, Any] | None:
    status, body = await gateway.get("/v1/pools")
    assert status == 200, body
    [found] = [p for p in body["pools"] if p["name"] == pool]
    return next((c for c in found["carriers"] if c["carrier"] == carrier), None)


async def state(gateway: Gateway, pool: str, carrier: str) -> str:
    row = await health(gateway, pool, carrier)
    return row["state"] if row is not None else "active"


async def quarantine_a(gateway: Gateway, wire: Wire) -> list[InviteRecord]:
    """Telkomsel calls one at a time until A is quarantined for Telkomsel; every call."""
    placed: list[InviteRecord] = []
    while await state(gateway, "a", TELKOMSEL) != "quarantined":
        assert len(placed) < 60, [(pool_of(r), r.final_code) for r in placed]
        _, record = await call(gateway, wire, "812")
        placed.append(record)
    return placed


async def test_a_pool_refused_by_one_carrier_is_quarantined_probed_and_restored(
    start_gateway: GatewayFactory,
    dev_pbx: AmiSettings,
    far_end: FarEnd,
    routes_end: RoutesEnd,
    alert_receiver: AlertReceiver,
) -> None:
    routes_end.start(reject_from=A_PREFIX)
    gateway = await start_gateway(
        **pool_sections(),
        webhooks=WebhooksConfig(secret=SECRET),
        alerts=AlertsConfig(url=alert_receiver.url),
    )
    wire = Wire(far_end, routes_end)

    # 1. A's calls to Telkomsel are refused at the far end; B's ring.
    placed = await quarantine_a(gateway, wire)
    from_a = [r for r in placed if pool_of(r) == "a"]
    from_b = [r for r in placed if pool_of(r) == "b"]
    assert all(r.final_code == 603 for r in from_a), [
        (r.request_user, r.final_code, r.responses) for r in from_a
    ]
    assert from_b and all(r.final_code == 487 for r in from_b)  # rang, then our CANCEL
    assert len(from_a) <= MIN_CALLS, len(from_a)
    row = await health(gateway, "a", TELKOMSEL)
    assert row is not None and row["failures_in_a_row"] == len(from_a)
    assert row["next_probe_at"] is not None
    # The metrics say the same.
    samples = await scrape(gateway)
    labels = (("carrier", TELKOMSEL), ("otp_pool_state", "quarantined"), ("pool", "a"))
    assert samples["otp_pool_state"][labels] == 1
    a_telkomsel = (("carrier", TELKOMSEL), ("pool", "a"))
    assert samples["otp_pool_recent_calls"][a_telkomsel] == row["calls"]
    assert samples["otp_pool_recent_delivered"][a_telkomsel] == 0

    # 2. The next 20 Telkomsel calls all come from B, and are delivered.
    results = await asyncio.gather(*(call(gateway, wire, "812") for _ in range(20)))
    assert [pool_of(r) for _, r in results] == ["b"] * 20
    for verification_id, _ in results:
        _, body = await gateway.get(f"/v1/verifications/{verification_id}")
        assert body["call"]["outcome"] == "delivered", body["call"]

    # 3. Indosat's numbers still get calls from A, delivered: A is healthy there.
    indosat = [r for _, r in await asyncio.gather(*(call(gateway, wire, "815") for _ in range(12)))]
    assert "a" in [pool_of(r) for r in indosat]
    assert all(r.final_code == 487 for r in indosat)
    assert await state(gateway, "a", INDOSAT) == "active"
    assert await state(gateway, "a", TELKOMSEL) == "quarantined"

    # 4. After the probe interval one Telkomsel call tries A: refused, A stays out.
    assert row["next_probe_at"] is not None
    await asyncio.sleep(PROBE_S)
    probes = [r for _, r in [await call(gateway, wire, "812") for _ in range(4)]]
    assert [pool_of(r) for r in probes].count("a") == 1, [pool_of(r) for r in probes]
    assert [r.final_code for r in probes if pool_of(r) == "a"] == [603]
    assert await state(gateway, "a", TELKOMSEL) == "quarantined"

    # 5. The network takes A's calls again: the next probe is delivered, A is restored.
    routes_end.start(reject_from="none")
    await asyncio.sleep(PROBE_S)
    restored = [r for _, r in [await call(gateway, wire, "812") for _ in range(2)]]
    assert pool_of(restored[0]) == "a", [pool_of(r) for r in restored]
    assert restored[0].final_code == 487  # it rang
    assert await state(gateway, "a", TELKOMSEL) == "active"
    row = await health(gateway, "a", TELKOMSEL)
    assert row is not None and row["failures_in_a_row"] == 0 and not row["held"]

    # Each change was posted to the operator's alert URL once, signed.
    expected = ["quarantined", "probing", "quarantined", "probing", "restored"]

    async def posted() -> bool:
        return len(alert_receiver.received) >= len(expected)

    await until(posted)
    assert alert_receiver.bad_signatures == 0
    assert [a["type"] for a in alert_receiver.received] == [f"pool.{e}" for e in expected]
    assert {(a["data"]["pool"], a["data"]["carrier"]) for a in alert_receiver.received} == {
        ("a", TELKOMSEL)
    }


async def test_the_last_pool_delivering_to_a_carrier_is_never_quarantined(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, far_end: FarEnd, routes_end: RoutesEnd
) -> None:
    # Only A serves Indonesia: its refused calls go on, and the state says why.
    routes_end.start(reject_from=A_PREFIX)
    sections = pool_sections(min_calls=3)
    sections["pools"] = sections["pools"][:1]
    gateway = await start_gateway(**sections)
    wire = Wire(far_end, routes_end)
    placed = [r for _, r in [await call(gateway, wire, "812") for _ in range(5)]]
    assert [(pool_of(r), r.final_code) for r in placed] == [("a", 603)] * 5
    row = await health(gateway, "a", TELKOMSEL)
    assert row is not None
    assert (row["state"], row["held"], row["failures_in_a_row"]) == ("active", True, 5)
    assert (row["calls"], row["delivered"], row["rate"]) == (5, 0, 0.0)


async def test_gateways_on_one_database_share_pool_health(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, far_end: FarEnd, routes_end: RoutesEnd
) -> None:
    routes_end.start(reject_from=A_PREFIX)
    first = await start_gateway(**pool_sections(probe_seconds=600))
    second = await start_gateway(
        database=first.database, key=first.key, **pool_sections(probe_seconds=600)
    )
    wire = Wire(far_end, routes_end)

    # The calls that quarantine A are placed by both gateways in turn.
    calls = 0
    while await state(second, "a", TELKOMSEL) != "quarantined":
        assert calls < 60
        await call(first if calls % 2 else second, wire, "812")
        calls += 1
    assert await health(first, "a", TELKOMSEL) == await health(second, "a", TELKOMSEL)

    # Neither gateway's next Telkomsel calls use A.
    results = await asyncio.gather(*(call(gateway, wire, "812") for gateway in (first, second) * 5))
    assert [pool_of(r) for _, r in results] == ["b"] * 10
