"""AMI hygiene: refused input never reaches Asterisk; the event filter's saving, measured."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from gateway.pbx import AmiPbx, AmiSettings, CallEventKind, Dial, new_channel_id
from tests.conftest import DEV_CLI_PREFIX, phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.ami_watch import MONITOR_SECRET, MONITOR_USER, AmiWatch
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

QUIET_S = 1.0


async def test_injection_attempts_reach_neither_ami_nor_the_far_end(
    gateway: Gateway, far_end: FarEnd, dev_pbx: AmiSettings
) -> None:
    bodies = [
        {"phone": "+6281234567890\r\nAction: Originate\r\nChannel: Local/1@x"},
        {"phone": "Action: Command\r\nCommand: core stop now"},
        {"phone": "+628123\n4567890"},
        {"phone": "+6281234567890", "reference": "x\r\nAction: Hangup\r\nChannel: all"},
        {"phone": "9" * 100_000},
        {"phone": "+62812345678901234567890123456789"},
        {"phone": "+6281234567890", "region": "I\nD"},
    ]
    records_before = len(far_end.records())
    async with AmiWatch(dev_pbx.host, dev_pbx.port, MONITOR_USER, MONITOR_SECRET) as watch:
        for body in bodies:
            status, problem = await gateway.post("/v1/verifications", body)
            assert status in (400, 413, 422), (body, problem)
        await asyncio.sleep(QUIET_S)
        assert watch.events == [], "something reached Asterisk"
    assert len(far_end.records()) == records_before


async def test_event_filter_sends_four_events_a_call_of_its_own_calls_only(
    dev_pbx: AmiSettings, far_end: FarEnd
) -> None:
    pbx = AmiPbx(dev_pbx)
    await pbx.start()
    host, port = dev_pbx.host, dev_pbx.port
    try:
        await pbx.wait_connected(10)
        async with (
            AmiWatch(host, port, MONITOR_USER, MONITOR_SECRET) as everything,
            AmiWatch(host, port, dev_pbx.username, dev_pbx.secret) as filtered,
        ):
            dials = [
                Dial(new_channel_id(), phone_number(0), f"{DEV_CLI_PREFIX}{n:04d}", 1)
                for n in range(10)
            ]
            # Another user's calls on the same PBX: ChannelIds without the gateway's prefix.
            others = [
                Dial(uuid.uuid4().hex, phone_number(0), f"{DEV_CLI_PREFIX}{n:04d}", 1)
                for n in range(10, 15)
            ]
            for dial in dials + others:
                await pbx.originate(dial)
            kinds: list[CallEventKind] = []
            async with asyncio.timeout(15):
                while kinds.count(CallEventKind.HANGUP) < len(dials):
                    kinds.append((await pbx.next_event()).kind)
            for dial in dials + others:
                await wire_record(far_end, dial.number, lambda r: r.canceled_at is not None)
            await asyncio.sleep(0.2)
    finally:
        await pbx.close()
    ids = {d.channel_id for d in dials}
    unfiltered = len(everything.of_calls(ids)) / len(dials)
    per_call = len(filtered.of_calls(ids)) / len(dials)
    print(
        f"\nAMI events per ring-and-cancel call: {unfiltered:g} unfiltered, {per_call:g} filtered"
    )
    # DialBegin, Newstate, DialState, OriginateResponse and Hangup: what the adapter uses.
    assert per_call == 5
    assert {e["Event"] for e in filtered.of_calls(ids)} == {
        "DialBegin",
        "Newstate",
        "DialState",
        "OriginateResponse",
        "Hangup",
    }
    # The other calls rang and ended as well, and the gateway's user heard nothing of them.
    other_ids = {d.channel_id for d in others}
    assert len(everything.of_calls(other_ids)) >= 4 * len(others)
    assert filtered.of_calls(other_ids) == []
    assert unfiltered >= 8
    assert kinds.count(CallEventKind.RINGING) == len(dials)
