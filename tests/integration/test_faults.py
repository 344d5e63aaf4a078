"""Issue 6 fault tests: Asterisk killed mid-ring, the gateway killed mid-queue."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import aiohttp
import pytest

from gateway.api.typedefs import NODES
from gateway.config import AsteriskConfig, CallsConfig
from gateway.pbx import AmiSettings
from tests.conftest import pbx_command, phone_number
from tests.farend import FarEnd
from tests.integration.conftest import Gateway, GatewayFactory, GatewayProcess, wait_for

pytestmark = pytest.mark.integration

DEFINITE = ("completed", "failed")


async def call_states(gateway: Gateway, ids: list[str]) -> list[dict[str, Any]]:
    return [(await gateway.get(f"/v1/verifications/{vid}"))[1] for vid in ids]


async def test_asterisk_killed_while_fifty_calls_ring(
    start_gateway: GatewayFactory, far_end: FarEnd, dev_pbx: AmiSettings
) -> None:
    gateway = await start_gateway(
        # As in production: after a login, wait before calling (Asterisk may be booting).
        asterisk=AsteriskConfig(secret=dev_pbx.secret, settle_seconds=2),
        calls=CallsConfig(
            ring_seconds=8, max_ring_seconds=10, max_concurrent=200, max_per_second=200
        ),
    )
    numbers = [phone_number(0) for _ in range(50)]
    created = await asyncio.gather(
        *(gateway.post("/v1/verifications", {"phone": f"+{n}"}) for n in numbers)
    )
    ids = [body["id"] for status, body in created if status == 201]
    assert len(ids) == 50

    async def all_ringing() -> bool:
        return all(any(r.sent_at(180) for r in far_end.calls_to(n)) for n in numbers)

    await wait_for(all_ringing, 10, "50 calls ringing")

    async def ready_is(status: int) -> bool:
        return (await gateway.request("GET", "/readyz")).status == status

    try:
        await asyncio.to_thread(pbx_command, "kill")
        down = await wait_for(lambda: ready_is(503), 5, "/readyz 503 after the kill")
        assert (await gateway.request("GET", "/healthz")).status == 200  # the gateway lives
        # The adapter knows how long AMI has been gone: past calls.pbx_wait_seconds a
        # create answers 503 pbx_unavailable (tests/test_api.py); before, it is queued.
        assert 0 < gateway.server.app[NODES].down_for < CallsConfig().pbx_wait_seconds
        # Accepted while the PBX is down: it waits in the queue for the PBX.
        waiting_number = phone_number(3)
        status, waiting = await gateway.post("/v1/verifications", {"phone": f"+{waiting_number}"})
        assert status == 201
    finally:
        await asyncio.to_thread(pbx_command, "up")  # returns once AMI logs in
    back = await wait_for(lambda: ready_is(200), 5, "/readyz 200 after AMI is back")
    assert gateway.server.app[NODES].down_for == 0

    async def all_definite() -> bool:
        return all(s["call"]["status"] in DEFINITE for s in await call_states(gateway, ids))

    await wait_for(all_definite, 15, "every verification in a definite state")
    states = await call_states(gateway, ids)
    assert {s["call"]["outcome"] for s in states} <= {"error", "delivered"}
    assert Counter(s["call"]["reason"] for s in states if s["call"]["outcome"] == "error") <= (
        Counter({"pbx_lost": 50})
    )
    counts = Counter(r.request_user for r in far_end.records() if r.request_user in numbers)
    assert max(counts.values()) == 1, "a destination got two INVITEs"
    print(f"\n/readyz 503 {down:.2f}s after the kill, 200 {back:.2f}s after AMI was back")

    async def waited_and_placed() -> bool:
        state = (await gateway.get(f"/v1/verifications/{waiting['id']}"))[1]
        return bool(state["call"]["outcome"] == "busy")

    await wait_for(waited_and_placed, 10, "the call queued while the PBX was down")

    after = phone_number(3)
    status, body = await gateway.post("/v1/verifications", {"phone": f"+{after}"})
    assert status == 201

    async def busy() -> bool:
        return (await gateway.get(f"/v1/verifications/{body['id']}"))[1]["call"][
            "outcome"
        ] == "busy"

    await wait_for(busy, 10, "a new call after the restart")


async def test_gateway_killed_with_a_hundred_queued_or_ringing(
    gateway_process: GatewayProcess, far_end: FarEnd
) -> None:
    headers = {"Authorization": f"Bearer {gateway_process.key}"}
    gateway_process.start()
    numbers = [phone_number(0) for _ in range(100)]
    async with aiohttp.ClientSession(gateway_process.url, headers=headers) as http:

        async def ready() -> bool:
            try:
                async with http.get("/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, 15, "gateway ready")

        async def create(n: str) -> str:
            async with http.post("/v1/verifications", json={"phone": f"+{n}"}) as response:
                assert response.status == 201
                return str((await response.json())["id"])

        ids = await asyncio.gather(*(create(n) for n in numbers))
        await asyncio.sleep(1.5)  # 25 calls/s: about 40 placed and ringing, 60 queued
        gateway_process.kill()
        dialed_at_kill = sum(1 for n in numbers if far_end.calls_to(n))
        assert 10 <= dialed_at_kill <= 90, dialed_at_kill

        gateway_process.start()
        await wait_for(ready, 15, "gateway ready after the restart")

        async def states() -> list[dict[str, Any]]:
            out = []
            for vid in ids:
                async with http.get(f"/v1/verifications/{vid}") as response:
                    out.append(json.loads(await response.text()))
            return out

        async def all_definite() -> bool:
            return all(s["call"]["status"] in DEFINITE for s in await states())

        await wait_for(all_definite, 45, "every verification in a definite state")
        final = await states()
    counts = Counter(r.request_user for r in far_end.records() if r.request_user in numbers)
    assert max(counts.values()) == 1, "a destination got two INVITEs"
    outcomes = Counter(s["call"]["outcome"] for s in final)
    print(f"\nkilled with {dialed_at_kill} dialed; after the restart: {dict(outcomes)}")
    delivered = [s for s in final if s["call"]["outcome"] == "delivered"]
    # Every call still queued at the kill was placed after the restart, once.
    assert len(delivered) >= 100 - dialed_at_kill
    assert sum(counts.values()) == len([n for n in numbers if counts[n]])
    for state in final:
        if state["call"]["outcome"] != "delivered":
            assert (state["call"]["outcome"], state["call"]["reason"]) == ("error", "pbx_lost")
            assert state["status"] == "failed"
