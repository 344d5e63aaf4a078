"""What the gateway learns at login: Asterisk's version gaps, the trunk, and how long a
login waits for Asterisk's boot signal."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from gateway.pbx import AmiPbx, AmiSettings, trunk_name, version_gaps


@pytest.mark.parametrize(
    ("version", "gaps"),
    [
        ("22.10.1+dfsg+~cs6.17.60671434-1", set()),
        ("22.7.0", set()),
        ("23.0.0", set()),
        ("22.5.0", {"TechCause"}),
        ("22.0.0", {"eventfilter", "TechCause"}),
        ("21.5.0", {"eventfilter", "TechCause"}),
        ("21.6.0", {"TechCause"}),
        ("20.11.0", {"TechCause"}),
        ("20.10.2", {"eventfilter", "TechCause"}),
        ("18.26.0", {"TechCause"}),
        ("18.25.0", {"eventfilter", "TechCause"}),
        ("19.8.0", {"not supported", "eventfilter", "TechCause"}),
        ("16.30.0", {"not supported", "eventfilter", "TechCause"}),
        ("GIT-master-abc123", {"not recognised"}),
    ],
)
def test_version_gaps_name_what_the_gateway_lacks(version: str, gaps: set[str]) -> None:
    found = version_gaps(version)
    assert {word for word in gaps for line in found if word in line} == gaps
    assert len(found) == len(gaps)


@pytest.mark.parametrize(
    ("channel", "trunk"),
    [
        ("PJSIP/{number}@otp-trunk", "otp-trunk"),
        ("PJSIP/otp-trunk/sip:{number}@carrier.example", "otp-trunk"),
        ("PJSIP/{number}@carrier-b", "carrier-b"),
    ],
)
def test_trunk_name_is_the_endpoint(channel: str, trunk: str) -> None:
    assert trunk_name(channel) == trunk


# -- the login's wait for FullyBooted, and the version, on a scripted AMI server --------

FULLY_BOOTED = (
    "Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 812\r\nLastReload: 812\r\n"
    "Status: Fully Booted\r\n\r\n"
)
# A loopback login with nothing to wait for takes milliseconds; this is far above that,
# and far below the 30 s settle_seconds a missed FullyBooted would cost.
PROMPT_S = 1.0
SETTLE_S = 0.3
# asyncio may run a timer up to its clock resolution early.
CLOCK_SLACK_S = 0.01


@dataclass
class ScriptedAmi:
    """An AMI server that answers a login as Asterisk 22 does, for one kind of AMI user.

    `booted_after`: seconds from the Login reply to FullyBooted; None for a user without
    read = system, who never gets it. `version`: CoreSettings' AsteriskVersion; None for
    a user without write = reporting (Permission denied). `drop_after_login`: close the
    connection shortly after the Login reply, before FullyBooted.
    """

    booted_after: float | None = 0.0
    version: str | None = "22.10.1"
    drop_after_login: bool = False
    actions: list[str] = field(default_factory=list)
    connected_at: list[float] = field(default_factory=list)
    sessions: list[asyncio.Task[None]] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected_at.append(time.monotonic())
        session = asyncio.current_task()
        assert session is not None
        self.sessions.append(session)
        writer.write(b"Asterisk Call Manager/11.0.0\r\n")
        try:
            while True:
                block = (await reader.readuntil(b"\r\n\r\n")).decode()
                action = dict(line.split(": ", 1) for line in block.split("\r\n") if ": " in line)
                self.actions.append(action["Action"])
                reply = self._reply(action)
                if action["Action"] == "Login" and self.drop_after_login:
                    writer.write(reply.encode())
                    await asyncio.sleep(0.1)
                    return
                if action["Action"] == "Login" and self.booted_after == 0:
                    reply += FULLY_BOOTED  # in the same segment as the reply
                writer.write(reply.encode())
                if action["Action"] == "Login" and self.booted_after:
                    await asyncio.sleep(self.booted_after)
                    writer.write(FULLY_BOOTED.encode())
        except asyncio.IncompleteReadError:
            pass  # the gateway closed the connection
        finally:
            writer.close()

    def _reply(self, action: dict[str, str]) -> str:
        head = f"ActionID: {action['ActionID']}\r\n"
        if action["Action"] == "Login":
            return f"Response: Success\r\n{head}Message: Authentication accepted\r\n\r\n"
        if action["Action"] == "CoreSettings" and self.version is not None:
            return (
                f"Response: Success\r\n{head}AMIversion: 11.0.0\r\n"
                f"AsteriskVersion: {self.version}\r\nSystemName: \r\nCoreMaxCalls: 0\r\n\r\n"
            )
        if action["Action"] == "Ping":
            return f"Response: Success\r\n{head}Ping: Pong\r\nTimestamp: 0.000000\r\n\r\n"
        return f"Response: Error\r\n{head}Message: Permission denied\r\n\r\n"


ScriptedPbx = Callable[[ScriptedAmi, float], Awaitable[AmiPbx]]


@pytest.fixture
async def scripted_pbx() -> AsyncIterator[ScriptedPbx]:
    """AmiPbxes (not started) each logging in to its own ScriptedAmi; all closed after."""
    servers: list[asyncio.Server] = []
    scripts: list[ScriptedAmi] = []
    pbxs: list[AmiPbx] = []

    async def make(script: ScriptedAmi, settle_seconds: float) -> AmiPbx:
        server = await asyncio.start_server(script.serve, "127.0.0.1", 0)
        servers.append(server)
        scripts.append(script)
        port = server.sockets[0].getsockname()[1]
        pbx = AmiPbx(AmiSettings("127.0.0.1", port, "u", "s", settle_seconds=settle_seconds))
        pbxs.append(pbx)
        return pbx

    yield make
    for pbx in pbxs:
        await pbx.close()
    for server in servers:
        server.close()
        await server.wait_closed()
    # Each session ends within its script's last sleep once the gateway has gone; one
    # cancelled at the loop's close would be logged by asyncio as an error.
    await asyncio.gather(*(task for script in scripts for task in script.sessions))


async def login_seconds(pbx: AmiPbx, timeout: float = 5.0) -> float:
    """Start `pbx` and return how long it took to be logged in."""
    started = time.monotonic()
    await pbx.start()
    await pbx.wait_connected(timeout)
    return time.monotonic() - started


async def test_fully_booted_at_login_ends_the_wait_at_once(scripted_pbx: ScriptedPbx) -> None:
    script = ScriptedAmi(booted_after=0)
    pbx = await scripted_pbx(script, 30)
    took = await login_seconds(pbx)
    assert took < PROMPT_S, f"logged in after {took:.2f}s"
    assert script.actions == ["Login", "CoreSettings"]


async def test_a_fully_booted_after_login_ends_the_wait_when_it_comes(
    scripted_pbx: ScriptedPbx,
) -> None:
    """A PBX still booting at login sends FullyBooted when boot ends: calls wait for that."""
    pbx = await scripted_pbx(ScriptedAmi(booted_after=SETTLE_S), 30)
    took = await login_seconds(pbx)
    assert SETTLE_S - CLOCK_SLACK_S <= took < SETTLE_S + PROMPT_S, f"logged in after {took:.2f}s"


async def test_without_fully_booted_the_login_goes_on_after_settle_seconds(
    scripted_pbx: ScriptedPbx, caplog: pytest.LogCaptureFixture
) -> None:
    pbx = await scripted_pbx(ScriptedAmi(booted_after=None), SETTLE_S)
    with caplog.at_level(logging.INFO, logger="gateway.pbx"):
        took = await login_seconds(pbx)
    assert SETTLE_S - CLOCK_SLACK_S <= took < SETTLE_S + PROMPT_S, f"logged in after {took:.2f}s"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no FullyBooted" in m and "read = call,system" in m for m in warned), warned


async def test_the_version_is_read_from_core_settings_and_its_gaps_logged(
    scripted_pbx: ScriptedPbx, caplog: pytest.LogCaptureFixture
) -> None:
    pbx = await scripted_pbx(ScriptedAmi(version="22.5.0"), SETTLE_S)
    with caplog.at_level(logging.INFO, logger="gateway.pbx"):
        await login_seconds(pbx)
    assert pbx.version == "22.5.0"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert warned[0].startswith("Asterisk 22.5.0: ") and "TechCause" in warned[0]


async def test_a_refused_core_settings_does_not_stop_the_login(
    scripted_pbx: ScriptedPbx, caplog: pytest.LogCaptureFixture
) -> None:
    """A user without write = reporting: the version stays unknown, calls go on."""
    script = ScriptedAmi(version=None)
    pbx = await scripted_pbx(script, SETTLE_S)
    with caplog.at_level(logging.INFO, logger="gateway.pbx"):
        took = await login_seconds(pbx)
    assert took < PROMPT_S, f"logged in after {took:.2f}s"
    assert pbx.connected
    assert pbx.version is None
    assert script.actions == ["Login", "CoreSettings"]
    assert any("cannot read Asterisk's version" in r.getMessage() for r in caplog.records)


async def test_a_connection_lost_during_the_wait_is_retried_promptly(
    scripted_pbx: ScriptedPbx,
) -> None:
    """The loss ends the wait for FullyBooted; no CoreSettings waits on a dead socket."""
    script = ScriptedAmi(booted_after=None, drop_after_login=True)
    pbx = await scripted_pbx(script, SETTLE_S)
    await pbx.start()
    waited = SETTLE_S + 2 * PROMPT_S
    deadline = time.monotonic() + waited
    while len(script.connected_at) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(script.connected_at) >= 2, f"no second connection within {waited}s"
    # Backoff is at most 0.25 s on a first retry; the 0.3 s settle may or may not be waited.
    gap = script.connected_at[1] - script.connected_at[0]
    assert gap < SETTLE_S + PROMPT_S, f"reconnected after {gap:.2f}s"
