"""The gateway under test: a real `python -m gateway run` process, driven over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.baseline import AMI
from bench.measure import FarEndRecords, StepResult, fill_invites, paced, summary_ms

REPO = Path(__file__).resolve().parent.parent


def bench_config(
    workdir: Path,
    port: int,
    operator_port: int,
    test_numbers: dict[str, str] | None = None,
    database: str | None = None,
) -> Path:
    """A config whose limits and pacing stay out of the way: the bench measures the
    gateway's own cost, not its policy. `database`: a URL; None, a new SQLite file."""
    config: dict[str, Any] = {
        "http": {"host": "127.0.0.1", "port": port, "operator_port": operator_port},
        "database": {"url": database or f"sqlite:///{workdir / 'gateway.sqlite3'}"},
        "asterisk": {"secret": AMI["secret"], "settle_seconds": 0.5},
        "pools": [{"name": "bench", "prefix": "+6221500", "code_length": 4}],
        "security": {"code_secret": "bench-code-secret-not-for-production"},
        "calls": {
            "ring_seconds": 3,
            "max_ring_seconds": 20,
            "max_concurrent": 10_000,
            "max_per_second": 5_000,
            "max_queue": 100_000,
        },
        # Every limit is checked on each create, over windows as long as production's
        # (config.example.yaml), with counts the bench never reaches.
        "limits": {
            "per_phone": [{"count": 3, "seconds": 600}, {"count": 10, "seconds": 86400}],
            "per_prefix": [{"count": 10_000_000, "seconds": 3600}],
            "global_calls": [{"count": 10_000_000, "seconds": 60}],
            "key_requests_per_minute": 100_000_000,
            "key_daily_calls": 100_000_000,
        },
        "logging": {"format": "json", "level": "info"},
        "test_numbers": test_numbers or {},
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server under test in a process of its own: its URL, its CPU and its memory."""

    log_name = "server.log"

    def __init__(self, workdir: Path, port: int, source: Path = REPO) -> None:
        workdir = workdir.resolve()  # its processes may run in another checkout
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.source = source  # the checkout whose code runs (bench --against: another's)
        self.url = f"http://127.0.0.1:{port}"
        self.metrics_url = self.url + "/metrics"
        self.key = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    async def start(self) -> None:
        with (self.workdir / self.log_name).open("ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.source,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self.ps = psutil.Process(self.proc.pid)
        try:
            await self.wait_ready()
        except BaseException:
            self.stop()
            raise

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until /readyz answers 200 (the gateway: the database answers, AMI is logged in)."""
        assert self.proc is not None
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited; see {self.workdir / self.log_name}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(self.url + "/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.url} not ready within {timeout:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def cpu_seconds(self) -> float:
        assert self.ps is not None
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss_mb(self) -> float:
        assert self.ps is not None
        return float(self.ps.memory_info().rss) / 2**20


class GatewayProcess(ServerProcess):
    """`python -m gateway run` with a fresh database and an API key."""

    log_name = "gateway.log"

    def __init__(
        self,
        workdir: Path,
        port: int,
        test_numbers: dict[str, str] | None = None,
        database: str | None = None,
        source: Path = REPO,
    ):
        super().__init__(workdir, port, source)
        workdir = self.workdir
        self.database = database
        for old in workdir.glob("gateway.sqlite3*"):
            old.unlink()
        with socket.socket() as s:  # the operator's listener: a free port of its own
            s.bind(("127.0.0.1", 0))
            operator_port = int(s.getsockname()[1])
        self.metrics_url = f"http://127.0.0.1:{operator_port}/metrics"
        self.config = bench_config(workdir, port, operator_port, test_numbers, database)

    def _gateway(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config)],
            check=True,
            capture_output=True,
            text=True,
            cwd=self.source,
        ).stdout

    def command(self) -> list[str]:
        return [sys.executable, "-m", "gateway", "run", "--config", str(self.config)]

    async def start(self) -> None:
        self.key = self._gateway("keys", "create", "bench").strip().splitlines()[-1]
        await super().start()

    async def ringing_at(self, numbers: list[str]) -> dict[str, float | None]:
        """phone (no +) -> when its call rang, from the gateway's database (read-only)."""
        wanted = {"+" + n for n in numbers}
        sql = (
            "SELECT v.phone, c.ringing_at FROM calls c "
            "JOIN verifications v ON v.id = c.verification_id"
        )
        if self.database is not None:
            conn = await asyncpg.connect(self.database)
            try:
                rows = [tuple(row) for row in await conn.fetch(sql)]
            finally:
                await conn.close()
        else:
            uri = f"file:{self.workdir / 'gateway.sqlite3'}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
                rows = db.execute(sql).fetchall()
        return {p[1:]: r for p, r in rows if p in wanted}


class Poster:
    """Posts verifications over a pool of keep-alive connections, as an internal service
    would. HTTP/1.1 written by hand: the load generator shares the 2 cores with what it
    measures, and aiohttp's client cost a quarter of a core at 200 requests/s."""

    def __init__(self, server: ServerProcess, connections: int = 256) -> None:
        self.server = server
        self._http = aiohttp.ClientSession()  # for the odd GET (/metrics)
        self._port = int(server.url.rsplit(":", 1)[1])
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(connections)
        self._head = (
            "POST /v1/verifications HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {server.key}\r\nContent-Type: application/json\r\n"
        ).encode()

    async def close(self) -> None:
        await self._http.close()
        for _, writer in self._idle:
            writer.close()

    async def post(self, phone: str, ring_seconds: float | None = None) -> tuple[int, float, float]:
        """(status, sent at, answered at) of one create."""
        body: dict[str, Any] = {"phone": phone}
        if ring_seconds is not None:
            body["ring_seconds"] = round(ring_seconds)
        payload = json.dumps(body).encode()
        request = self._head + b"Content-Length: %d\r\n\r\n" % len(payload) + payload
        async with self._slots:
            reused = bool(self._idle)
            if reused:
                reader, writer = self._idle.pop()
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
            sent = time.time()
            writer.write(request)
            first = await reader.readline()
            if not first and reused:
                # The server closed it while it sat idle (http.keepalive_seconds): a
                # client retries such a request once, on a new connection.
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
                sent = time.time()
                writer.write(request)
                first = await reader.readline()
            status = int(first.split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            answered = time.time()
            self._idle.append((reader, writer))
        return status, sent, answered

    async def step(
        self,
        far_end: FarEndRecords,
        numbers: list[str],
        rate: float,
        ring_seconds: float,
        system: str = "gateway",
    ) -> StepResult:
        """POST one verification per number at `rate`; wait until every call has ended."""
        gateway = self.server
        assert isinstance(gateway, GatewayProcess), "calls need the gateway"
        sent: dict[str, float] = {}
        accepted: list[float] = []
        refused = 0
        peak_rss = gateway.rss_mb()

        async def one(i: int) -> None:
            nonlocal refused
            try:
                status, at, answered = await self.post("+" + numbers[i], ring_seconds)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                refused += 1
                return
            if status != 201:
                refused += 1
                return
            sent[numbers[i]] = at
            accepted.append(answered - at)

        async def sample_rss() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, gateway.rss_mb())
                await asyncio.sleep(0.05)

        store_before = await self.store_cpu_seconds()
        sampler = asyncio.create_task(sample_rss())
        cpu_before = gateway.cpu_seconds()
        try:
            t0 = await paced(rate, len(numbers), one)
            found = await far_end.wait_for(numbers, t0, timeout=ring_seconds + 20)
            await self._wait_ended(ring_seconds)
            # Again, now that every call has ended at the far end too (CANCEL, BYE).
            found = await far_end.wait_for(numbers, t0, timeout=0)
        finally:
            sampler.cancel()
        cpu = gateway.cpu_seconds() - cpu_before
        store_after = await self.store_cpu_seconds()

        result = StepResult(system, rate, len(numbers), len(numbers) / rate, ring_seconds)
        result.refused = refused
        fill_invites(result, {n: sent[n] for n in numbers if n in sent}, found)
        result.to_accept_ms = summary_ms(accepted)
        rang = await gateway.ringing_at(numbers)
        result.to_ringing_ms = summary_ms(
            [at - sent[n] for n, at in rang.items() if n in sent and at is not None]
        )
        result.cpu_seconds_per_1000 = round(cpu / len(numbers) * 1000, 3)
        if store_before is not None and store_after is not None:
            store = store_after - store_before
            result.store_cpu_seconds_per_1000 = round(store / len(numbers) * 1000, 3)
        result.peak_rss_mb = round(peak_rss, 1)
        result.peak_in_flight = peak_ringing(found)
        return result

    async def _wait_ended(self, ring_seconds: float) -> None:
        """Until the gateway reports no call in flight (its outcomes are all written)."""
        deadline = time.monotonic() + ring_seconds + 30
        while time.monotonic() < deadline:
            levels = await self._metrics("otp_calls_in_flight", "otp_calls_queued")
            if levels == {"otp_calls_in_flight": 0.0, "otp_calls_queued": 0.0}:
                return
            await asyncio.sleep(0.5)

    async def store_cpu_seconds(self) -> float | None:
        """The CPU the gateway's store has taken so far; None on PostgreSQL."""
        return (await self._metrics("otp_store_cpu_seconds")).get("otp_store_cpu_seconds")

    async def _metrics(self, *names: str) -> dict[str, float]:
        """The first sample of each of the metric families `names` the gateway has now."""
        async with self._http.get(self.server.metrics_url) as response:
            text = await response.text()
        return {
            family.name: family.samples[0].value
            for family in text_string_to_metric_families(text)
            if family.name in names
        }


def peak_ringing(found: dict[str, Any]) -> int:
    """The most calls ringing at the far end at once (INVITE to CANCEL, BYE or end)."""
    edges: list[tuple[float, int]] = []
    for records in found.values():
        for r in records:
            end = r.canceled_at or r.bye_at or r.ended_at
            if end is not None:
                edges += [(r.invited_at, 1), (end, -1)]
    level = peak = 0
    for _, delta in sorted(edges):
        level += delta
        peak = max(peak, level)
    return peak
