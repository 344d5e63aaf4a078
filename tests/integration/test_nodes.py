"""The dev bed's second Asterisk node (make cluster-up): a second Asterisk from the one
provisioned root, AMI 127.0.0.1:5039, SIP 5061, trunking to the same far end."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from gateway.config import AsteriskConfig, NodeConfig
from gateway.pbx import AmiSettings
from tests.conftest import pbx_command, phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway, GatewayFactory, by_label, scrape, wait_for
from tests.integration.test_verifications_api import call_ended

pytestmark = pytest.mark.integration


async def test_node_b_carries_a_call_beside_node_a(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, dev_pbx_b: AmiSettings, far_end: FarEnd
) -> None:
    """A gateway whose only Asterisk is node b: its call reaches the far end, From user
    the caller ID, and is canceled after its ring time; node a runs beside it."""
    assert (dev_pbx.port, dev_pbx_b.port) == (5038, 5039)
    gateway = await start_gateway(
        asterisk=AsteriskConfig(secret=dev_pbx_b.secret, port=dev_pbx_b.port, settle_seconds=0)
    )
    number = phone_number(0)
    status, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    assert status == 201
    record = await wire_record(far_end, number, lambda r: r.canceled_at is not None)
    assert record.from_user.startswith(created["cli"]["prefix"].lstrip("+"))
    assert len(record.from_user) == len(created["cli"]["prefix"]) - 1 + created["cli"]["length"]
    ended = await call_ended(gateway, created["id"])
    assert (ended["call"]["outcome"], ended["call"]["reason"]) == ("delivered", "ring_timeout")


# Long enough that the calls still ring when their node is killed, and after.
LONG_RING_S = 10
CALLS_ON_A = 20
CREATES_AFTER = 100
CREATE_WINDOW_S = 5.0
SIP_PORTS = {"a": 5060, "b": 5061}


def two_nodes(a: AmiSettings, b: AmiSettings) -> AsteriskConfig:
    """Both nodes of the dev bed, each inheriting the rest from the mapping."""
    return AsteriskConfig(
        secret=a.secret,
        settle_seconds=a.settle_seconds,
        nodes=(NodeConfig("a", port=a.port), NodeConfig("b", port=b.port)),
    )


async def test_a_node_killed_with_calls_ringing_loses_them_and_the_other_takes_new_calls(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, dev_pbx_b: AmiSettings, far_end: FarEnd
) -> None:
    """Node a killed -9 with 20 calls ringing on it: those end error/pbx_lost; 100
    creates over the next 5 s all get 201 and all reach the far end through node b;
    once a is back it gets calls again."""
    gateway = await start_gateway(asterisk=two_nodes(dev_pbx, dev_pbx_b))
    await wait_for(nodes_are(gateway, a=True, b=True), 10, "both nodes up")
    try:
        # Node b away while the first calls are made: they all go to a.
        await asyncio.to_thread(pbx_command, "kill", "b")
        await wait_for(nodes_are(gateway, a=True, b=False), 5, "b down")
        ringing: dict[str, str] = {}
        for _ in range(CALLS_ON_A):
            number = phone_number(0)
            status, created = await gateway.post(
                "/v1/verifications", {"phone": f"+{number}", "ring_seconds": LONG_RING_S}
            )
            assert status == 201, created
            ringing[created["id"]] = number
        for number in ringing.values():
            record = await wire_record(far_end, number, lambda r: r.sent_at(180) is not None)
            assert record.via_port == SIP_PORTS["a"]
        for vid in ringing:
            _, body = await gateway.get(f"/v1/verifications/{vid}")
            assert (body["call"]["status"], body["call"]["node"]) == ("ringing", "a"), body
        await asyncio.to_thread(pbx_command, "up", "b")
        await wait_for(nodes_are(gateway, a=True, b=True), 10, "b up")

        await asyncio.to_thread(pbx_command, "kill", "a")
        await wait_for(nodes_are(gateway, a=False, b=True), 5, "a down")
        assert (await gateway.request("GET", "/readyz")).status == 200  # b is enough
        started = time.monotonic()
        after: dict[str, str] = {}
        for i in range(CREATES_AFTER):
            await asyncio.sleep(
                max(0.0, started + i * CREATE_WINDOW_S / CREATES_AFTER - time.monotonic())
            )
            number = phone_number(0)
            status, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
            assert status == 201, created
            after[created["id"]] = number
        assert time.monotonic() - started < CREATE_WINDOW_S + 1
        for number in after.values():
            record = await wire_record(far_end, number, lambda r: r.canceled_at is not None, 15)
            assert record.via_port == SIP_PORTS["b"], number
        for vid in after:
            ended = await call_ended(gateway, vid)
            assert (ended["call"]["node"], ended["call"]["outcome"]) == ("b", "delivered"), ended
    finally:
        await asyncio.to_thread(pbx_command, "up", "a")
        await asyncio.to_thread(pbx_command, "up", "b")

    # a is back: its lost calls are closed at once (their channels died with it). They
    # had rung (the far end sent 180): the phone showed the code, so the outcome table
    # counts them delivered, pbx_lost; the verification stays open for that code.
    for vid in ringing:
        ended = await call_ended(gateway, vid, timeout=15)
        assert (ended["call"]["outcome"], ended["call"]["reason"]) == ("delivered", "pbx_lost")
        assert ended["status"] == "pending"
    # ...and it takes calls again.
    await wait_for(nodes_are(gateway, a=True, b=True), 10, "a up")
    again = []
    for _ in range(10):
        number = phone_number(0)
        status, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
        assert status == 201, created
        again.append(number)
    ports: Counter[int | None] = Counter()
    for number in again:
        record = await wire_record(far_end, number, lambda r: r.canceled_at is not None, 15)
        ports[record.via_port] += 1
    assert ports[SIP_PORTS["a"]] > 0, ports
    # The dialer's view of the nodes, per node, for the operator.
    samples = await scrape(gateway)
    placed = by_label(samples["otp_node_calls_placed_total"], "node")
    assert placed["a"] >= CALLS_ON_A + ports[SIP_PORTS["a"]]
    assert placed["b"] >= CREATES_AFTER
    assert by_label(samples["otp_node_up"], "node") == {"a": 1.0, "b": 1.0}


def nodes_are(gateway: Gateway, **connected: bool) -> Callable[[], Awaitable[bool]]:
    """A predicate: /readyz lists the nodes logged in or not as given."""

    async def probe() -> bool:
        _, body = await gateway.get("/readyz")
        return {node["name"]: node["connected"] for node in body["nodes"]} == connected

    return probe
