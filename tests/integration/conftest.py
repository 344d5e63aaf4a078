"""A gateway running in-process against the dev PBX, with an API key, per test."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, ClientSession, web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway import apikeys
from gateway.app import create_app, create_operator_app
from gateway.config import (
    AsteriskConfig,
    CallsConfig,
    Config,
    LimitsConfig,
    PoolConfig,
)
from gateway.pbx import AmiSettings
from gateway.store import open_store
from tests.conftest import NewDatabase, make_config
from tests.farend import FarEnd

REPO = Path(__file__).resolve().parents[2]

POOL_PREFIX = "+6221500"


def dev_config(database: str, ami: AmiSettings, **sections: Any) -> Config:
    """The gateway's config for the dev PBX; keyword arguments replace whole sections."""
    # Unchecked: the tests shorten windows below what an operator may set (a TTL of
    # seconds), to see them end.
    return make_config(
        database,
        checked=False,
        **{
            "asterisk": AsteriskConfig(
                secret=ami.secret,
                host=ami.host,
                port=ami.port,
                username=ami.username,
                channel=ami.channel,
                settle_seconds=ami.settle_seconds,
            ),
            "pools": (PoolConfig(name="dev", prefix=POOL_PREFIX, code_length=4),),
            "calls": CallsConfig(
                ring_seconds=2, max_ring_seconds=10, max_concurrent=200, max_per_second=200
            ),
            # The tests poll GET every 50 ms for many calls at once: no per-key request cap.
            "limits": LimitsConfig(key_requests_per_minute=1_000_000),
            **sections,
        },
    )


def dialing_through(ami: AmiSettings, channel: str) -> AsteriskConfig:
    """The dev PBX, dialing through `channel` (the field or the voice far end's
    endpoint), with no settle wait: the PBX is up before the test."""
    return AsteriskConfig(
        secret=ami.secret,
        host=ami.host,
        port=ami.port,
        username=ami.username,
        channel=channel,
        settle_seconds=0,
    )


@dataclasses.dataclass
class Gateway:
    """A running gateway and an HTTP client holding a valid API key; `operator_url` is
    the listener of /metrics and the dashboard."""

    url: str
    key: str
    http: ClientSession
    database: str  # its URL: sqlite:///... or postgresql://...
    server: TestServer
    operator_url: str
    operator: TestServer

    async def request(
        self, method: str, path: str, json: Any = None, key: str | None = None, **kw: Any
    ) -> ClientResponse:
        headers = {"Authorization": f"Bearer {self.key if key is None else key}"}
        headers.update(kw.pop("headers", {}))
        return await self.http.request(method, self.url + path, json=json, headers=headers, **kw)

    async def post(self, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        response = await self.request("POST", path, json=body)
        return response.status, await response.json(content_type=None)

    async def get(self, path: str) -> tuple[int, dict[str, Any]]:
        response = await self.request("GET", path)
        return response.status, await response.json(content_type=None)


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(
    dev_pbx: AmiSettings, far_end: FarEnd, new_database: NewDatabase
) -> AsyncIterator[GatewayFactory]:
    """Start gateways (config sections as keyword arguments), on the test's backend; all
    stop after the test."""
    servers: list[TestServer] = []
    sessions: list[ClientSession] = []

    async def start(
        database: str | None = None, key: str | None = None, **sections: Any
    ) -> Gateway:
        """A gateway on a new database, or on `database` (a restart) with its `key`."""
        database = database or new_database()
        config = dev_config(database, dev_pbx, **sections)
        if key is None:
            store = await open_store(database)
            try:
                # admin: the suite also reads number health and stats.
                _, key = await apikeys.create_key(store, "integration", scope="admin")
            finally:
                await store.close()
        app: web.Application = create_app(config)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        # The operator's listener reads the app's resources: it starts after, stops before.
        operator = TestServer(create_operator_app(app), host="127.0.0.1")
        await operator.start_server()
        servers.extend((operator, server))
        session = ClientSession()
        sessions.append(session)
        gateway = Gateway(
            str(server.make_url("")).rstrip("/"),
            key,
            session,
            database,
            server,
            str(operator.make_url("")).rstrip("/"),
            operator,
        )
        await wait_ready(gateway)
        return gateway

    yield start
    for session in sessions:
        await session.close()
    for server in servers:
        await server.close()


async def stop_gateway(gateway: Gateway) -> None:
    """Stop a gateway started by `start_gateway` before the test ends (a restart)."""
    await gateway.operator.close()
    await gateway.server.close()


async def wait_ready(gateway: Gateway, timeout: float = 10.0) -> None:
    """Wait until /readyz says the gateway is logged in to AMI."""
    import asyncio

    async with asyncio.timeout(timeout):
        while True:
            response = await gateway.request("GET", "/readyz")
            if response.status == 200:
                return
            await asyncio.sleep(0.05)


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> Gateway:
    """A gateway with the default dev config."""
    return await start_gateway()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_for(predicate: Any, timeout: float, what: str) -> float:
    """Seconds until `await predicate()` is true; fails naming `what` after `timeout`."""
    started = time.monotonic()
    while not await predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


class GatewayProcess:
    def __init__(self, config: Path, env: dict[str, str], url: str, log: Path) -> None:
        self.config, self.env, self.url, self.log = config, env, url, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = ""

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(self.config)],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def gateway_process(
    dev_pbx: AmiSettings, tmp_path: Path, database: str
) -> Iterator[GatewayProcess]:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""
http: {{host: 127.0.0.1, port: {port}, operator_port: {free_port()}}}
database: {{url: '{database}'}}
asterisk: {{secret: '{dev_pbx.secret}'}}
security: {{code_secret: fault-test-code-secret}}
pools: [{{name: dev, prefix: '+6221500', code_length: 4}}]
calls: {{ring_seconds: 3, max_concurrent: 200, max_per_second: 25}}
limits: {{key_requests_per_minute: 1000000}}
"""
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    process = GatewayProcess(config, env, f"http://127.0.0.1:{port}", tmp_path / "gw.log")
    # admin: the generated requests reach every route, number health and stats too.
    create_key = ["keys", "create", "faults", "--scope", "admin", "--config", str(config)]
    created = subprocess.run(
        [sys.executable, "-m", "gateway", *create_key],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert created.returncode == 0, created.stderr
    process.key = created.stdout.strip().splitlines()[-1]
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.kill()


async def scrape(gateway: Gateway) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by their sorted labels, parsed by prometheus-client."""
    response = await gateway.http.get(gateway.operator_url + "/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(await response.text()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def by_label(samples: dict[tuple[tuple[str, str], ...], float], label: str) -> dict[str, float]:
    """{label value: sample} for the samples not zero."""
    return {dict(k)[label]: v for k, v in samples.items() if v}
