"""The PBX adapter against the real dev Asterisk, checked at the SIPp far end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from gateway.pbx import (
    AmiPbx,
    AmiSettings,
    CallEvent,
    CallEventKind,
    Dial,
    PbxUnavailable,
    new_channel_id,
)
from tests.conftest import DEV_CLI_PREFIX, phone_number, wire_record
from tests.farend import FarEnd

pytestmark = pytest.mark.integration

RING_SECONDS = 2.0
# How late Asterisk's CANCEL (or BYE) may reach the far end, in seconds.
WIRE_TOLERANCE_S = 1.0


@pytest.fixture
async def ami(dev_pbx: AmiSettings, far_end: FarEnd) -> AsyncIterator[AmiPbx]:
    pbx = AmiPbx(dev_pbx)
    await pbx.start()
    await pbx.wait_connected(10)
    yield pbx
    await pbx.close()


async def events_until_hangup(
    pbx: AmiPbx, channel_ids: set[str], timeout: float
) -> dict[str, list[CallEvent]]:
    """Every event of the given calls, until each has hung up."""
    seen: dict[str, list[CallEvent]] = {cid: [] for cid in channel_ids}
    open_calls = set(channel_ids)
    async with asyncio.timeout(timeout):
        while open_calls:
            event = await pbx.next_event()
            if event.kind is CallEventKind.CONNECTED:
                continue  # about the connection, not a call
            assert event.channel_id in seen, f"event for a call not placed here: {event}"
            seen[event.channel_id].append(event)
            if event.kind is CallEventKind.HANGUP:
                open_calls.discard(event.channel_id)
    return seen


def caller_id(code: int) -> str:
    return f"{DEV_CLI_PREFIX}{code:04d}"


async def test_ringing_call_shows_caller_id_then_cancel(ami: AmiPbx, far_end: FarEnd) -> None:
    number = phone_number(0)
    cli = caller_id(4821)
    dial = Dial(new_channel_id(), number, cli, RING_SECONDS)
    before = time.time()
    await ami.originate(dial)
    assert time.time() - before < 0.5, "originate must not wait for the ring to end"

    events = await events_until_hangup(ami, {dial.channel_id}, RING_SECONDS + 10)
    kinds = [e.kind for e in events[dial.channel_id]]
    assert kinds == [CallEventKind.INVITED, CallEventKind.RINGING, CallEventKind.HANGUP]
    invited, ringing = events[dial.channel_id][:2]
    assert dial.channel_id and 0 <= ringing.at - invited.at < 1.0
    assert events[dial.channel_id][-1].cause == 19

    record = await wire_record(far_end, number, lambda r: r.canceled_at is not None)
    assert record.from_user == cli
    assert record.request_user == number
    assert record.canceled_at is not None
    rang_for = record.canceled_at - record.invited_at
    assert RING_SECONDS - 0.1 <= rang_for <= RING_SECONDS + WIRE_TOLERANCE_S
    assert record.bye_at is None


@pytest.mark.parametrize(
    ("behaviour", "cause", "sip_code", "alerted"),
    [
        pytest.param(0, 19, None, CallEventKind.RINGING, id="180-no-answer"),
        pytest.param(1, 19, None, CallEventKind.PROGRESS, id="183-no-answer"),
        pytest.param(2, 16, None, CallEventKind.ANSWERED, id="200-answered"),
        pytest.param(3, 17, 486, None, id="486-busy"),
        pytest.param(4, 1, 404, None, id="404-not-found"),
        pytest.param(5, 21, 603, None, id="603-decline"),
        pytest.param(6, 34, 503, None, id="503-unavailable"),
        pytest.param(7, 28, 484, None, id="484-incomplete"),
        pytest.param(8, 19, 480, None, id="480-unavailable"),
        pytest.param(9, 19, None, None, id="100-only-no-answer"),
    ],
)
async def test_far_end_behaviour_maps_to_hangup_cause(
    ami: AmiPbx,
    far_end: FarEnd,
    behaviour: int,
    cause: int,
    sip_code: int | None,
    alerted: CallEventKind | None,
) -> None:
    number = phone_number(behaviour)
    dial = Dial(new_channel_id(), number, caller_id(behaviour), RING_SECONDS)
    await ami.originate(dial)
    events = (await events_until_hangup(ami, {dial.channel_id}, RING_SECONDS + 10))[dial.channel_id]

    hangup = events[-1]
    assert hangup.kind is CallEventKind.HANGUP
    assert hangup.cause == cause
    if sip_code is not None:
        assert hangup.sip_code == sip_code
    assert events[0].kind is CallEventKind.INVITED  # every call: the INVITE left
    kinds = {e.kind for e in events[1:-1]}
    if alerted is None:
        assert kinds == set()
    else:
        assert alerted in kinds

    record = await wire_record(
        far_end, number, lambda r: r.final_code is not None and (behaviour != 2 or bool(r.bye_at))
    )
    assert record.from_user == dial.caller_id
    if behaviour == 2:
        assert record.answered_at is not None
        assert record.bye_at is not None
        assert record.bye_at - record.answered_at <= WIRE_TOLERANCE_S
    elif behaviour in (0, 1, 9):
        assert record.canceled_at is not None
        assert record.final_code == 487
    else:
        assert record.canceled_at is None
        assert record.final_code == sip_code


async def test_concurrent_calls_are_correlated_by_channel_id(ami: AmiPbx, far_end: FarEnd) -> None:
    dials = [
        Dial(new_channel_id(), phone_number(behaviour), caller_id(1000 + i), RING_SECONDS)
        for i, behaviour in enumerate([0, 3, 4, 0, 1, 5, 0, 6, 0, 8] * 2)
    ]
    await asyncio.gather(*(ami.originate(d) for d in dials))
    events = await events_until_hangup(ami, {d.channel_id for d in dials}, RING_SECONDS + 15)
    expected_cause = {0: 19, 1: 19, 3: 17, 4: 1, 5: 21, 6: 34, 8: 19}
    for dial in dials:
        assert events[dial.channel_id][-1].cause == expected_cause[int(dial.number[-1])]
    for dial in dials:
        record = await wire_record(far_end, dial.number, lambda r: r.final_code is not None)
        assert record.from_user == dial.caller_id


async def test_wrong_secret_never_logs_in(dev_pbx: AmiSettings) -> None:
    settings = AmiSettings(dev_pbx.host, dev_pbx.port, dev_pbx.username, "wrong-secret")
    pbx = AmiPbx(settings)
    await pbx.start()
    try:
        with pytest.raises(PbxUnavailable):
            await pbx.wait_connected(3)
        assert not pbx.connected
    finally:
        await pbx.close()


async def test_unknown_endpoint_ends_as_originate_failure(dev_pbx: AmiSettings) -> None:
    settings = AmiSettings(
        dev_pbx.host,
        dev_pbx.port,
        dev_pbx.username,
        dev_pbx.secret,
        channel="PJSIP/{number}@no-such-endpoint",
    )
    pbx = AmiPbx(settings)
    await pbx.start()
    try:
        await pbx.wait_connected(10)
        dial = Dial(new_channel_id(), phone_number(0), caller_id(1), RING_SECONDS)
        await pbx.originate(dial)
        [hangup] = (await events_until_hangup(pbx, {dial.channel_id}, 5))[dial.channel_id]
        assert hangup.cause is None
        assert hangup.reason is not None and hangup.reason.startswith("originate_failed")
    finally:
        await pbx.close()
