"""The bench's table (the steps, the backends, the verdict) and its PNG of latency
percentiles against rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt

from bench.api import ApiStep
from bench.backends import BackendResult
from bench.backends import table as backends_table
from bench.measure import StepResult

COLOURS = {"baseline": "tab:blue", "gateway": "tab:orange"}


def table(
    steps: list[StepResult],
    search: list[StepResult],
    ringing: list[StepResult],
    api_steps: list[ApiStep],
    verdict: dict[str, Any],
    backends: list[BackendResult] | None = None,
) -> str:
    """Every step, the store backends side by side, then the verdict."""
    header = (
        f"{'system':<16}{'offered':>8}{'achieved':>9}{'p50':>8}{'p95':>8}{'p99':>8}"
        f"{'ring p50':>9}{'ring p99':>9}{'lost':>5}{'dup':>4}{'cpu/1k':>8}{'rss MB':>8}"
        f"{'cores':>7}{'ast':>6}"
    )
    lines = [
        "calls (latency to the far end's INVITE, ms; ring: to Ringing; cpu/1k: CPU-seconds"
        " per 1,000 calls of the gateway, or of the baseline's loop; cores: what the test"
        " bed's processes use together while calls are being sent, of 2; ast: Asterisk's)",
        header,
    ]
    for s in [*steps, *search, *ringing]:
        lines.append(
            f"{s.system:<16}{s.offered_cps:>8g}{s.achieved_cps:>9g}"
            f"{_ms(s.to_invite_ms, 'p50')}{_ms(s.to_invite_ms, 'p95')}{_ms(s.to_invite_ms, 'p99')}"
            f"{_ms(s.to_ringing_ms, 'p50', 9)}{_ms(s.to_ringing_ms, 'p99', 9)}"
            f"{s.lost:>5}{s.duplicates:>4}"
            f"{_num(s.cpu_seconds_per_1000)}{_num(s.peak_rss_mb)}"
            f"{_num(s.cores.get('total'), 7)}{_num(s.cores.get('asterisk'), 6)}"
            + ("" if s.sustained else "  (not sustained)")
        )
    lines += [
        "",
        "API only (sandbox numbers, nothing dialed; floor: a bare aiohttp server, no work;"
        " sent: the rate the load generator kept up; cpu/1k: the server's CPU-seconds per"
        " 1,000 requests, load: the load generator's)",
        f"{'system':<10}{'offered/s':>10}{'sent/s':>8}{'accepted/s':>11}{'p50 ms':>8}"
        f"{'p99 ms':>8}{'cpu/1k':>8}{'load/1k':>8}",
    ]
    for a in api_steps:
        lines.append(
            f"{a.system:<10}{a.offered_per_s:>10g}{a.fired_per_s:>8g}{a.accepted_per_s:>11g}"
            f"{_ms(a.accept_ms, 'p50')}{_ms(a.accept_ms, 'p99')}"
            f"{_num(a.cpu_seconds_per_1000)}{_num(a.load_cpu_seconds_per_1000)}"
            + ("" if a.met else "  (target not met)")
        )
    if backends:
        lines += [
            "",
            "the store backends (one gateway process each; PostgreSQL's CPU apart)",
            backends_table(backends),
        ]
    return "\n".join([*lines, "", *verdict_lines(verdict)])


def verdict_lines(verdict: dict[str, Any]) -> list[str]:
    """One line per target (its value, its floor, their ratio, its limit, met or not, then
    notes and the figures beside it); then the figures kept as information."""
    lines = [
        "targets (issue 20; each against its floor from this run: the raw loop's for calls,"
        " the bare aiohttp server's for the API; CPU in ms per call or per request)"
    ]
    for name, target in verdict.get("targets", {}).items():
        line = (
            f"  {name}: value {_figure(target['value'])}; floor {_figure(target['floor'])};"
            f" ratio {_figure(target['ratio'])}; limit {target['rule']}:"
            f" {'met' if target['met'] else 'not met'}"
        )
        if target.get("notes"):
            line += " (" + "; ".join(target["notes"]) + ")"
        for key, value in target.get("beside", {}).items():
            line += f"; {key.replace('_per_s', '/s').replace('_', ' ')} {_figure(value)}"
        lines.append(line)
    if "all_met" in verdict:
        lines.append(f"  all met: {'yes' if verdict['all_met'] else 'no'}")
    if verdict.get("information"):
        lines += ["", "information (not targets)"]
        for name, value in verdict["information"].items():
            lines.append(f"  {name}: {_figure(value)}")
    return lines


def _figure(value: Any) -> str:
    """A figure as printed: None as '-', numbers short, a dict as 'key value, ...'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        return f"{value:g}"
    if isinstance(value, dict):
        inner = ", ".join(
            f"{k} " + (f"({_figure(v)})" if isinstance(v, dict) else _figure(v))
            for k, v in value.items()
        )
        return inner or "-"
    return str(value)


def draw(steps: list[StepResult], search: list[StepResult], path: Path) -> None:
    """Latency to the INVITE (p50, p95, p99) against offered rate, baseline and gateway."""
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for system, colour in COLOURS.items():
        points = sorted(
            (s for s in [*steps, *search] if s.system == system), key=lambda s: s.offered_cps
        )
        rates = [s.offered_cps for s in points]
        for p, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            values = [s.to_invite_ms.get(p) for s in points]
            ax.plot(
                rates,
                [v if v is not None else float("nan") for v in values],
                style,
                marker="o",
                color=colour,
                label=f"{system} {p}",
            )
    ax.set_xlabel("offered calls per second")
    ax.set_ylabel("to the far end's INVITE (ms)")
    ax.set_yscale("log")
    ax.set_title("otp-gateway vs raw panoramisk: Originate/POST to INVITE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ms(summary: dict[str, float | None], p: str, width: int = 8) -> str:
    value = summary.get(p)
    return f"{'-' if value is None else f'{value:.1f}':>{width}}"


def _num(value: float | None, width: int = 8) -> str:
    return f"{'-' if value is None else f'{value:g}':>{width}}"
