"""The gateway on each store backend, in one run: its CPU per call (at 100 and at 200
calls/s) and its API accept rate on SQLite and on PostgreSQL, with PostgreSQL's own CPU
shown apart.

PostgreSQL is the dev cluster (make pg-up), a new database per backend step. Its CPU is
its server processes' (the postmaster and every backend and worker), read before and
after each step; the gateway's is its own process's, as everywhere in the bench.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.api import API_P99_TARGET_MS, KEPT_UP, ApiStep, api_step, sandbox_numbers
from bench.gateway import GatewayProcess, Poster, free_port
from bench.measure import FarEndRecords, Numbers, StepResult, pbx_idle
from tests.pg import DevPostgres

BACKENDS = ("sqlite", "postgresql")
# The call steps on each backend: the rates the CPU targets of issue 20 are judged at
# (against the calls phase's raw loop at the same rates), each long enough that start-up
# costs vanish.
CALL_RATES = (100.0, 200.0)
CALL_SECONDS = 20.0
RING_S = 3.0
API_RATES = (250.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0)


@dataclass
class BackendResult:
    backend: str
    # One per rate of CALL_RATES: sustained, lost, duplicates, refused, latencies, the
    # gateway's CPU-ms per call and (PostgreSQL) the server's.
    call_steps: list[dict[str, Any]] = field(default_factory=list)
    # The highest rate taken in full (KEPT_UP of the offered), and its p99; the highest
    # offered rate that also met the API's p99 target.
    api_accepted_per_s: float = 0.0
    api_p99_ms: float | None = None
    api_target_met_up_to: float = 0.0
    gateway_cpu_ms_per_request: float | None = None
    postgres_cpu_ms_per_request: float | None = None
    api_steps: list[dict[str, Any]] = field(default_factory=list)

    def call_at(self, rate: float) -> dict[str, Any] | None:
        """The call step at `rate`, if there was one."""
        return next((c for c in self.call_steps if c["offered_cps"] == rate), None)


class PostgresCpu:
    """CPU seconds used by the dev PostgreSQL's server processes."""

    def __init__(self, postgres: DevPostgres) -> None:
        self._postgres = postgres

    def seconds(self) -> float:
        pid = self._postgres.pid()
        if pid is None:
            raise RuntimeError("the dev PostgreSQL is not running (make pg-up)")
        total = 0.0
        postmaster = psutil.Process(pid)
        for process in (postmaster, *postmaster.children(recursive=True)):
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:  # a backend that ended meanwhile
                continue
            total += times.user + times.system
        return total


async def backends_phase(
    args: argparse.Namespace,
    out: Path,
    far_end: FarEndRecords,
    numbers: Numbers,
    restart_pbx: Callable[[], Awaitable[None]] | None = None,
) -> list[BackendResult]:
    """Each backend in turn: a call step at each of CALL_RATES, then the API climb.
    `restart_pbx`, after a call step not sustained: the next starts on a fresh PBX."""
    postgres = DevPostgres()
    if not postgres.running():
        raise RuntimeError("the dev PostgreSQL is not running (make pg-up)")
    pg_cpu = PostgresCpu(postgres)
    results = []
    for backend in BACKENDS:
        result = BackendResult(backend)
        await _calls(args, out, far_end, numbers, postgres, pg_cpu, result, restart_pbx)
        await _api(args, out, postgres, pg_cpu, result)
        results.append(result)
    return results


def _database(postgres: DevPostgres, backend: str, name: str) -> str | None:
    """A new database for one step: None (a new SQLite file), or a PostgreSQL URL."""
    if backend == "sqlite":
        return None
    return postgres.create_database(name, replace=True)


async def _calls(
    args: argparse.Namespace,
    out: Path,
    far_end: FarEndRecords,
    numbers: Numbers,
    postgres: DevPostgres,
    pg_cpu: PostgresCpu,
    result: BackendResult,
    restart_pbx: Callable[[], Awaitable[None]] | None,
) -> None:
    seconds = 5.0 if args.quick else CALL_SECONDS
    database = _database(postgres, result.backend, "bench_calls")
    gateway = GatewayProcess(out / f"calls-{result.backend}", free_port(), database=database)
    await gateway.start()
    poster = Poster(gateway)
    try:
        for rate in CALL_RATES:
            await pbx_idle()
            print(f"  {result.backend}: gateway at {rate:g} calls/s ...", flush=True)
            before = pg_cpu.seconds()
            step: StepResult = await poster.step(
                far_end,
                numbers.take(int(rate * seconds)),
                rate,
                RING_S,
                system=f"gateway-{result.backend}",
            )
            pg_seconds = pg_cpu.seconds() - before
            entry = {
                "offered_cps": rate,
                "sustained": step.sustained,
                "achieved_cps": step.achieved_cps,
                "lost": step.lost,
                "duplicates": step.duplicates,
                "refused": step.refused,
                "to_invite_ms": step.to_invite_ms,
                "to_accept_ms": step.to_accept_ms,
                "gateway_cpu_ms_per_call": step.cpu_seconds_per_1000,
                "postgres_cpu_ms_per_call": (
                    round(pg_seconds / step.calls * 1000, 3)
                    if result.backend == "postgresql"
                    else None
                ),
            }
            result.call_steps.append(entry)
            print(
                f"    sustained {step.sustained}, gateway {entry['gateway_cpu_ms_per_call']} "
                f"CPU-ms per call, PostgreSQL {entry['postgres_cpu_ms_per_call']}",
                flush=True,
            )
            if not step.sustained and restart_pbx is not None:
                # As in the calls phase: an overloaded Asterisk stays slow for a while.
                print("    (restarting the dev PBX)", flush=True)
                await restart_pbx()
                await gateway.wait_ready()
    finally:
        await poster.close()
        gateway.stop()


async def _api(
    args: argparse.Namespace,
    out: Path,
    postgres: DevPostgres,
    pg_cpu: PostgresCpu,
    result: BackendResult,
) -> None:
    database = _database(postgres, result.backend, "bench_api")
    server = GatewayProcess(
        out / f"api-{result.backend}",
        free_port(),
        test_numbers=sandbox_numbers(),
        database=database,
    )
    await server.start()
    poster = Poster(server, connections=64)
    try:
        await api_step(server, poster, 500, 2)  # warm up
        for rate in API_RATES:
            print(f"  {result.backend}: API at {rate:g} verifications/s ...", flush=True)
            before = pg_cpu.seconds()
            step: ApiStep = await api_step(server, poster, rate, 3.0 if args.quick else 8.0)
            pg_seconds = pg_cpu.seconds() - before
            entry = {
                "offered_per_s": rate,
                "accepted_per_s": step.accepted_per_s,
                "p99_ms": step.accept_ms["p99"],
                "met": step.met,
                "gateway_cpu_ms_per_request": step.cpu_seconds_per_1000,
                "postgres_cpu_ms_per_request": (
                    round(pg_seconds / max(step.requests, 1) * 1000, 3)
                    if result.backend == "postgresql"
                    else None
                ),
            }
            result.api_steps.append(entry)
            print(
                f"    accepted {step.accepted_per_s:g}/s, p99 {step.accept_ms['p99']} ms, "
                f"gateway {step.cpu_seconds_per_1000} CPU-ms each, PostgreSQL "
                f"{entry['postgres_cpu_ms_per_request']}",
                flush=True,
            )
            if step.refused or step.accepted_per_s < KEPT_UP * rate:
                break  # saturated: it no longer takes what is offered
            result.api_accepted_per_s = step.accepted_per_s
            result.api_p99_ms = step.accept_ms["p99"]
            result.gateway_cpu_ms_per_request = step.cpu_seconds_per_1000
            result.postgres_cpu_ms_per_request = entry["postgres_cpu_ms_per_request"]
            if step.met:
                result.api_target_met_up_to = rate
    finally:
        await poster.close()
        server.stop()


def table(results: list[BackendResult]) -> str:
    """The backends side by side."""

    def calls(rate: float, key: str) -> tuple[str, ...]:
        return tuple(str((r.call_at(rate) or {}).get(key)) for r in results)

    rows: list[tuple[str, ...]] = [("", *(r.backend for r in results))]
    for rate in CALL_RATES:
        rows += [
            (f"{rate:g} calls/s: sustained", *calls(rate, "sustained")),
            (f"{rate:g} calls/s: gateway CPU-ms per call", *calls(rate, "gateway_cpu_ms_per_call")),
            (
                f"{rate:g} calls/s: PostgreSQL CPU-ms per call",
                *calls(rate, "postgres_cpu_ms_per_call"),
            ),
        ]
    rows += [
        ("API: highest rate taken in full /s", *(f"{r.api_accepted_per_s:g}" for r in results)),
        ("API: p99 ms at that rate", *(str(r.api_p99_ms) for r in results)),
        (
            f"API: p99 <= {API_P99_TARGET_MS:g} ms up to /s",
            *(f"{r.api_target_met_up_to:g}" for r in results),
        ),
        ("gateway CPU-ms per request", *(str(r.gateway_cpu_ms_per_request) for r in results)),
        (
            "PostgreSQL CPU-ms per request",
            *(str(r.postgres_cpu_ms_per_request) for r in results),
        ),
    ]
    width = max(len(row[0]) for row in rows)
    return "\n".join(
        f"{row[0]:<{width}}  " + "  ".join(f"{cell:>12}" for cell in row[1:]) for row in rows
    )
