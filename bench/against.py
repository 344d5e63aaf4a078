"""The API's accept CPU against another revision's, in one run (`--against REV`).

The other revision's code is exported (git archive) under .cache/bench/ and run by the
same interpreter; both gateways take sandbox creates at one rate, in alternating steps,
so both see the same machine at nearly the same time. The figure is the ratio of the
medians of their CPU per create."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tarfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from bench.api import api_step, sandbox_numbers
from bench.gateway import REPO, GatewayProcess, Poster, free_port

EXPORTS = REPO / ".cache" / "bench"
ROUNDS = 6  # steps per gateway; the first of a pair alternates
QUICK_ROUNDS = 2


@dataclass
class Against:
    revision: str  # the other one, as asked
    commit: str
    rate: float
    cpu_ms_per_create: dict[str, list[float]] = field(default_factory=dict)  # by side
    accepted_per_s: dict[str, list[float]] = field(default_factory=dict)

    def median(self, side: str) -> float:
        return round(statistics.median(self.cpu_ms_per_create[side]), 3)

    @property
    def ratio(self) -> float:
        """This checkout's CPU per create over the other revision's: below 1 is cheaper."""
        return round(self.median("this") / self.median("other"), 3)


def export(revision: str) -> tuple[str, Path]:
    """The revision's commit and its tree, exported once under .cache/bench/."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tree = EXPORTS / f"against-{commit[:12]}"
    if not (tree / "gateway").is_dir():
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=REPO, check=True, capture_output=True
        ).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
    return commit, tree


async def against_phase(args: argparse.Namespace, out: Path) -> Against:
    commit, tree = export(args.against)
    result = Against(args.against, commit, args.against_rate)
    sources = {"this": REPO, "other": tree}
    servers: dict[str, GatewayProcess] = {}
    posters: dict[str, Poster] = {}
    try:
        for side, source in sources.items():
            server = GatewayProcess(
                out / f"against-{side}", free_port(), sandbox_numbers(), source=source
            )
            await server.start()
            servers[side], posters[side] = server, Poster(server, connections=64)
            await api_step(server, posters[side], 500, 2, side)  # warm up
            result.cpu_ms_per_create[side], result.accepted_per_s[side] = [], []
        for i in range(QUICK_ROUNDS if args.quick else ROUNDS):
            for side in list(sources) if i % 2 == 0 else list(reversed(sources)):
                step = await api_step(servers[side], posters[side], args.against_rate, 6, side)
                assert step.cpu_seconds_per_1000 is not None
                result.cpu_ms_per_create[side].append(step.cpu_seconds_per_1000)
                result.accepted_per_s[side].append(step.accepted_per_s)
                print(
                    f"  against {commit[:12]}, {side}: accepted {step.accepted_per_s:g}/s, "
                    f"refused {step.refused}, {step.cpu_seconds_per_1000} CPU-ms per create",
                    flush=True,
                )
    finally:
        for poster in posters.values():
            await poster.close()
        for server in servers.values():
            server.stop()
    print(
        f"  CPU per create: this {result.median('this')} ms, {args.against} "
        f"({commit[:12]}) {result.median('other')} ms: ratio {result.ratio}",
        flush=True,
    )
    return result
