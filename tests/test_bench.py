"""The bench's verdict: what the machine leaves the gateway, from measured steps."""

from __future__ import annotations

import pytest

from bench.__main__ import api_budget, call_budget, verdict
from bench.api import ApiStep
from bench.measure import StepResult


def _call_step(system: str, cores: dict[str, float], cpu: float) -> StepResult:
    step = StepResult(system, 200, 4000, 20, 3)
    step.cores = cores
    step.cpu_seconds_per_1000 = cpu
    return step


def test_call_budget_gives_the_gateway_what_the_baseline_loop_used() -> None:
    base = _call_step(
        "baseline",
        {"asterisk": 1.3, "far end": 0.2, "gateway": 0.05, "bench (load generator)": 0.25},
        1.2,
    )
    gw = _call_step(
        "gateway",
        {"asterisk": 1.0, "far end": 0.2, "gateway": 0.6, "bench (load generator)": 0.15},
        3.0,
    )
    base.cores["total"] = 1.8
    budget = call_budget(base, gw, cpus=2)
    assert budget["asterisk_and_far_end"] == 1.5  # not the idle gateway's 0.05
    assert budget["left_for_gateway_and_load"] == 0.5
    # (0.5 - 0.15) cores over 200 calls/s
    assert budget["gateway_cpu_ms_per_call_that_fits"] == pytest.approx(1.75)
    assert budget["gateway_cpu_ms_per_call"] == 3.0


def _api_step(system: str, rate: float, cpu: float, load: float, p99: float) -> ApiStep:
    step = ApiStep(system, rate, int(rate * 8), accepted=int(rate * 8), accepted_per_s=rate)
    step.accept_ms = {"p50": 1.0, "p99": p99}
    step.cpu_seconds_per_1000, step.load_cpu_seconds_per_1000 = cpu, load
    return step


def test_api_budget_counts_only_steps_that_met_the_target() -> None:
    steps = [
        _api_step("floor", 1000, 0.3, 0.25, 4.0),
        _api_step("floor", 2000, 0.25, 0.2, 5.0),
        _api_step("gateway", 500, 1.3, 0.35, 16.0),
        _api_step("gateway", 1000, 0.9, 0.25, 80.0),  # p99 over 25 ms: not met
    ]
    budget = api_budget(steps, cpus=2)
    assert budget["gateway"] == 1.3
    assert budget["floor"] == 0.25
    assert budget["load_generator"] == 0.2  # at the floor's fastest step
    assert budget["one_process_at_target"] == 0.5
    assert budget["all_cores_at_target"] == pytest.approx(0.8)
    top = verdict([], None, steps, cpus=2)["api_accepted_per_s"]
    assert top == {"value": 500, "p99_ms": 16.0, "floor": 2000, "met": False}
