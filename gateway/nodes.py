"""The Asterisk nodes calls are placed on: each with its own pacing and channels, and the
choice of the node a call goes to."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.config import CallsConfig
from gateway.pbx import Pbx

# The node of a configuration without asterisk.nodes (asterisk.name's default).
DEFAULT_NODE = "asterisk"
# While no node can take a call because none is logged in, look again this often: a
# node's login is not announced to the router.
DOWN_POLL_S = 0.05


class Pacer:
    """Spaces calls at most `rate` per second, allowing a burst of up to one second."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._burst = max(1.0, rate)
        self._tokens = self._burst
        self._last = time.monotonic()

    async def wait(self) -> None:
        """Return when the next call may start."""
        self._refill()
        if self._tokens < 1:
            await asyncio.sleep((1 - self._tokens) * self._interval)
            self._tokens = 1
            self._last = time.monotonic()
        self._tokens -= 1

    def take(self) -> bool:
        """Take the next call's turn if it is due now, without waiting."""
        self._refill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def delay(self) -> float:
        """Seconds until the next call's turn (0: now)."""
        self._refill()
        return max(0.0, (1 - self._tokens) * self._interval)

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) / self._interval)
        self._last = now

    def give_back(self) -> None:
        self._tokens = min(self._burst, self._tokens + 1)


@dataclass(eq=False)
class Node:
    """One Asterisk node: its AMI adapter, its pacing and its channels."""

    name: str
    pbx: Pbx
    max_concurrent: int
    max_per_second: float
    pacer: Pacer = field(init=False)
    taken: int = 0  # channels in use: claimed, being placed, or live
    placed: int = 0  # calls originated here since start

    def __post_init__(self) -> None:
        self.pacer = Pacer(self.max_per_second)

    @property
    def room(self) -> int:
        """Channels free for new calls."""
        return self.max_concurrent - self.taken

    @property
    def usable(self) -> bool:
        """Logged in, with a channel free."""
        return self.pbx.connected and self.room > 0


class Nodes:
    """The nodes, and which one a new call goes to: a logged-in node with a channel
    free whose pacing lets a call start now, the one with the most room (the largest
    share of its channels free). A node that is down gets nothing."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        if not nodes:
            raise ValueError("at least one node")
        self.all = tuple(nodes)
        self._by_name = {node.name: node for node in nodes}
        self._changed = asyncio.Event()  # a channel was freed

    @classmethod
    def one(cls, pbx: Pbx, calls: CallsConfig, name: str = DEFAULT_NODE) -> Nodes:
        """A single node under calls' pacing (no asterisk.nodes)."""
        return cls([Node(name, pbx, calls.max_concurrent, calls.max_per_second)])

    def get(self, name: str | None) -> Node | None:
        return self._by_name.get(name) if name is not None else None

    @property
    def connected(self) -> bool:
        """Whether any node is logged in."""
        return any(node.pbx.connected for node in self.all)

    @property
    def down_for(self) -> float:
        """Seconds since the last node was lost; 0 while any is logged in."""
        return min(node.pbx.down_for for node in self.all)

    @property
    def max_per_second(self) -> float:
        """Calls per second the nodes take together."""
        return sum(node.max_per_second for node in self.all)

    @property
    def taken(self) -> int:
        return sum(node.taken for node in self.all)

    def take_now(self, exclude: Node | None = None) -> Node | None:
        """A channel of the node with most room whose pacing allows a call now, or None."""
        for node in sorted(
            (n for n in self.all if n.usable and n is not exclude),
            key=lambda n: n.room / n.max_concurrent,
            reverse=True,
        ):
            if node.pacer.take():
                node.taken += 1
                return node
        return None

    async def take(self, deadline: float, exclude: Node | None = None) -> Node | None:
        """A channel of a node, as soon as one is free and paced. While no node is logged
        in this waits until `deadline` (wall clock) and then gives up: None. A node that
        is up but full is waited for without a bound (its calls end within their cap)."""
        while True:
            node = self.take_now(exclude)
            if node is not None:
                return node
            up = [n for n in self.all if n.pbx.connected and n is not exclude]
            if not up and time.time() >= deadline:
                return None
            usable = [n for n in up if n.room > 0]
            if usable:
                wait = min(n.pacer.delay() for n in usable)
            elif up:
                wait = None  # every channel busy: until one is freed
            else:
                wait = min(DOWN_POLL_S, max(0.0, deadline - time.time()))
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), wait)

    def occupy(self, node: Node) -> None:
        """Count a call already on `node` (adopted): it may go above its channels."""
        node.taken += 1

    def release(self, node: Node) -> None:
        """A call on `node` ended (or was never placed): its channel is free."""
        node.taken -= 1
        self._changed.set()

    def give_back(self, node: Node) -> None:
        """A claimed call was not stored: its channel and its pacing turn return."""
        node.pacer.give_back()
        self.release(node)
