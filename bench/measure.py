"""What every bench phase shares: numbers, pacing, percentiles, the far end's records."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.farend import DEFAULT_WORKDIR, FarEnd, InviteRecord

POOL_PREFIX = "6221500"
_run_base = random.randrange(10**6)  # numbers differ between runs: the far end's log persists


class Numbers:
    """Fresh Indonesian mobile numbers ending in 0 (the far end rings, never answers)."""

    def __init__(self, offset: int = 0) -> None:
        self._next = _run_base * 10 + offset

    def take(self, count: int) -> list[str]:
        start, self._next = self._next, self._next + count
        # 813 (Telkomsel too), not the tests' 812: the lab far end's log outlives both,
        # and a test must never find a bench call to the number it drew.
        return [f"62813{(start + i) % 10**7:07d}0" for i in range(count)]


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (nearest rank) of `values`, or None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50, p95, p99 and max of latencies given in seconds, in milliseconds."""
    out: dict[str, float | None] = {}
    for name, p in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("max", 100.0)):
        value = percentile(seconds, p)
        out[name] = None if value is None else round(value * 1000, 2)
    return out


async def paced(rate: float, count: int, fire: Callable[[int], Awaitable[None] | None]) -> float:
    """Call fire(i) at t0 + i/rate for i < count (an open loop); return t0.

    A late start is not made up by a burst beyond the schedule: each call goes at its
    own time or, if the loop is behind, at once.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    t0 = time.time()
    tasks: list[asyncio.Task[Any]] = []
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        result = fire(i)
        if result is not None:
            tasks.append(asyncio.ensure_future(result))
    if tasks:
        await asyncio.gather(*tasks)
    return t0


@dataclass
class StepResult:
    """One rate step of one system (baseline or gateway)."""

    system: str
    offered_cps: float
    calls: int
    seconds: float
    ring_seconds: float
    invites: int = 0  # INVITEs the far end received for this step's numbers
    duplicates: int = 0  # numbers that got more than one INVITE
    lost: int = 0  # numbers that got none
    achieved_cps: float = 0.0
    to_invite_ms: dict[str, float | None] = field(default_factory=dict)
    to_ringing_ms: dict[str, float | None] = field(default_factory=dict)
    to_accept_ms: dict[str, float | None] = field(default_factory=dict)  # gateway: POST to 201
    refused: int = 0  # requests or Originates refused
    cpu_seconds_per_1000: float | None = None
    # Of it, the gateway's SQLite store's (otp_store_cpu_seconds_total); None elsewhere.
    store_cpu_seconds_per_1000: float | None = None
    peak_rss_mb: float | None = None
    peak_in_flight: int | None = None
    # Cores each process used over the step (Asterisk, the far end, the gateway, this
    # load generator): the machine has 2, and what they add up to is what limits.
    cores: dict[str, float] = field(default_factory=dict)

    @property
    def sustained(self) -> bool:
        """Every call reached the far end once, at (nearly) the offered rate, promptly."""
        p99 = self.to_invite_ms.get("p99")
        return (
            self.lost == 0
            and self.duplicates == 0
            and self.refused == 0
            and self.achieved_cps >= 0.95 * self.offered_cps
            and p99 is not None
            and p99 <= SUSTAINED_P99_MS
        )


# A rate is "sustained" only while the 99th percentile to the INVITE stays this low:
# beyond it, work is queueing, and a longer step would fall further behind.
SUSTAINED_P99_MS = 100.0


PBX_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "asterisk-root"
PBX_PIDFILE = PBX_ROOT.parent / "asterisk.pid"


class Cores:
    """CPU used by each process of the test bed between `start` and `stop`, in cores."""

    def __init__(self, far_end: FarEndRecords, gateway_pid: int | None = None) -> None:
        self._far_end = far_end
        self._gateway_pid = gateway_pid

    def _processes(self) -> dict[str, psutil.Process]:
        pids = {
            "asterisk": _read_pid(PBX_PIDFILE),
            "far end": self._far_end.pid(),
            "gateway": self._gateway_pid,
            "bench (load generator)": os.getpid(),
        }
        found = {}
        for name, pid in pids.items():
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    found[name] = psutil.Process(pid)
        return found

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._procs = self._processes()
        self._cpu0 = {name: _cpu(p) for name, p in self._procs.items()}

    def stop(self) -> dict[str, float]:
        seconds = time.monotonic() - self._t0
        used = {}
        for name, proc in self._procs.items():
            with contextlib.suppress(psutil.Error):
                used[name] = round((_cpu(proc) - self._cpu0[name]) / seconds, 2)
        used["total"] = round(sum(used.values()), 2)
        return used


async def steady_cores(
    far_end: FarEndRecords, gateway_pid: int | None, after: float, until: float
) -> dict[str, float]:
    """Cores used from `after` to `until` seconds into a step: once the first calls'
    ring times have ended and while calls are still being sent, every part of a call's
    work runs at the step's rate."""
    await asyncio.sleep(after)
    cores = Cores(far_end, gateway_pid)
    cores.start()
    await asyncio.sleep(until - after)
    return cores.stop()


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def pbx_channels() -> int | None:
    """Channels the dev PBX has open now (None if it cannot be asked)."""
    try:
        out = subprocess.run(
            ["chroot", str(PBX_ROOT), "/usr/sbin/asterisk", "-rx", "core show channels count"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.split(" active channels", 1)[0].strip().rsplit("\n", 1)[-1]
    return int(first) if first.isdigit() else None


async def pbx_idle(timeout: float = 60.0) -> int | None:
    """Wait until the dev PBX has no channel left (an overloaded step can leave it
    busy for a while); the channels still open when `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        channels = await asyncio.to_thread(pbx_channels)
        if not channels or time.monotonic() > deadline:
            return channels
        await asyncio.sleep(1)


class FarEndRecords:
    """The dev far end's INVITE records, read from its log (tests/farend.py)."""

    def __init__(self, workdir: Path = DEFAULT_WORKDIR) -> None:
        self._far_end = FarEnd(workdir)

    def running(self) -> bool:
        return self._far_end.running()

    def pid(self) -> int | None:
        return self._far_end.pid()

    async def wait_for(
        self, numbers: Sequence[str], since: float, timeout: float
    ) -> dict[str, list[InviteRecord]]:
        """INVITEs to `numbers` received after `since`, once each has one (or on timeout)."""
        wanted = set(numbers)
        deadline = time.monotonic() + timeout
        while True:
            found: dict[str, list[InviteRecord]] = {}
            for record in self._far_end.records():
                if record.request_user in wanted and record.invited_at >= since:
                    found.setdefault(record.request_user, []).append(record)
            if len(found) == len(wanted) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.25)


def fill_invites(
    result: StepResult, sent: dict[str, float], found: dict[str, list[InviteRecord]]
) -> None:
    """Latency from each send to its INVITE; losses, duplicates and the achieved rate."""
    latencies = []
    times = []
    for number, sent_at in sent.items():
        records = found.get(number, [])
        if not records:
            result.lost += 1
            continue
        if len(records) > 1:
            result.duplicates += 1
        result.invites += len(records)
        first = min(r.invited_at for r in records)
        latencies.append(first - sent_at)
        times.append(first)
    result.to_invite_ms = summary_ms(latencies)
    if len(times) > 1:
        result.achieved_cps = round((len(times) - 1) / (max(times) - min(times)), 1)
