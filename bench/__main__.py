"""Run every bench phase against the dev PBX and the far end; print, write JSON and a PNG.

    python -m bench [--quick] [--api-only | --backends-only] [--against REV] [--out var/bench]

Needs the dev PBX, the far end and the dev PostgreSQL up (`make bench` starts them).
Baseline (a raw panoramisk loop) and gateway steps alternate at each rate, so both see
the same machine at nearly the same time: the figures that matter are the ratios between
them. Then each one's highest sustained rate, and 1,500+ calls ringing at once through
each (the baseline first). The API phase alternates the same way between the gateway and
its floor (bench/floor.py: aiohttp with no work behind it). Last, the store backends side
by side (bench/backends.py): the gateway's CPU per call at 100 and 200 calls/s and its API
accept rate on SQLite and on PostgreSQL (the dev cluster, make pg-up), PostgreSQL's own
CPU apart. With --against REV, the API's CPU per create of this checkout and of the
revision REV, in alternating steps of one run (bench/against.py).

The verdict judges the targets of issue 20 (TARGETS), each against a floor measured in
the same run: the gateway's CPU per call against the raw loop's at 100 and 200 calls/s,
on SQLite (the calls phase) and on PostgreSQL (the backends phase); its highest sustained
rate against the loop's; the API's rate at p99 <= 25 ms and its CPU per request against
the floor's; calls lost with 1,500+ ringing against the loop's; and nothing worse than
before (the extra to INVITE at 200 calls/s, the RSS with 1,500+ ringing). A target whose
step is missing is not measured, and not met. What the machine leaves the gateway (the
cores at 200 calls/s, the API's CPU per request at 2,000/s) is shown as information.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.against import against_phase
from bench.api import API_P99_TARGET_MS, ApiStep, api_step, sandbox_numbers
from bench.backends import BackendResult, backends_phase
from bench.baseline import Baseline
from bench.floor import FloorProcess
from bench.gateway import GatewayProcess, Poster, free_port, peak_ringing
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

# Targets of issue 20: each one judged against a floor measured in the same run, the raw
# panoramisk loop (the baseline) for calls, the bare aiohttp server (bench/floor.py) for
# the API. A target whose step is missing is "not measured", and not met.
TARGETS: dict[str, float] = {
    # The gateway's CPU per call over the raw loop's, at most, at each of CPU_RATES: on
    # SQLite (the calls phase), on PostgreSQL (the backends phase, the loop's from the calls
    # phase).
    "cpu_per_call_sqlite": 2.0,
    "cpu_per_call_postgresql": 2.5,
    # The gateway's highest sustained call rate over the raw loop's, at least.
    "max_rate_ratio": 0.95,
    # API creates accepted per second with p99 <= API_P99_TARGET_MS, over the floor's
    # highest such rate, at least.
    "api_rate_ratio": 0.80,
    # The gateway's CPU per API request over the floor's, at most.
    "api_cpu_ratio": 3.0,
    # Calls lost with 1,500+ ringing (the same count, rate and ring time through both),
    # beyond the raw loop's, at most.
    "ringing_loss": 0.0,
    # Nothing worse than before (nothing_worse): at 200 calls/s, the extra to the INVITE
    # over the raw loop's; the gateway's peak RSS with at least ringing_at_once ringing.
    "p50_extra_ms_at_200": 3.0,
    "p99_extra_ms_at_200": 15.0,
    "rss_mb_with_1500_ringing": 150.0,
    "ringing_at_once": 1500.0,
}
CPU_RATES = (100.0, 200.0)  # calls/s where the CPU targets are judged
LATENCY_RATE = 200.0  # calls/s where nothing_worse's extra to the INVITE is judged
API_STEP_TRIES = 2  # an API step the load generator could not offer in full: once more
API_BUDGET_RATE = 2000.0  # information: the CPU per request this API rate leaves
RING_S = 3.0  # every call step's ring time
# The ringing steps: this many calls at this rate, each ringing this long (about 1,600
# ringing at once), through the baseline and then the gateway.
RINGING_CALLS = 2000
RINGING_RATE = 100.0
RINGING_RING_S = 16.0
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
    ringing: list[StepResult] = []
    api_steps: list[ApiStep] = []
    if not args.api_only and not args.backends_only:
        steps, search, ringing = await calls_phase(args, out, far_end)
    if not args.backends_only:
        api_steps = await api_phase(args, out)
    if args.against:
        results["against"] = asdict(await against_phase(args, out))
    backends = []
    if not args.api_only:
        backends = await backends_phase(
            args, out, far_end, Numbers(offset=BACKENDS_NUMBERS), restart_pbx
        )

    results["steps"] = [asdict(s) | {"sustained": s.sustained} for s in steps]
    results["search"] = [asdict(s) | {"sustained": s.sustained} for s in search]
    results["ringing"] = [asdict(s) | {"sustained": s.sustained} for s in ringing]
    results["api"] = [asdict(s) | {"met": s.met} for s in api_steps]
    results["backends"] = [asdict(b) for b in backends]
    results["verdict"] = verdict(steps, search, ringing, api_steps, backends, _cpus())
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if steps:
        draw(steps, search, out / "latency.png")
    print()
    print(table(steps, search, ringing, api_steps, results["verdict"], backends))
    print(f"\nwritten: {out / 'results.json'}" + (f", {out / 'latency.png'}" if steps else ""))
    return results


async def calls_phase(
    args: argparse.Namespace, out: Path, far_end: FarEndRecords
) -> tuple[list[StepResult], list[StepResult], list[StepResult]]:
    """1-3: calls through the baseline and the gateway at the same rates, alternating;
    the maximum sustained rate of each; 1,500+ calls ringing at once through each (the
    baseline first): the calls each one loses, the gateway's memory."""
    numbers = Numbers()
    step_s = 5.0 if args.quick else 20.0
    search_s = 4.0 if args.quick else 10.0
    baseline = Baseline()
    await baseline.connect()
    gateway = GatewayProcess(out / "gateway", free_port())
    await gateway.start()
    poster = Poster(gateway)
    steps: list[StepResult] = []
    search: list[StepResult] = []
    ringing: list[StepResult] = []

    async def step(
        system: str, rate: float, seconds: float, ring: float = RING_S, label: str = ""
    ) -> StepResult:
        """One step of `system` at `rate`, fresh numbers, once the PBX is idle; printed
        as it ends. `label`: the result's system, if not `system`."""
        nonlocal baseline
        await pbx_idle()
        batch = numbers.take(int(rate * seconds))
        print(
            f"  {label or system} at {rate:g} calls/s for {seconds:g}s, ring {ring:g}s ...",
            flush=True,
        )
        cores = asyncio.create_task(
            steady_cores(far_end, gateway.pid, min(ring, seconds / 2), seconds)
        )
        if system == "baseline":
            since = time.time()
            result = await baseline.step(far_end, batch, rate, ring)
            # The most of its calls ringing at once, from the far end's records (as the
            # gateway's step does): every call has ended by now.
            found = await far_end.wait_for(batch, since, timeout=0)
            result.peak_in_flight = peak_ringing(found) if found else None
        else:
            result = await poster.step(far_end, batch, rate, ring)
        result.cores = await cores
        result.system = label or result.system
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

        # Many calls ringing at once: 100/s (a rate both sustain here) with a 16 s ring,
        # about 1,600 ringing; the baseline first, then the gateway, each on fresh numbers
        # once the PBX is idle. The calls each one loses; the gateway's memory.
        for system in ("baseline", "gateway"):
            ringing.append(
                await step(
                    system,
                    RINGING_RATE,
                    RINGING_CALLS / RINGING_RATE,
                    RINGING_RING_S,
                    label=f"{system}-ringing",
                )
            )
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
                seconds = 3.0 if args.quick else 8.0
                # A step the load generator could not offer in full (it shares the cores)
                # is run once more before the climb ends there.
                for _ in range(API_STEP_TRIES):
                    print(f"  API, {name}, at {rate:g} verifications/s ...", flush=True)
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
                    if api_result.met or api_result.offered_in_full:
                        break
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
    steps: list[StepResult],
    search: list[StepResult],
    ringing: list[StepResult],
    api_steps: list[ApiStep],
    backends: list[BackendResult],
    cpus: int,
) -> dict[str, Any]:
    """Each target of issue 20 against its floor from the same run, met or not; then what
    is shown as information. A function of the measured steps alone: `steps`, the calls
    phase's (the baseline and the gateway at the same rates); `search`, the climbs to each
    one's highest sustained rate; `ringing`, the steps with 1,500+ ringing (systems
    "baseline-ringing" and "gateway-ringing"); `api_steps`, the gateway's and the floor's;
    `backends`, the store backends phase's results; `cpus`, the machine's cores.

    Each target: its value, its floor, their ratio (or None where the target is not a
    ratio), its limit and the rule it is judged by, whether it was measured and met
    (never met when not measured), notes, and figures shown beside it."""
    targets = {
        "cpu_per_call_sqlite": cpu_per_call_sqlite(steps),
        "cpu_per_call_postgresql": cpu_per_call_postgresql(steps, backends),
        "max_rate_ratio": max_rate_ratio([*steps, *search]),
        "api_rate_ratio": api_rate_ratio(api_steps),
        "api_cpu_ratio": api_cpu_ratio(api_steps),
        "ringing_loss": ringing_loss(ringing),
        "nothing_worse": nothing_worse(steps, ringing),
    }
    information: dict[str, Any] = {}
    base, gw = _at(steps, "baseline", LATENCY_RATE), _at(steps, "gateway", LATENCY_RATE)
    if gw is not None:
        information[f"gateway_calls_at_{LATENCY_RATE:g}"] = {
            "sustained": gw.sustained,
            "lost": gw.lost,
            "duplicates": gw.duplicates,
            "refused": gw.refused,
        }
    cores = call_budget(base, gw, cpus) if base is not None and gw is not None else {}
    if cores:
        information[f"cores_at_{LATENCY_RATE:g}"] = cores
    if api_steps:
        information["api_cpu_ms_per_request"] = api_budget(api_steps, cpus)
    room = max_rate_room([*steps, *search], api_steps)
    if room:
        information["room_at_max_rate_target"] = room
        least = room["raw_loop_cpu_ms_per_call"] + (room["bare_http_cpu_ms_per_request"] or 0.0)
        # Judged only when not met: a gateway that reached the rate needed no more room.
        if (
            not targets["max_rate_ratio"]["met"]
            and room["gateway_cpu_ms_per_call_that_fits"] < least
        ):
            targets["max_rate_ratio"]["notes"].append(
                f"out of reach on this machine: at {_per_s(room['rate_per_s'])} it leaves a "
                f"gateway {room['gateway_cpu_ms_per_call_that_fits']:g} CPU-ms per call, "
                f"less than the raw loop's own {room['raw_loop_cpu_ms_per_call']:g} plus a "
                f"bare HTTP request's {room['bare_http_cpu_ms_per_request'] or 0:g} at least"
            )
    return {
        "targets": targets,
        "all_met": all(t["met"] for t in targets.values()),
        "information": information,
    }


def _target(
    value: Any,
    floor: Any,
    ratio: Any,
    limit: Any,
    rule: str,
    met: bool,
    missing: list[str],
    notes: list[str] | None = None,
    **beside: Any,
) -> dict[str, Any]:
    """One target's entry: not measured (and so not met) while anything is `missing`."""
    return {
        "value": value,
        "floor": floor,
        "ratio": ratio,
        "limit": limit,
        "rule": rule,
        "measured": not missing,
        "met": met and not missing,
        "notes": [*(f"not measured: {m}" for m in missing), *(notes or [])],
        "beside": beside,
    }


def _at(steps: list[StepResult], system: str, rate: float) -> StepResult | None:
    return next((s for s in steps if s.system == system and s.offered_cps == rate), None)


def _named(steps: list[StepResult], system: str) -> StepResult | None:
    return next((s for s in steps if s.system == system), None)


def _per_s(rate: float) -> str:
    return f"{rate:g}/s"


def _not_sustained(who: str, rate: float, sustained: bool, lost: int, refused: int) -> list[str]:
    if sustained:
        return []
    return [f"{who} at {_per_s(rate)} not sustained (lost {lost}, refused {refused})"]


def _cpu_per_call(
    name: str,
    steps: list[StepResult],
    gateway: dict[float, float | None],
    gateway_is: str,
    notes: list[str],
    **beside: Any,
) -> dict[str, Any]:
    """The gateway's CPU-ms per call (`gateway`, by rate: a rate absent had no step) over
    the calls phase's raw loop's, at each of CPU_RATES: met only if at every one."""
    limit = TARGETS[name]
    notes = list(notes)
    value: dict[str, float | None] = {}
    floor: dict[str, float | None] = {}
    ratio: dict[str, float | None] = {}
    missing: list[str] = []
    for rate in CPU_RATES:
        label = _per_s(rate)
        base = _at(steps, "baseline", rate)
        value[label] = gateway.get(rate)
        floor[label] = base.cpu_seconds_per_1000 if base is not None else None
        ratio[label] = None
        if rate not in gateway:
            missing.append(f"no {gateway_is} at {label}")
        elif value[label] is None:
            missing.append(f"no CPU figure for the {gateway_is} at {label}")
        if base is None:
            missing.append(f"no baseline step at {label}")
        elif not floor[label]:
            missing.append(f"no CPU figure for the baseline at {label}")
        else:
            notes += _not_sustained("baseline", rate, base.sustained, base.lost, base.refused)
        g, f = value[label], floor[label]
        if g is not None and f:
            ratio[label] = round(g / f, 2)
    met = all(r is not None and r <= limit for r in ratio.values())
    rule = f"ratio <= {limit:g} at {' and '.join(map(_per_s, CPU_RATES))}"
    return _target(value, floor, ratio, limit, rule, met, missing, notes, **beside)


def cpu_per_call_sqlite(steps: list[StepResult]) -> dict[str, Any]:
    """The calls phase's gateway (on SQLite) against its raw loop, CPU-ms per call."""
    gateway: dict[float, float | None] = {}
    store: dict[str, float | None] = {}  # by label, as the target's figures
    notes: list[str] = []
    for rate in CPU_RATES:
        step = _at(steps, "gateway", rate)
        if step is not None:
            gateway[rate] = step.cpu_seconds_per_1000
            store[_per_s(rate)] = step.store_cpu_seconds_per_1000
            notes += _not_sustained("gateway", rate, step.sustained, step.lost, step.refused)
    target = _cpu_per_call("cpu_per_call_sqlite", steps, gateway, "gateway step", notes)
    # What a store that took no CPU at all would leave: when even that misses the limit,
    # no change to the store can meet it.
    without: dict[str, float | None] = {}
    for label, g in target["value"].items():
        s, f = store.get(label), target["floor"][label]
        without[label] = round((g - s) / f, 2) if g is not None and s is not None and f else None
    if any(v is not None for v in without.values()):
        target["beside"]["ratio_without_its_store"] = without
        over = {label: v for label, v in without.items() if v is not None and v > target["limit"]}
        if over and not target["met"]:
            target["notes"].append(
                "out of reach by the store alone: without any of its store's CPU the gateway "
                "would still be "
                + ", ".join(f"{v:g}x the loop at {label}" for label, v in over.items())
            )
    return target


def cpu_per_call_postgresql(
    steps: list[StepResult], backends: list[BackendResult]
) -> dict[str, Any]:
    """The backends phase's gateway on PostgreSQL against the calls phase's raw loop at
    the same rate, CPU-ms per call; PostgreSQL's own CPU beside it (not in the ratio)."""
    postgresql = next((b for b in backends if b.backend == "postgresql"), None)
    gateway: dict[float, float | None] = {}
    server: dict[str, float | None] = {}
    notes: list[str] = []
    for rate in CPU_RATES:
        call = postgresql.call_at(rate) if postgresql is not None else None
        if call is not None:
            gateway[rate] = call.get("gateway_cpu_ms_per_call")
            server[_per_s(rate)] = call.get("postgres_cpu_ms_per_call")
            notes += _not_sustained(
                "PostgreSQL's gateway",
                rate,
                bool(call.get("sustained")),
                call.get("lost", 0),
                call.get("refused", 0),
            )
    return _cpu_per_call(
        "cpu_per_call_postgresql",
        steps,
        gateway,
        "PostgreSQL call step",
        notes,
        postgresql_own_cpu_ms_per_call=server,
    )


def max_rate_ratio(steps: list[StepResult]) -> dict[str, Any]:
    """The gateway's highest sustained call rate over the raw loop's, from every call step
    (the same rates through both, then each one's climb)."""
    limit = TARGETS["max_rate_ratio"]
    best: dict[str, float | None] = {}
    missing: list[str] = []
    notes: list[str] = []
    for system in ("gateway", "baseline"):
        tried = [s for s in steps if s.system == system]
        if not tried:
            best[system] = None
            missing.append(f"no {system} call step")
            continue
        best[system] = max((s.offered_cps for s in tried if s.sustained), default=0.0)
        highest = max(s.offered_cps for s in tried)
        if best[system] == highest:
            notes.append(
                f"the {system} sustained the highest rate tried ({_per_s(highest)}): "
                "its maximum may be higher"
            )
    value, floor = best["gateway"], best["baseline"]
    if floor == 0.0:
        missing.append("the baseline sustained no rate tried")
    ratio = round(value / floor, 3) if value is not None and floor else None
    met = ratio is not None and ratio >= limit
    return _target(value, floor, ratio, limit, f"ratio >= {limit:g}", met, missing, notes)


def api_rate_ratio(api_steps: list[ApiStep]) -> dict[str, Any]:
    """API creates accepted per second at the fastest step that met p99 <= 25 ms (and
    took what was offered), the gateway's over the floor's."""
    limit = TARGETS["api_rate_ratio"]
    top: dict[str, ApiStep | None] = {}
    rate: dict[str, float | None] = {}
    missing: list[str] = []
    notes: list[str] = []
    unfound: dict[str, str] = {}  # a system whose climb the load generator ended
    for system in ("gateway", "floor"):
        tried = [s for s in api_steps if s.system == system]
        top[system] = _top(api_steps, system)
        found = top[system]
        rate[system] = found.accepted_per_s if found is not None else (0.0 if tried else None)
        above = [s for s in tried if s.offered_per_s > (found.offered_per_s if found else 0.0)]
        if not tried:
            missing.append(f"no {system} API step")
        elif found is not None and max(tried, key=lambda s: s.offered_per_s).met:
            notes.append(
                f"the {system} met every rate it was offered, up to "
                f"{_per_s(max(s.offered_per_s for s in tried))}: its maximum may be higher"
            )
        elif above and not any(s.offered_in_full for s in above):
            # Every rate it missed, it missed because it was not sent: its maximum is
            # higher than its top, by how much the run cannot tell.
            short = min(above, key=lambda s: s.offered_per_s)
            unfound[system] = (
                f"the {system}'s maximum was not found: the load generator sent "
                f"{_per_s(short.fired_per_s)} of the {_per_s(short.offered_per_s)} offered"
            )
    if rate["floor"] == 0.0:
        missing.append(f"the floor met p99 <= {API_P99_TARGET_MS:g} ms at no rate")
    value, floor = rate["gateway"], rate["floor"]
    ratio = round(value / floor, 3) if value is not None and floor else None
    met = ratio is not None and ratio >= limit
    # A floor higher than found lowers the ratio; a gateway higher than found raises it.
    for system, judged in (("floor", met), ("gateway", not met)):
        if system in unfound:
            (missing if ratio is not None and judged else notes).append(unfound[system])
    gw_top, floor_top = top["gateway"], top["floor"]
    return _target(
        value,
        floor,
        ratio,
        limit,
        f"ratio >= {limit:g} (accepted/s with p99 <= {API_P99_TARGET_MS:g} ms)",
        met,
        missing,
        notes,
        p99_ms={
            "gateway": gw_top.accept_ms.get("p99") if gw_top else None,
            "floor": floor_top.accept_ms.get("p99") if floor_top else None,
        },
        floor_sent_per_s=floor_top.fired_per_s if floor_top else None,
    )


def api_cpu_ratio(api_steps: list[ApiStep]) -> dict[str, Any]:
    """The gateway's CPU-ms per API request over the floor's: at the highest offered rate
    both met, else (no rate both met) the minimum of each one's met steps."""
    limit = TARGETS["api_cpu_ratio"]

    def met_cpu(system: str) -> dict[float, float]:
        return {
            s.offered_per_s: s.cpu_seconds_per_1000
            for s in api_steps
            if s.system == system and s.met and s.cpu_seconds_per_1000 is not None
        }

    gateway, floor_cpu = met_cpu("gateway"), met_cpu("floor")
    both = sorted(set(gateway) & set(floor_cpu))
    value: float | None = None
    floor: float | None = None
    at: float | None = None
    missing: list[str] = []
    if both:
        at = both[-1]
        value, floor = gateway[at], floor_cpu[at]
        compared = f"at {_per_s(at)}, the highest offered rate both met"
    elif gateway and floor_cpu:
        value, floor = min(gateway.values()), min(floor_cpu.values())
        compared = "no offered rate both met: the minimum of each one's met steps"
    else:
        compared = "not compared"
        missing = [
            f"no {system} API step met p99 <= {API_P99_TARGET_MS:g} ms"
            for system, cpu in (("gateway", gateway), ("floor", floor_cpu))
            if not cpu
        ]
        value = min(gateway.values(), default=None)
        floor = min(floor_cpu.values(), default=None)
    if floor == 0.0:
        missing.append("the floor's CPU per request rounds to 0")
    ratio = round(value / floor, 2) if value is not None and floor else None
    met = ratio is not None and ratio <= limit
    return _target(
        value,
        floor,
        ratio,
        limit,
        f"ratio <= {limit:g} (CPU-ms per request)",
        met,
        missing,
        compared=compared,
    )


def ringing_loss(ringing: list[StepResult]) -> dict[str, Any]:
    """With 1,500+ calls ringing (the same count, rate and ring time through both): the
    calls the gateway lost (no INVITE at the far end), against the raw loop's."""
    limit = TARGETS["ringing_loss"]
    base, gw = _named(ringing, "baseline-ringing"), _named(ringing, "gateway-ringing")
    missing = [
        f"no {who} step with 1,500+ ringing"
        for who, step in (("baseline", base), ("gateway", gw))
        if step is None
    ]
    notes: list[str] = []
    if gw is not None and gw.refused:
        notes.append(f"the gateway refused {gw.refused} creates (not counted as lost)")
    for who, step in (("baseline", base), ("gateway", gw)):
        peak = step.peak_in_flight if step is not None else None
        if peak is not None and peak < TARGETS["ringing_at_once"]:
            notes.append(
                f"the {who} had only {peak} ringing at once, "
                f"fewer than {TARGETS['ringing_at_once']:,.0f}"
            )
    met = base is not None and gw is not None and gw.lost - base.lost <= limit
    rule = "lost <= the baseline's" + (f" + {limit:g}" if limit else "")

    def each(field: str) -> dict[str, Any]:
        return {
            who: getattr(step, field) if step is not None else None
            for who, step in (("baseline", base), ("gateway", gw))
        }

    return _target(
        gw.lost if gw is not None else None,
        base.lost if base is not None else None,
        None,
        limit,
        rule,
        met,
        missing,
        notes,
        duplicates=each("duplicates"),
        refused=each("refused"),
        peak_ringing=each("peak_in_flight"),
    )


def nothing_worse(steps: list[StepResult], ringing: list[StepResult]) -> dict[str, Any]:
    """Nothing worse than before: at 200 calls/s, the p50 and p99 extra to the INVITE
    over the raw loop's within TARGETS; the gateway's peak RSS with 1,500+ ringing too."""
    base, gw = _at(steps, "baseline", LATENCY_RATE), _at(steps, "gateway", LATENCY_RATE)
    ring = _named(ringing, "gateway-ringing")
    at = _per_s(LATENCY_RATE)
    value: dict[str, float | None] = {}
    floor: dict[str, float | None] = {}
    gateway_ms: dict[str, float | None] = {}
    missing = [
        f"no {who} step at {at}" for who, step in (("baseline", base), ("gateway", gw)) if not step
    ]
    notes: list[str] = []
    checks: list[bool] = []
    for p in ("p50", "p99"):
        key = f"{p}_extra_ms_at_{LATENCY_RATE:g}"
        b = base.to_invite_ms.get(p) if base is not None else None
        g = gw.to_invite_ms.get(p) if gw is not None else None
        floor[f"{p}_ms"], gateway_ms[p] = b, g
        extra = round(g - b, 2) if b is not None and g is not None else None
        value[f"{p}_extra_ms"] = extra
        if base is not None and gw is not None and extra is None:
            missing.append(f"no {p} to the INVITE at {at}")
        if extra is not None and extra > TARGETS[key]:
            notes.append(f"{p} extra {extra:g} ms > {TARGETS[key]:g}")
        checks.append(extra is not None and extra <= TARGETS[key])
    rss = ring.peak_rss_mb if ring is not None else None
    peak = ring.peak_in_flight if ring is not None else None
    value["rss_mb"], value["peak_ringing"] = rss, peak
    rss_limit, enough = TARGETS["rss_mb_with_1500_ringing"], TARGETS["ringing_at_once"]
    if ring is None:
        missing.append("no gateway step with 1,500+ ringing")
    elif rss is None:
        missing.append("no RSS figure with 1,500+ ringing")
    elif (peak or 0) < enough:
        notes.append(f"only {peak} ringing at once, fewer than {enough:,.0f}")
    elif rss > rss_limit:
        notes.append(f"RSS {rss:g} MB > {rss_limit:g}")
    checks.append(rss is not None and (peak or 0) >= enough and rss <= rss_limit)
    limit = {
        "p50_extra_ms": TARGETS[f"p50_extra_ms_at_{LATENCY_RATE:g}"],
        "p99_extra_ms": TARGETS[f"p99_extra_ms_at_{LATENCY_RATE:g}"],
        "rss_mb": rss_limit,
        "ringing_at_once": enough,
    }
    rule = (
        f"at {at} p50 extra <= {limit['p50_extra_ms']:g} ms and p99 extra <= "
        f"{limit['p99_extra_ms']:g} ms; RSS <= {rss_limit:g} MB with {enough:,.0f}+ ringing"
    )
    return _target(
        value,
        floor,
        None,
        limit,
        rule,
        all(checks),
        missing,
        notes,
        gateway_to_invite_ms=gateway_ms,
    )


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
    against what API_BUDGET_RATE allows in one process (one core) or on every core (the
    minimum of each one's steps that met the p99 target)."""

    floor_top = _top(api_steps, "floor")
    load = floor_top.load_cpu_seconds_per_1000 if floor_top else None
    rate = API_BUDGET_RATE
    return {
        "gateway": _least_cpu(api_steps, "gateway"),
        "floor": _least_cpu(api_steps, "floor"),
        "load_generator": load,
        "rate_per_s": rate,
        "one_process_at_rate": round(1000 / rate, 3),
        "all_cores_at_rate": round(cpus * 1000 / rate - (load or 0.0), 3),
    }


def max_rate_room(steps: list[StepResult], api_steps: list[ApiStep]) -> dict[str, Any]:
    """What this machine leaves a gateway at the rate max_rate_ratio asks of it (its share
    of the loop's highest sustained rate), from the cores each process of the test bed used.

    The test bed keeps up while it uses no more than the most any sustained step of the run
    used (`usable_cores`); Asterisk and the far end need, per call, what they needed under
    the baseline; the HTTP load generator what it needed per call in the gateway's steps.
    What is left, per call, is all a gateway may use there. Any gateway does at least the
    raw loop's work and answers one HTTP request per call (the floor's CPU per request):
    where what is left is less, the target is out of reach on this machine, whatever the
    gateway's code. {} when a figure is missing."""
    sustained = [s for s in steps if s.sustained]
    loops = [s for s in sustained if s.system == "baseline"]
    totals = [s.cores["total"] for s in sustained if s.cores.get("total")]
    beds = [s for s in steps if s.system == "baseline" and s.cores and s.offered_cps]
    loads = [
        s.cores[LOAD_GENERATOR] / s.offered_cps
        for s in steps
        if s.system == "gateway" and LOAD_GENERATOR in s.cores and s.offered_cps
    ]
    top = max(loops, key=lambda s: s.offered_cps, default=None)
    if top is None or top.cpu_seconds_per_1000 is None or not totals or not beds or not loads:
        return {}
    rate = round(top.offered_cps * TARGETS["max_rate_ratio"], 1)
    usable = max(totals)
    pbx = statistics.median(
        (s.cores.get("asterisk", 0.0) + s.cores.get("far end", 0.0)) / s.offered_cps for s in beds
    )
    load = statistics.median(loads)
    left = usable - (pbx + load) * rate
    gateway = [s for s in sustained if s.system == "gateway"]
    fastest = max(gateway, key=lambda s: s.offered_cps, default=None)
    return {
        "rate_per_s": rate,
        "usable_cores": usable,
        "asterisk_and_far_end": round(pbx * rate, 2),
        "http_load_generator": round(load * rate, 2),
        "gateway_cpu_ms_per_call_that_fits": round(max(left, 0.0) / rate * 1000, 2),
        "raw_loop_cpu_ms_per_call": top.cpu_seconds_per_1000,
        "bare_http_cpu_ms_per_request": _least_cpu(api_steps, "floor"),
        "gateway_cpu_ms_per_call": fastest.cpu_seconds_per_1000 if fastest else None,
    }


def _least_cpu(api_steps: list[ApiStep], system: str) -> float | None:
    """The system's least CPU-ms per request among its steps that met the API target."""
    values = [
        s.cpu_seconds_per_1000
        for s in api_steps
        if s.system == system and s.met and s.cpu_seconds_per_1000 is not None
    ]
    return round(min(values), 3) if values else None


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
