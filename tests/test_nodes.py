"""Several Asterisk nodes behind one dialer (fake PBX adapters): which node a call goes
to, a node that is down, a call its node could not take, and calls followed on their
own node."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.config import CallsConfig
from gateway.dialer import OWNER_HANGUP_RETRIES_S, CallJob, Dialer
from gateway.nodes import Node, Nodes
from gateway.outcomes import Outcome
from gateway.pbx import Dial
from gateway.store import Store, open_store
from tests.fakes import WAIT_S, FakePbx, rings_until_hung_up, until
from tests.test_dialer import add_job, call_of

# Rings until the gateway's ring timer: long enough to count the calls on each node.
LONG_RING_S = 5.0
CALLS = CallsConfig(ring_seconds=1, max_post_dial_seconds=0, pbx_wait_seconds=2)


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    opened = await open_store(database)
    yield opened
    await opened.close()


class Bed:
    """A started dialer on fake nodes a and b; records each call's outcome."""

    def __init__(self, store: Store, **max_concurrent: int) -> None:
        self.pbx = {name: FakePbx(rings_until_hung_up) for name in ("a", "b")}
        self.nodes = Nodes(
            [
                Node(name, pbx, max_concurrent.get(name, 50), 1000.0)
                for name, pbx in self.pbx.items()
            ]
        )
        self.outcomes: dict[str, Outcome] = {}
        self.dialer = Dialer(self.nodes, store, CALLS, lambda pool, cli: None, self.on_ended)
        self.dialer.start()

    async def on_ended(self, job: CallJob, outcome: Outcome) -> None:
        self.outcomes[job.call_id] = outcome

    def placed_on(self) -> Counter[str]:
        return Counter({name: len(pbx.placed) for name, pbx in self.pbx.items()})

    async def close(self) -> None:
        await self.dialer.stop()
        for pbx in self.pbx.values():
            await pbx.close()


BedFactory = Callable[..., Bed]


@pytest.fixture
async def make_bed(store: Store) -> AsyncIterator[BedFactory]:
    beds: list[Bed] = []

    def make(**max_concurrent: int) -> Bed:
        bed = Bed(store, **max_concurrent)
        beds.append(bed)
        return bed

    yield make
    for bed in beds:
        await bed.close()


async def _placed(bed: Bed, count: int) -> bool:
    return sum(bed.placed_on().values()) >= count


async def test_calls_go_to_the_node_with_the_most_room(make_bed: BedFactory, store: Store) -> None:
    """Room is the share of a node's channels free: a node with three times the channels
    carries three times the calls (none of them full)."""
    bed = make_bed(a=10, b=30)
    jobs = [await add_job(store, ring_seconds=LONG_RING_S) for _ in range(16)]
    for job in jobs:
        bed.dialer.submit(job)
    await until(lambda: _placed(bed, 16))
    assert bed.placed_on() == {"a": 4, "b": 12}
    nodes = Counter([(await call_of(store, job)).node for job in jobs])
    assert nodes == {"a": 4, "b": 12}  # each call stored with its node


async def test_a_node_that_is_down_gets_nothing(make_bed: BedFactory, store: Store) -> None:
    bed = make_bed()
    bed.pbx["a"].connected = False
    jobs = [await add_job(store, ring_seconds=LONG_RING_S) for _ in range(6)]
    for job in jobs:
        bed.dialer.submit(job)
    await until(lambda: _placed(bed, 6))
    assert bed.placed_on() == {"a": 0, "b": 6}
    assert bed.pbx["a"].originated == []  # not even tried there
    assert bed.dialer.pbx_down_for == 0  # one node up is enough
    bed.pbx["a"].connected = True
    more = [await add_job(store, ring_seconds=LONG_RING_S) for _ in range(6)]
    for job in more:
        bed.dialer.submit(job)
    await until(lambda: _placed(bed, 12))
    assert bed.placed_on() == {"a": 6, "b": 6}  # a, back and empty, takes them


async def test_with_every_node_down_a_call_waits_then_fails_pbx_unavailable(
    make_bed: BedFactory, store: Store
) -> None:
    bed = make_bed()
    for pbx in bed.pbx.values():
        pbx.lost_ami(seconds_ago=0)
    job = await add_job(store)
    started = time.monotonic()
    bed.dialer.submit(job)
    await until(lambda: _async(job.call_id in bed.outcomes), timeout=WAIT_S)
    assert time.monotonic() - started >= CALLS.pbx_wait_seconds - 0.1
    call = await call_of(store, job)
    assert (call.outcome, call.reason, call.node) == (Outcome.ERROR, "pbx_unavailable", None)
    assert bed.placed_on() == {"a": 0, "b": 0}


async def test_a_call_its_node_could_not_take_moves_to_the_other(
    make_bed: BedFactory, store: Store
) -> None:
    """Claimed on a, which is lost before the Originate (nothing sent): placed on b, and
    stored there first."""
    bed = make_bed()
    reservation = bed.dialer.reserve(time.time())
    node = reservation.node
    assert node is not None
    bed.pbx[node].connected = False
    other = "b" if node == "a" else "a"
    job = await add_job(store, ring_seconds=LONG_RING_S)
    await store.claim_call(job.call_id, bed.dialer.owner, time.time(), node)
    reservation.place(job)
    await until(lambda: _placed(bed, 1))
    assert [d.channel_id for d in bed.pbx[other].placed] == [job.call_id]
    assert [o.dial.channel_id for o in bed.pbx[node].originated] == [job.call_id]  # refused
    assert (await call_of(store, job)).node == other
    # Its channel on the lost node is free again; the other holds it.
    assert {n.name: n.taken for n in bed.nodes.all} == {node: 0, other: 1}


async def test_a_cancel_hangs_the_call_up_on_its_own_node(
    make_bed: BedFactory, store: Store
) -> None:
    bed = make_bed()
    jobs = [await add_job(store, ring_seconds=LONG_RING_S) for _ in range(2)]
    for job in jobs:
        bed.dialer.submit(job)
    await until(lambda: _placed(bed, 2))
    on_b = bed.pbx["b"].placed[0].channel_id
    await bed.dialer.cancel(on_b)
    await until(lambda: _async(on_b in bed.outcomes))
    assert bed.pbx["b"].hangups == [on_b]
    assert bed.pbx["a"].hangups == []


async def test_a_cancel_of_a_call_another_gateway_placed_reaches_its_node_only(
    make_bed: BedFactory,
) -> None:
    bed = make_bed()
    await bed.dialer.cancel("otp-elsewhere", "b")
    assert (bed.pbx["a"].hangups, bed.pbx["b"].hangups) == ([], ["otp-elsewhere"])
    await bed.dialer.cancel("otp-unknown-node")  # node not known: every node is asked
    assert bed.pbx["a"].hangups == ["otp-unknown-node"]


async def test_a_cancel_of_another_gateways_call_not_on_its_node_yet_is_sent_again(
    make_bed: BedFactory,
) -> None:
    """Its owner's Originate may still be on its way, or queued in Asterisk: the first
    Hangup finds no channel. It is sent again until the channel is there, a few times."""
    bed = make_bed()
    await bed.dialer.cancel("otp-elsewhere", "b")
    assert bed.pbx["b"].hangups == ["otp-elsewhere"]  # no such channel yet
    # Its owner's Originate lands now.
    await bed.pbx["b"].originate(Dial("otp-elsewhere", "6281200000010", "6221500123", 30))

    async def hung_up() -> bool:
        return not bed.pbx["b"].live

    await until(hung_up)
    assert bed.pbx["b"].hangups == ["otp-elsewhere", "otp-elsewhere"]
    assert bed.pbx["a"].hangups == []
    await bed.dialer.cancel("otp-never-placed", "a")
    await asyncio.sleep(sum(OWNER_HANGUP_RETRIES_S) + 0.2)
    # Never placed (or ended already): a bounded number of refused Hangups.
    assert bed.pbx["a"].hangups == ["otp-never-placed"] * (1 + len(OWNER_HANGUP_RETRIES_S))


async def test_an_adopted_call_is_followed_on_its_node(make_bed: BedFactory, store: Store) -> None:
    bed = make_bed()
    job = await add_job(store)
    await store.claim_call(job.call_id, bed.dialer.owner, time.time(), "b")
    await bed.dialer.adopt(job, time.time(), ringing_at=None, rang=False, node_name="b")
    assert (bed.pbx["a"].adopted, bed.pbx["b"].adopted) == ([], [job.call_id])
    bed.pbx["b"].end_adopted(job.call_id, 19, 480)
    await until(lambda: _async(job.call_id in bed.outcomes))
    assert bed.dialer.on_node(bed.nodes.all[1]) == (0, 0)


async def test_on_node_counts_live_and_ringing_calls(make_bed: BedFactory, store: Store) -> None:
    bed = make_bed(a=1, b=50)
    jobs = [await add_job(store, ring_seconds=LONG_RING_S) for _ in range(3)]
    for job in jobs:
        bed.dialer.submit(job)
    await until(lambda: _placed(bed, 3))
    a, b = bed.nodes.all
    await until(lambda: _async(bed.dialer.on_node(b) == (2, 2)))
    assert bed.dialer.on_node(a) == (1, 1)


async def _async(value: bool) -> bool:
    return value
