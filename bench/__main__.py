"""Run every bench phase against the dev PBX and the far end; print, write JSON and a PNG.

    python -m bench [--quick] [--api-only | --backends-only] [--against REV] [--out var/bench]

Needs the dev PBX and the far end up (`make bench` starts them). Baseline and gateway
steps alternate at each rate, so both see the same machine at nearly the same time:
the figures that matter are the ratios between them. The API phase alternates the same
way between the gateway and its floor (bench/floor.py: aiohttp with no work behind it).
The verdict adds what the machine leaves the gateway: at 200 calls/s, the cores left
once Asterisk and the far end have what they used under the baseline; for the API, the
CPU per request that 2,000/s allows beside the load generator. Last, the store backends
side by side (bench/backends.py): the gateway's CPU per call and its API accept rate on
SQLite and on PostgreSQL (the dev cluster, make pg-up), PostgreSQL's own CPU apart.
With --against REV, the API's CPU per create of this checkout and of the revision REV,
in alternating steps of one run (bench/against.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.against import against_phase
from bench.api import API_P99_TARGET_MS, ApiStep, api_step, sandbox_numbers
from bench.backends import backends_phase
from bench.backends import table as backends_table
from bench.baseline import Baseline
from bench.floor import FloorProcess
from bench.gateway import GatewayProcess, Poster, free_port
from bench.measure import (
    SUSTAINED_P99_MS,
    FarEndRecords,
    Numbers,
    StepResult,
    pbx_idle,
    steady_cores,
)
from bench.report import draw, table

REPO = Path(__file__).resolve().parent.parent

# Targets of issue 8.
TARGETS = {
    "p50_extra_ms_at_200": 3.0,
    "p99_extra_ms_at_200": 15.0,
    "max_rate_ratio": 0.9,
    "cpu_seconds_per_1000": 1.5,
    "rss_mb_with_1500_ringing": 150.0,
    "api_accepted_per_s": 2000.0,
    "api_p99_ms": API_P99_TARGET_MS,
}
RING_S = 3.0  # every call step's ring time
# The backends phase's numbers start this far into the run's range: never one the
# calls phase used (a destination called twice would count as a duplicate).
BACKENDS_NUMBERS = 5_000_000


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    far_end = FarEndRecords()
    if not far_end.running():
        sys.exit("bench: the far end is not running (make farend-up)")
    results: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": _cpus(), "python": platform.python_version()},
        "ring_seconds": RING_S,
        "step_seconds": 5.0 if args.quick else 20.0,
        "sustained_p99_ms": SUSTAINED_P99_MS,
        "targets": TARGETS,
    }
    steps: list[StepResult] = []
    search: list[StepResult] = []
    ringing: StepResult | None = None
    api_steps: list[ApiStep] = []
    if not args.api_only and not args.backends_only:
        steps, search, ringing = await calls_phase(args, out, far_end)
    if not args.backends_only:
        api_steps = await api_phase(args, out)
    if args.against:
        results["against"] = asdict(await against_phase(args, out))
    backends = []
    if not args.api_only:
        backends = await backends_phase(args, out, far_end, Numbers(offset=BACKENDS_NUMBERS))

    results["steps"] = [asdict(s) | {"sustained": s.sustained} for s in steps]
    results["search"] = [asdict(s) | {"sustained": s.sustained} for s in search]
    results["ringing"] = asdict(ringing) if ringing else None
    results["api"] = [asdict(s) | {"met": s.met} for s in api_steps]
    results["verdict"] = verdict(steps + search, ringing, api_steps, _cpus())
    results["backends"] = [asdict(b) for b in backends]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if steps:
        draw(steps, search, out / "latency.png")
    print()
    print(table(steps, search, ringing, api_steps, results["verdict"]))
    if backends:
        print("\nThe store backends (one gateway process each; PostgreSQL's CPU apart):")
        print(backends_table(backends))
    print(f"\nwritten: {out / 'results.json'}" + (f", {out / 'latency.png'}" if steps else ""))
    return results


async def calls_phase(
    args: argparse.Namespace, out: Path, far_end: FarEndRecords
) -> tuple[list[StepResult], list[StepResult], StepResult]:
    """1-3: calls through the baseline and the gateway at the same rates, alternating;
    the maximum sustained rate of each; the gateway's memory with 1,500+ calls ringing."""
    numbers = Numbers()
    step_s = 5.0 if args.quick else 20.0
    search_s = 4.0 if args.quick else 10.0
    ring_s = RING_S
    baseline = Baseline()
    await baseline.connect()
    gateway = GatewayProcess(out / "gateway", free_port())
    await gateway.start()
    poster = Poster(gateway)
    steps: list[StepResult] = []
    search: list[StepResult] = []

    async def step(system: str, rate: float, seconds: float) -> StepResult:
        """One step of `system` at `rate`, once the PBX is idle; printed as it ends."""
        nonlocal baseline
        await pbx_idle()
        batch = numbers.take(int(rate * seconds))
        print(f"  {system} at {rate:g} calls/s for {seconds:g}s ...", flush=True)
        cores = asyncio.create_task(
            steady_cores(far_end, gateway.pid, min(ring_s, seconds / 2), seconds)
        )
        if system == "baseline":
            result = await baseline.step(far_end, batch, rate, ring_s)
        else:
            result = await poster.step(far_end, batch, rate, ring_s)
        result.cores = await cores
        print("    " + _brief(result), flush=True)
        if not result.sustained:
            # Overloaded, Asterisk stays slow long after its channels are gone (seen:
            # the next, lower rate no longer sustained): every step starts on a fresh PBX.
            print("    (restarting the dev PBX)", flush=True)
            baseline.close()
            await restart_pbx()
            baseline = Baseline()
            await baseline.connect()
            await gateway.wait_ready()
        return result

    try:
        # 1-3. The same rates through both, alternating.
        for rate in args.rates:
            for system in ("baseline", "gateway"):
                steps.append(await step(system, rate, step_s))

        # The maximum sustained rate of each: climb until a rate is not sustained.
        for system in ("baseline", "gateway"):
            for rate in args.search:
                search.append(await step(system, rate, search_s))
                if not search[-1].sustained:
                    break

        # Memory with many calls ringing at once: 100/s (a rate the gateway sustains
        # here) with a 16 s ring, about 1,600 ringing.
        await pbx_idle()
        print("  gateway: 1,500+ calls ringing at once ...", flush=True)
        cores = asyncio.create_task(steady_cores(far_end, gateway.pid, 10.0, 20.0))
        ringing = await poster.step(
            far_end, numbers.take(2000), 100, 16.0, system="gateway-ringing"
        )
        ringing.cores = await cores
        print("    " + _brief(ringing), flush=True)
    finally:
        await poster.close()
        gateway.stop()
        baseline.close()
    return steps, search, ringing


async def api_phase(args: argparse.Namespace, out: Path) -> list[ApiStep]:
    """Verifications to sandbox numbers (nothing dialed). At each rate the floor (bare
    aiohttp, no work) and the gateway, in turn; each climbs until it misses the target."""
    api = GatewayProcess(out / "api", free_port(), test_numbers=sandbox_numbers())
    floor = FloorProcess(out / "floor", free_port())
    servers = {"floor": floor, "gateway": api}
    api_steps: list[ApiStep] = []
    posters: dict[str, Poster] = {}
    try:
        for name, server in servers.items():
            await server.start()
            posters[name] = Poster(server, connections=64)
            await api_step(server, posters[name], 500, 2, name)  # warm up
        climbing = set(servers)
        for i, rate in enumerate(args.api_rates):
            # Which goes first alternates: neither always gets the fresher machine.
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in [n for n in order if n in climbing]:
                print(f"  API, {name}, at {rate:g} verifications/s ...", flush=True)
                seconds = 3.0 if args.quick else 8.0
                api_result = await api_step(servers[name], posters[name], rate, seconds, name)
                api_steps.append(api_result)
                print(
                    f"    sent {api_result.fired_per_s:g}/s, "
                    f"accepted {api_result.accepted_per_s:g}/s, p50 "
                    f"{api_result.accept_ms['p50']} ms, p99 {api_result.accept_ms['p99']} ms, "
                    f"refused {api_result.refused}, server {api_result.cpu_seconds_per_1000} "
                    f"CPU-ms each, load generator {api_result.load_cpu_seconds_per_1000}",
                    flush=True,
                )
                if not api_result.met:
                    climbing.discard(name)
            if not climbing:
                break
    finally:
        for poster_ in posters.values():
            await poster_.close()
        for server in servers.values():
            server.stop()
    return api_steps


def verdict(
    steps: list[StepResult], ringing: StepResult | None, api_steps: list[ApiStep], cpus: int
) -> dict[str, Any]:
    """Each target of issue 8 with the measured value and whether it is met."""

    def at(system: str, rate: float) -> StepResult | None:
        return next((s for s in steps if s.system == system and s.offered_cps == rate), None)

    def best(system: str) -> float:
        return max((s.offered_cps for s in steps if s.system == system and s.sustained), default=0)

    out: dict[str, Any] = {}
    base, gw = at("baseline", 200), at("gateway", 200)
    if steps:
        if base and gw:
            for p, key in (("p50", "p50_extra_ms_at_200"), ("p99", "p99_extra_ms_at_200")):
                extra = (gw.to_invite_ms[p] or 0) - (base.to_invite_ms[p] or 0)
                out[key] = {"value": round(extra, 2), "met": extra <= TARGETS[key]}
            out["no_loss_or_duplicate_at_200"] = {
                "value": {"lost": gw.lost, "duplicates": gw.duplicates, "refused": gw.refused},
                "met": gw.lost == gw.duplicates == gw.refused == 0,
            }
        max_base, max_gw = best("baseline"), best("gateway")
        ratio = max_gw / max_base if max_base else 0.0
        out["max_sustained_cps"] = {"baseline": max_base, "gateway": max_gw}
        out["max_rate_ratio"] = {
            "value": round(ratio, 3),
            "met": ratio >= TARGETS["max_rate_ratio"],
        }
        # The worst sustained step, and each rate's against the baseline's CPU at that rate.
        cpu = [s.cpu_seconds_per_1000 for s in steps if s.system == "gateway" and s.sustained]
        worst = max((c for c in cpu if c is not None), default=None)
        ratios = {}
        for s in steps:
            base_cpu = getattr(at("baseline", s.offered_cps), "cpu_seconds_per_1000", None)
            if s.system == "gateway" and s.cpu_seconds_per_1000 and base_cpu:
                ratios[f"{s.offered_cps:g}/s"] = round(s.cpu_seconds_per_1000 / base_cpu, 2)
        out["cpu_seconds_per_1000"] = {
            "value": worst,
            "gateway_over_baseline": ratios,
            "met": worst is not None and worst <= TARGETS["cpu_seconds_per_1000"],
        }
        if ringing is not None:
            out["rss_mb_with_1500_ringing"] = {
                "value": ringing.peak_rss_mb,
                "peak_ringing": ringing.peak_in_flight,
                "met": (ringing.peak_in_flight or 0) >= 1500
                and (ringing.peak_rss_mb or 1e9) <= TARGETS["rss_mb_with_1500_ringing"],
            }
    gw_api, floor_api = _top(api_steps, "gateway"), _top(api_steps, "floor")
    out["api_accepted_per_s"] = {
        "value": gw_api.accepted_per_s if gw_api else 0,
        "p99_ms": gw_api.accept_ms["p99"] if gw_api else None,
        "floor": floor_api.accepted_per_s if floor_api else 0,
        "met": gw_api is not None and gw_api.accepted_per_s >= TARGETS["api_accepted_per_s"],
    }
    out["api_cpu_ms_per_request"] = api_budget(api_steps, cpus)
    if base and gw:
        out["cores_at_200"] = call_budget(base, gw, cpus)
    return out


LOAD_GENERATOR = "bench (load generator)"  # in the baseline's steps: the baseline's loop


def call_budget(base: StepResult, gw: StepResult, cpus: int) -> dict[str, Any]:
    """What the machine leaves the gateway at 200 calls/s, from the cores each process of
    the test bed used: Asterisk and the far end need what they needed under the baseline,
    the gateway and its HTTP load generator share the rest."""
    if not base.cores or not gw.cores:
        return {}
    # Not the baseline's total: the gateway, idle in the baseline's steps, still reads
    # the AMI events of the baseline's calls (same AMI user).
    pbx_and_far_end = base.cores.get("asterisk", 0.0) + base.cores.get("far end", 0.0)
    left = cpus - pbx_and_far_end
    load = gw.cores.get(LOAD_GENERATOR, 0.0)
    return {
        "baseline_bed": base.cores["total"],
        "asterisk_and_far_end": round(pbx_and_far_end, 2),
        "left_for_gateway_and_load": round(left, 2),
        "load_generator": load,
        "gateway_cpu_ms_per_call_that_fits": round((left - load) / base.offered_cps * 1000, 2),
        "gateway_cpu_ms_per_call": gw.cpu_seconds_per_1000,
    }


def api_budget(api_steps: list[ApiStep], cpus: int) -> dict[str, Any]:
    """CPU-ms per request: the gateway's, the floor's (HTTP alone) and the load generator's,
    against what the target rate allows in one process (one core) or on every core."""

    def cpu(system: str) -> float | None:
        values = [
            s.cpu_seconds_per_1000
            for s in api_steps
            if s.system == system and s.met and s.cpu_seconds_per_1000 is not None
        ]
        return round(min(values), 3) if values else None

    floor_top = _top(api_steps, "floor")
    load = floor_top.load_cpu_seconds_per_1000 if floor_top else None
    rate = TARGETS["api_accepted_per_s"]
    return {
        "gateway": cpu("gateway"),
        "floor": cpu("floor"),
        "load_generator": load,
        "one_process_at_target": round(1000 / rate, 3),
        "all_cores_at_target": round(cpus * 1000 / rate - (load or 0.0), 3),
    }


def _top(api_steps: list[ApiStep], system: str) -> ApiStep | None:
    """The system's fastest step that met the API target."""
    met = [s for s in api_steps if s.system == system and s.met]
    return max(met, key=lambda s: s.accepted_per_s, default=None)


def _brief(s: StepResult) -> str:
    return (
        f"achieved {s.achieved_cps:g}/s, to INVITE p50 {s.to_invite_ms.get('p50')} "
        f"p99 {s.to_invite_ms.get('p99')} ms, lost {s.lost}, dup {s.duplicates}, "
        f"refused {s.refused}"
        + (f", cpu {s.cpu_seconds_per_1000} s/1000" if s.cpu_seconds_per_1000 is not None else "")
        + (f", rss {s.peak_rss_mb} MB" if s.peak_rss_mb is not None else "")
        + (f", ringing at once {s.peak_in_flight}" if s.peak_in_flight is not None else "")
        + (f"\n    cores used: {s.cores}" if s.cores else "")
    )


async def restart_pbx() -> None:
    for command in ("down", "up"):
        await asyncio.to_thread(
            subprocess.run,
            ["bash", str(REPO / "asterisk-config" / "dev" / "pbx.sh"), command],
            check=True,
            capture_output=True,
        )


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short steps, for a smoke run")
    parser.add_argument(
        "--api-only",
        action="store_true",
        help="only the API phase (the gateway still logs in to the dev PBX)",
    )
    parser.add_argument(
        "--backends-only",
        action="store_true",
        help="only the store backends phase (SQLite and PostgreSQL side by side)",
    )
    parser.add_argument(
        "--against",
        metavar="REV",
        help="also compare the API's CPU per create with the git revision REV's",
    )
    parser.add_argument(
        "--against-rate",
        type=float,
        default=1000.0,
        help="creates per second of the --against steps",
    )
    parser.add_argument("--out", type=Path, default=REPO / "var" / "bench")
    parser.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 300])
    parser.add_argument("--search", type=float, nargs="+", default=[225, 250, 275, 300, 350, 400])
    parser.add_argument(
        "--api-rates", type=float, nargs="+", default=[250, 500, 750, 1000, 1500, 2000, 2500]
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
