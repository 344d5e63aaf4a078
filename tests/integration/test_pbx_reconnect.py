"""The AMI connection across a PBX crash: it notices, reconnects, and never re-dials."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from gateway.pbx import AmiPbx, AmiSettings, Dial, new_channel_id
from tests.conftest import DEV_CLI_PREFIX, pbx_command, phone_number, wire_record
from tests.farend import FarEnd

pytestmark = pytest.mark.integration

# Keepalive interval plus its reply deadline, plus slack for a loaded machine.
NOTICE_LOSS_S = 10.0
# The reconnect backoff after a few seconds of failures, plus the PBX's own start.
RECONNECT_S = 20.0


async def wait_until(predicate: Callable[[], bool], timeout: float) -> float:
    """Seconds until predicate() holds; fails after `timeout`."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_pbx_crash_is_noticed_and_the_call_is_not_replayed(
    dev_pbx: AmiSettings, far_end: FarEnd
) -> None:
    pbx = AmiPbx(dev_pbx)
    await pbx.start()
    try:
        await pbx.wait_connected(10)
        number = phone_number(0)
        await pbx.originate(Dial(new_channel_id(), number, f"{DEV_CLI_PREFIX}0001", 5))
        await wire_record(far_end, number, lambda r: r.sent_at(180) is not None)

        await asyncio.to_thread(pbx_command, "kill")
        await wait_until(lambda: not pbx.connected, NOTICE_LOSS_S)
        await asyncio.to_thread(pbx_command, "up")
        await wait_until(lambda: pbx.connected, RECONNECT_S)
        assert pbx.reconnects >= 1

        # The Originate sent before the crash is not sent again after the reconnect.
        await asyncio.sleep(1.0)
        assert len(far_end.calls_to(number)) == 1

        # And the new connection places calls.
        after = phone_number(3)
        await pbx.originate(Dial(new_channel_id(), after, f"{DEV_CLI_PREFIX}0002", 2))
        record = await wire_record(far_end, after)
        assert record.final_code == 486
    finally:
        await pbx.close()
        await asyncio.to_thread(pbx_command, "up")
