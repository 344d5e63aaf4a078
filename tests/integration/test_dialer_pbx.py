"""The dialer on the real dev Asterisk: what the far end gets when the gateway's timing
meets Asterisk's own (an Originate is queued there before its channel exists)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest

from gateway.config import CallsConfig
from gateway.dialer import CallJob, Dialer
from gateway.nodes import Nodes
from gateway.outcomes import Outcome
from gateway.pbx import AmiPbx, AmiSettings, Dial, new_channel_id
from gateway.store import Store, open_store
from tests.conftest import DEV_CLI_PREFIX, make_call, make_verification, phone_number
from tests.fakes import until
from tests.farend import FarEnd

pytestmark = pytest.mark.integration

RING_SECONDS = 6
_serial = itertools.count(1)


class CancelingPbx(AmiPbx):
    """The real adapter; once Asterisk has queued an Originate, the dialer is asked to
    cancel that call at once (a newer create for the phone, or a client's cancel, at the
    worst moment)."""

    dialer: Dialer

    async def originate(self, dial: Dial) -> None:
        await super().originate(dial)
        asyncio.get_running_loop().create_task(self.dialer.cancel(dial.channel_id))


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    opened = await open_store(database)
    yield opened
    await opened.close()


async def queued_job(store: Store, number: str) -> CallJob:
    """A verification of `number` and its queued flash call in the store, and its job."""
    n = next(_serial)
    now = time.time()
    verification = make_verification(f"vrf_pbx{n}", phone=f"+{number}", created_at=now)
    call = make_call(
        new_channel_id(),
        verification.id,
        phone=f"+{number}",
        queued_at=now,
        ring_seconds=RING_SECONDS,
    )
    await store.create_verification(verification, call)
    cli = f"+{DEV_CLI_PREFIX}{n % 10_000:04d}"
    return CallJob(
        call_id=call.id,
        verification_id=verification.id,
        dial_number=call.dial_number,
        cli=cli,
        cli_dial=cli[1:],
        pool=verification.pool,
        ring_seconds=RING_SECONDS,
    )


async def test_a_call_canceled_before_asterisk_has_its_channel_is_hung_up_once_it_has(
    dev_pbx: AmiSettings, far_end: FarEnd, store: Store
) -> None:
    """Asterisk answers a Hangup sent right after the Originate's reply with "No such
    channel" most of the time: the call is still queued there. The gateway sends it again
    once the channel exists; the far end gets its CANCEL at once, not after the ring
    time or at the cap."""
    calls = CallsConfig(
        ring_seconds=RING_SECONDS, max_ring_seconds=10, max_concurrent=50, max_per_second=1000
    )
    pbx = CancelingPbx(dev_pbx)
    ended: dict[str, Outcome] = {}

    async def on_ended(job: CallJob, outcome: Outcome) -> None:
        ended[job.call_id] = outcome

    pbx.dialer = dialer = Dialer(Nodes.one(pbx, calls), store, calls, lambda *_: None, on_ended)
    await pbx.start()
    try:
        await pbx.wait_connected(10)
        dialer.start()
        numbers = [phone_number(0) for _ in range(10)]
        jobs = [await queued_job(store, number) for number in numbers]
        for job in jobs:
            dialer.submit(job)

        async def all_ended() -> bool:
            return len(ended) == len(jobs)

        await until(all_ended, timeout=RING_SECONDS - 2)
        # Hung up before it alerted, or (a 180 crossing the CANCEL) after.
        assert set(ended.values()) <= {Outcome.ERROR, Outcome.DELIVERED}, ended

        async def settled() -> bool:
            got = [r for number in numbers for r in far_end.calls_to(number)]
            return all(r.canceled_at or r.final_code for r in got)

        await until(settled)
        for number in numbers:
            for record in far_end.calls_to(number):
                assert record.canceled_at is not None, record
                assert record.canceled_at - record.invited_at < 2.0, record
    finally:
        await dialer.stop()
        await pbx.close()
