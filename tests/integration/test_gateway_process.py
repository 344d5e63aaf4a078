"""`python -m gateway run` as a real process, driven by curl-like HTTP and `gateway call`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.pbx import AmiSettings
from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import REPO, GatewayProcess, free_port

pytestmark = pytest.mark.integration

# A gateway asked to stop finishes in-flight work bounded by the ring time.
STOP_DEADLINE_S = 15
# http.keepalive_seconds of the process, short so the test of idle connections is.
KEEPALIVE_S = 1


class Process(GatewayProcess):
    """The gateway process, with its CLI, started only once ready, stopped by SIGTERM."""

    operator_url = ""  # /metrics and the dashboard

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=self.env,
            timeout=60,
        )

    def start_ready(self) -> None:
        self.start()
        assert self.proc is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready:\n{self.log.read_text()}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_DEADLINE_S)


@pytest.fixture
def process(
    dev_pbx: AmiSettings, far_end: FarEnd, tmp_path: Path, database: str
) -> Iterator[Process]:
    port, operator_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        (REPO / "config.example.yaml")
        .read_text()
        .replace("sqlite:///var/gateway.sqlite3", database)
        .replace("port: 8080", f"port: {port}")
        .replace("operator_port: 8081", f"operator_port: {operator_port}")
        .replace("keepalive_seconds: 15 ", f"keepalive_seconds: {KEEPALIVE_S} ")
        .replace("ring_seconds: 8 ", "ring_seconds: 2 ")
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AMI_SECRET": dev_pbx.secret,
        "OTP_CODE_SECRET": "process-test-code-secret",
    }
    gateway = Process(config, env, f"http://127.0.0.1:{port}", tmp_path / "gateway.log")
    gateway.operator_url = f"http://127.0.0.1:{operator_port}"
    created = gateway.cli("keys", "create", "process-test", "--config", str(config))
    assert created.returncode == 0, created.stderr
    gateway.key = created.stdout.strip().splitlines()[-1]
    gateway.start_ready()
    yield gateway
    if gateway.proc is not None and gateway.proc.poll() is None:
        gateway.proc.kill()
        gateway.proc.wait()


async def test_run_serves_the_api_and_rings(process: Process, far_end: FarEnd) -> None:
    number = phone_number(0)
    request = urllib.request.Request(
        process.url + "/v1/verifications",
        data=json.dumps({"phone": f"+{number}"}).encode(),
        headers={"Authorization": f"Bearer {process.key}", "Content-Type": "application/json"},
        method="POST",
    )
    response = await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
    assert response.status == 201
    created = json.loads(response.read())
    response.close()
    record = await wire_record(far_end, number, lambda r: r.canceled_at is not None)
    assert record.from_user.startswith("6221500")
    assert process.stop() == 0

    # Its stderr is a file, not a terminal: one JSON object per line.
    lines = [json.loads(line) for line in process.log.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    about_call = [line for line in lines if line.get("verification_id") == created["id"]]
    # One line at info carries both ids: its end, with the node it was placed on (the
    # placing itself is logged at debug: a line per call less at 200 calls/s).
    assert len(about_call) == 1, about_call
    (ended,) = about_call
    assert ended["call_id"].startswith("otp-")
    assert ended["message"] == (
        f"call {ended['call_id']} (verification {created['id']}): delivered, "
        "cause 16, sip None, node asterisk"
    )
    text = process.log.read_text()
    assert record.from_user not in text and process.key not in text


async def test_call_command_follows_a_call_to_its_outcome(
    process: Process, far_end: FarEnd
) -> None:
    number = phone_number(3)
    env = {**process.env, "OTP_API_KEY": process.key}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "gateway", "call", f"+{number}", "--url", process.url],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr  # busy: the verification failed
    assert "failed: busy (cause 17, SIP 486)" in result.stdout
    assert "verification is failed" in result.stdout
    await wire_record(far_end, number)


async def test_sigterm_lets_a_ringing_call_finish_then_exits_0(
    process: Process, far_end: FarEnd
) -> None:
    number = phone_number(0)
    request = urllib.request.Request(
        process.url + "/v1/verifications",
        data=json.dumps({"phone": f"+{number}", "ring_seconds": 3}).encode(),
        headers={"Authorization": f"Bearer {process.key}", "Content-Type": "application/json"},
        method="POST",
    )
    with await asyncio.to_thread(urllib.request.urlopen, request, timeout=5) as response:
        verification_id = json.loads(response.read())["id"]
    await wire_record(far_end, number, lambda r: r.sent_at(180) is not None)
    assert process.proc is not None
    started = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    # Draining: new work is refused with 503 while the ringing call finishes.
    refused = urllib.request.Request(
        process.url + "/v1/verifications",
        data=json.dumps({"phone": f"+{phone_number(0)}"}).encode(),
        headers={"Authorization": f"Bearer {process.key}", "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        await asyncio.to_thread(urllib.request.urlopen, refused, timeout=2)
    assert answer.value.code == 503
    assert json.loads(answer.value.read())["code"] == "overloaded"
    answer.value.close()
    code = await asyncio.to_thread(process.proc.wait, STOP_DEADLINE_S)
    assert code == 0
    assert time.monotonic() - started < 3 + STOP_DEADLINE_S
    record = await wire_record(far_end, number, lambda r: r.canceled_at is not None)
    assert record.canceled_at is not None

    # The call's outcome was written before the exit: read it with the next start.
    process.start_ready()
    with await asyncio.to_thread(
        urllib.request.urlopen,
        urllib.request.Request(
            process.url + f"/v1/verifications/{verification_id}",
            headers={"Authorization": f"Bearer {process.key}"},
        ),
        timeout=5,
    ) as response:
        call = json.loads(response.read())["call"]
    assert (call["status"], call["outcome"]) == ("completed", "delivered")
    assert process.stop() == 0


def _get(url: str) -> tuple[int, dict[str, str]]:
    """Status and headers of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


async def test_run_serves_operator_routes_on_their_own_listener_only(process: Process) -> None:
    for path in ("/metrics", "/dashboard", "/dashboard/data"):
        status, _ = await asyncio.to_thread(_get, process.operator_url + path)
        assert status == 200, path
        status, _ = await asyncio.to_thread(_get, process.url + path)
        assert status == 404, path
    _, headers = await asyncio.to_thread(_get, process.url + "/healthz")
    assert headers["Server"] == "otp-gateway"  # no aiohttp, no version


async def test_run_closes_an_idle_connection_after_the_keepalive_timeout(
    process: Process,
) -> None:
    host, port = process.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    try:
        # Nothing is sent: the server hangs up (EOF) once the keep-alive time is over.
        assert await asyncio.wait_for(reader.read(), KEEPALIVE_S + 5) == b""
    finally:
        writer.close()
    assert KEEPALIVE_S - 0.2 <= time.monotonic() - started <= KEEPALIVE_S + 1.5
