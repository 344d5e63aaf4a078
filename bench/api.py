"""API-only throughput: verifications accepted per second, to sandbox numbers (no call)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bench.gateway import Poster, ServerProcess
from bench.measure import paced, summary_ms

SANDBOX_PHONES = 2_000  # cycled through; more than a step's concurrency
SANDBOX_CODE = "1234"
API_P99_TARGET_MS = 25.0
# Of the offered rate: a server that accepted less is saturated; a load generator that
# sent less fell behind (it shares the cores), whatever the server did.
KEPT_UP = 0.97


def sandbox_numbers() -> dict[str, str]:
    return {f"+62812990{i:05d}": SANDBOX_CODE for i in range(SANDBOX_PHONES)}


@dataclass
class ApiStep:
    system: str  # "gateway", or "floor": bench.floor's bare aiohttp server
    offered_per_s: float
    requests: int
    accepted: int = 0
    refused: int = 0
    accepted_per_s: float = 0.0
    # The rate the load generator managed to send at: below the offered rate, the
    # generator (which shares the cores) fell behind, whatever the server did.
    fired_per_s: float = 0.0
    accept_ms: dict[str, float | None] = field(default_factory=dict)
    cpu_seconds_per_1000: float | None = None  # the server's
    # The load generator's (this process): it shares the machine's cores with the server.
    load_cpu_seconds_per_1000: float | None = None

    @property
    def offered_in_full(self) -> bool:
        """The load generator sent (nearly) the rate offered: what the step missed is the
        server's."""
        return self.fired_per_s >= KEPT_UP * self.offered_per_s

    @property
    def met(self) -> bool:
        p99 = self.accept_ms.get("p99")
        return (
            self.refused == 0
            and self.accepted_per_s >= KEPT_UP * self.offered_per_s
            and p99 is not None
            and p99 <= API_P99_TARGET_MS
        )


async def api_step(
    server: ServerProcess, poster: Poster, rate: float, seconds: float, system: str = "gateway"
) -> ApiStep:
    """POST to sandbox numbers at `rate` (an open loop) for `seconds`."""
    phones = list(sandbox_numbers())
    count = int(rate * seconds)
    step = ApiStep(system, rate, count)
    latencies: list[float] = []
    answered: list[float] = []
    fired: list[float] = []

    async def one(i: int) -> None:
        fired.append(time.time())
        status, sent, at = await poster.post(phones[i % len(phones)])
        if status == 201:
            latencies.append(at - sent)
            answered.append(at)
        else:
            step.refused += 1

    cpu_before, load_before = server.cpu_seconds(), time.process_time()
    t0 = time.time()
    await paced(rate, count, one)
    cpu, load = server.cpu_seconds() - cpu_before, time.process_time() - load_before
    step.accepted = len(latencies)
    if answered:
        step.accepted_per_s = round(step.accepted / (max(answered) - t0), 1)
    if fired:
        step.fired_per_s = round(count / (max(fired) - t0 + 1 / rate), 1)
    step.accept_ms = summary_ms(latencies)
    step.cpu_seconds_per_1000 = round(cpu / max(count, 1) * 1000, 3)
    step.load_cpu_seconds_per_1000 = round(load / max(count, 1) * 1000, 3)
    await asyncio.sleep(1)  # let the write-ahead log checkpoint between steps
    return step
