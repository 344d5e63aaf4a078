"""The baseline: a minimal panoramisk loop originating straight to AMI, no gateway.

The same calls as the gateway places (same AMI user, channel, caller-ID shape, ring time),
sent at a fixed rate; what it measures is what Asterisk and the far end cost by themselves.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from panoramisk import Manager

from bench.measure import POOL_PREFIX, FarEndRecords, StepResult, fill_invites, paced, summary_ms
from gateway.pbx import new_channel_id

AMI = {"host": "127.0.0.1", "port": 5038, "username": "otp-gateway", "secret": "otp-dev-secret"}
CHANNEL = "PJSIP/{number}@otp-trunk"


class Baseline:
    """One logged-in AMI connection that originates calls and times their Ringing."""

    def __init__(self) -> None:
        self._manager: Manager | None = None
        self._ringing: dict[str, float] = {}
        self._hungup: set[str] = set()

    async def connect(self) -> None:
        manager = Manager(
            loop=asyncio.get_running_loop(),
            **AMI,
            ping_delay=3600,  # no pings in the middle of a measurement
            forgetable_actions=("ping", "login", "originate"),
        )
        manager.register_event("Newstate", self._on_newstate)
        manager.register_event("DialState", self._on_dialstate)
        manager.register_event("Hangup", self._on_hangup)
        await manager.connect()
        deadline = time.monotonic() + 10
        while not manager.authenticated:
            if time.monotonic() > deadline:
                raise RuntimeError("baseline: no AMI login within 10 s")
            await asyncio.sleep(0.05)
        self._manager = manager

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()

    def _on_newstate(self, manager: Manager, message: Any) -> None:
        if message.get("ChannelState") == "5":
            self._ringing.setdefault(message.get("Uniqueid", ""), time.time())

    def _on_dialstate(self, manager: Manager, message: Any) -> None:
        if message.get("DialStatus") in ("RINGING", "PROGRESS"):
            self._ringing.setdefault(message.get("DestUniqueid", ""), time.time())

    def _on_hangup(self, manager: Manager, message: Any) -> None:
        self._hungup.add(message.get("Uniqueid", ""))

    async def step(
        self, far_end: FarEndRecords, numbers: list[str], rate: float, ring_seconds: float
    ) -> StepResult:
        """Originate one call per number at `rate`; wait until every call has ended."""
        assert self._manager is not None
        manager = self._manager
        sent: dict[str, float] = {}
        ids: dict[str, str] = {}
        replies: list[asyncio.Future[Any]] = []

        def fire(i: int) -> None:
            number = numbers[i]
            channel_id = new_channel_id()
            ids[number] = channel_id
            cli = POOL_PREFIX + f"{random.randrange(10_000):04d}"
            sent[number] = time.time()
            replies.append(
                manager.send_action(
                    {
                        "Action": "Originate",
                        "Channel": CHANNEL.format(number=number),
                        "CallerID": f"<{cli}>",
                        "Timeout": str(round(ring_seconds * 1000)),
                        "Application": "Hangup",
                        "Async": "true",
                        "ChannelId": channel_id,
                    },
                    as_list=False,
                )
            )

        # This process's CPU from the first Originate to the last Hangup: what the
        # panoramisk loop costs per call (the far end's log is read afterwards).
        cpu = time.process_time()
        t0 = await paced(rate, len(numbers), fire)
        answers = await asyncio.gather(*replies, return_exceptions=True)
        refused = sum(1 for a in answers if isinstance(a, BaseException) or not a.success)
        # Let the calls end before the next step: Asterisk's load must not carry over.
        deadline = time.monotonic() + ring_seconds + 20
        while time.monotonic() < deadline and not all(ids[n] in self._hungup for n in numbers):
            await asyncio.sleep(0.25)
        cpu = time.process_time() - cpu
        found = await far_end.wait_for(numbers, t0, timeout=20)
        result = StepResult("baseline", rate, len(numbers), len(numbers) / rate, ring_seconds)
        result.refused = refused
        fill_invites(result, sent, found)
        ringing = [self._ringing[ids[n]] - sent[n] for n in numbers if ids[n] in self._ringing]
        result.to_ringing_ms = summary_ms(ringing)
        result.cpu_seconds_per_1000 = round(cpu / len(numbers) * 1000, 3)
        return result
