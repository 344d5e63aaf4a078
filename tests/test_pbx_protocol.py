"""The AMI reader: the call events it reads itself match what panoramisk would read, and
hostile input on a live connection (a fake AMI server) ends every call and bounds memory."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from panoramisk.actions import Action
from panoramisk.ami_protocol import AMIProtocol

from gateway import pbx as pbx_module
from gateway.pbx import (
    MAX_MESSAGE_CHARS,
    AmiPbx,
    AmiSettings,
    CallEventKind,
    Dial,
    Speech,
    _Protocol,
    originate_action,
)

# The keys AmiPbx._on_message reads.
READ = (
    "Event",
    "Uniqueid",
    "DestUniqueid",
    "ChannelState",
    "DialStatus",
    "Cause",
    "TechCause",
    "Response",
    "Reason",
)


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class _Factory:
    def __init__(self) -> None:
        self.events: list[tuple[str | None, ...]] = []
        self.forgetable_actions: tuple[str, ...] = ()
        self.awaiting_actions: list[Any] = []

    def dispatch(self, message: Any) -> None:
        self.events.append(tuple(message.get(key) for key in READ))

    def connection_lost(self, exc: object) -> None:
        pass


def _stream(originate_id: str, status_id: str) -> bytes:
    """A session as Asterisk 22 writes it: banner, a response, events of ours and not,
    an event that answers a pending action, and the OriginateResponse of a completed one."""
    messages = [
        f"Response: Success\r\nActionID: {originate_id}\r\nMessage: Originate successfully queued",
        "Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted",
        "Event: Newstate\r\nPrivilege: call,all\r\nChannel: PJSIP/otp-trunk-00000001\r\n"
        "ChannelState: 5\r\nChannelStateDesc: Ringing\r\nCallerIDNum: 622150001234\r\n"
        "Uniqueid: 9f1c\r\nLinkedid: 9f1c",
        "Event: DialState\r\nPrivilege: call,all\r\nDestUniqueid: 9f1c\r\nDialStatus: RINGING",
        # A Status answer is a Response then events carrying its ActionID.
        f"Response: Success\r\nActionID: {status_id}\r\nEventList: start\r\n"
        "Message: Channel status will follow",
        f"Event: Hangup\r\nActionID: {status_id}\r\nUniqueid: other\r\nCause: 16",
        f"Event: OriginateResponse\r\nPrivilege: call,all\r\nActionID: {originate_id}\r\n"
        "Response: Failure\r\nChannel: PJSIP/6281234567890@otp-trunk\r\nReason: 0\r\n"
        "Uniqueid: 9f1c",
        "Event: Hangup\r\nPrivilege: call,all\r\nChannel: PJSIP/otp-trunk-00000001\r\n"
        "Uniqueid: 9f1c\r\nCause: 19\r\nCause-txt: No answer\r\nTechCause: 480",
        "Event: Newstate\r\nUniqueid: a: b\r\nChannelState: 6",  # ": " inside a value
    ]
    return ("Asterisk Call Manager/9.0.0\r\n" + "".join(m + "\r\n\r\n" for m in messages)).encode()


async def _read(protocol_class: type[AMIProtocol], cuts: list[int]) -> tuple[Any, ...]:
    """Send an Originate and a Status, then read a session cut at `cuts`: the version,
    the events dispatched and the two replies. panoramisk's protocol sends as the
    gateway did with it (as_list=False); ours through its own `request`."""
    protocol = protocol_class()
    protocol.connection_made(_Transport())
    factory = _Factory()
    protocol.factory = factory
    protocol.encoding = "utf8"
    fields = ({"Action": "Originate"}, {"Action": "Status", "Channel": "other"})
    ids = ["otp-gw/1", "otp-gw/2"]  # both streams the same length: cut at the same places
    if isinstance(protocol, _Protocol):
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in fields]
        numbering, pbx_module._action_ids = pbx_module._action_ids, iter(ids)
        try:
            sent = [protocol.request(f, fut) for f, fut in zip(fields, futures, strict=True)]
            assert sent == ids
        finally:
            pbx_module._action_ids = numbering
    else:
        actions = [
            Action({**f, "ActionID": i}, as_list=False) for f, i in zip(fields, ids, strict=True)
        ]
        futures = [protocol.send(action, as_list=False) for action in actions]
    data = _stream(*ids)
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(edges):
        protocol.data_received(data[start:end])
    replies = [dict(f.result().items()) if f.done() else None for f in futures]
    for reply in replies:
        assert reply is not None and reply.pop("ActionID") in ids
        # panoramisk's body of a "Response: Follows", which no action of the gateway has.
        assert reply.pop("content", "") == ""
    return protocol.version, factory.events, replies


def test_two_gateways_never_share_an_action_id() -> None:
    """An OriginateResponse carries its Originate's ActionID to every AMI session that
    may read it: another gateway on the same Asterisk must not take it for the answer
    to an action of its own."""
    script = "from gateway.pbx import _action_ids; print(next(_action_ids), next(_action_ids))"
    ids = [
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout.split()
        for _ in range(2)
    ]
    assert len({*ids[0], *ids[1]}) == 4


@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_events_and_replies_match_panoramisk_however_the_stream_is_cut(
    cuts: list[int],
) -> None:
    ours = await _read(_Protocol, cuts)
    theirs = await _read(AMIProtocol, cuts)
    assert ours == theirs
    _, events, (originate, status) = ours
    assert originate["Message"] == "Originate successfully queued"
    assert status["EventList"] == "start"
    # The events after an action's answer that carry its ActionID are events like any
    # other (the Status' Hangup, the Originate's OriginateResponse).
    assert [e[0] for e in events] == [
        "FullyBooted",
        "Newstate",
        "DialState",
        "Hangup",
        "OriginateResponse",
        "Hangup",
        "Newstate",
    ]
    assert events[-2][1:] == ("9f1c", None, None, None, "19", "480", None, None)


async def test_the_banner_gives_the_protocol_version() -> None:
    version, events, _ = await _read(_Protocol, [])
    assert version == "9.0.0"
    assert len(events) == 7


# -- hostile input on a live connection: a fake AMI server ------------------------------

# Far above a loopback round trip, far below the keepalive's ping timeout (5 s + 3 s),
# which used to be the only thing that ended a stream without a message terminator.
PROMPT_S = 2.0
_EOM = "\r\n\r\n"


@dataclass
class FakeAmi:
    """An AMI server speaking as much as AmiPbx needs: Asterisk's banner and its answers
    to Login, CoreSettings, Ping and Originate. The test writes the events."""

    logins: int = 0
    originated: list[str] = field(default_factory=list)
    actions: list[dict[str, str]] = field(default_factory=list)  # every one, as received
    writer: asyncio.StreamWriter | None = None
    sessions: list[asyncio.Task[None]] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = asyncio.current_task()
        assert session is not None
        self.sessions.append(session)
        self.writer = writer
        writer.write(b"Asterisk Call Manager/11.0.0\r\n")
        try:
            while True:
                block = (await reader.readuntil(_EOM.encode())).decode()
                action = dict(line.split(": ", 1) for line in block.split("\r\n") if ": " in line)
                writer.write(self._reply(action).encode())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the gateway closed the connection
        finally:
            writer.close()

    def _reply(self, action: dict[str, str]) -> str:
        self.actions.append(action)
        head = f"Response: Success\r\nActionID: {action['ActionID']}\r\n"
        if action["Action"] == "Login":
            self.logins += 1
            return f"{head}Message: Authentication accepted{_EOM}"
        if action["Action"] == "CoreSettings":
            return f"{head}AMIversion: 11.0.0\r\nAsteriskVersion: 22.10.1{_EOM}"
        if action["Action"] == "Originate":
            self.originated.append(action["ChannelId"])
            return f"{head}Message: Originate successfully queued{_EOM}"
        return f"{head}Ping: Pong{_EOM}"

    def send(self, *messages: str) -> None:
        assert self.writer is not None
        self.writer.write("".join(m + _EOM for m in messages).encode())


@pytest.fixture
async def fake_ami() -> AsyncIterator[tuple[AmiPbx, FakeAmi]]:
    """An AmiPbx logged in to a FakeAmi; both closed after the test."""
    fake = FakeAmi()
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pbx = AmiPbx(AmiSettings("127.0.0.1", port, "u", "s", settle_seconds=0))
    await pbx.start()
    await pbx.wait_connected(PROMPT_S)
    assert (await pbx.next_event()).kind is CallEventKind.CONNECTED
    yield pbx, fake
    await pbx.close()
    server.close()
    await server.wait_closed()
    await asyncio.gather(*fake.sessions)


async def test_hostile_call_events_end_every_call_with_nothing_unchecked(
    fake_ami: tuple[AmiPbx, FakeAmi], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pbx_module, "ORIGINATE_FAILURE_GRACE_S", 0.0)
    pbx, fake = fake_ami
    ids = [f"otp-{n}" for n in range(7)]
    for channel_id in ids:
        await pbx.originate(Dial(channel_id, "6281234567890", "622150001234", 60))
    assert fake.originated == ids
    fake.send(
        "Event: Hangup\r\nUniqueid: otp-0\r\nCause: 99999999999999999999999\r\n"
        "TechCause: 99999999999999999999",
        "Event: Hangup\r\nUniqueid: otp-1\r\nCause: \u0661\u0667\r\nTechCause: \u0664\u0668\u0666",
        "Event: Hangup\r\nUniqueid: otp-2\r\nCause: 1_7\r\nTechCause: 700",
        "Event: Hangup\r\nUniqueid: otp-3\r\nCause: 128\r\nTechCause: 99",
        "Event: OriginateResponse\r\nUniqueid: otp-4\r\nResponse: Failure\r\n"
        "Reason: <img src=x onerror=alert(1)>",
        "Event: OriginateResponse\r\nUniqueid: otp-5\r\nResponse: Failure\r\nReason: 5",
        "Event: Hangup\r\nUniqueid: otp-6\r\nCause: 17\r\nTechCause: 486",
    )
    ended: dict[str, tuple[int | None, int | None, str | None]] = {}
    async with asyncio.timeout(PROMPT_S):
        while len(ended) < len(ids):
            event = await pbx.next_event()
            assert event.kind is CallEventKind.HANGUP and event.channel_id not in ended
            ended[event.channel_id] = (event.cause, event.sip_code, event.reason)
    assert ended == {
        "otp-0": (None, None, None),
        "otp-1": (None, None, None),
        "otp-2": (None, None, None),
        "otp-3": (None, None, None),
        "otp-4": (None, None, "originate_failed:unknown"),
        "otp-5": (None, None, "originate_failed:5"),
        "otp-6": (17, 486, None),
    }
    assert not pbx._calls  # none tracked after its end
    assert pbx.connected and fake.logins == 1


async def test_a_message_without_an_end_drops_the_connection_and_it_comes_back(
    fake_ami: tuple[AmiPbx, FakeAmi], caplog: pytest.LogCaptureFixture
) -> None:
    pbx, fake = fake_ami
    first = pbx._protocol
    assert first is not None and fake.writer is not None
    writer = fake.writer
    with caplog.at_level(logging.WARNING, logger="gateway.pbx"):
        writer.write(b"Event: Newstate\r\nUniqueid: otp-1\r\nChannelStateDesc: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(4 * MAX_MESSAGE_CHARS // 1024):
                writer.write(b"x" * 1024)
                await writer.drain()
        async with asyncio.timeout(PROMPT_S):
            while fake.logins < 2 or not pbx.connected:
                await asyncio.sleep(0.01)
    assert sum(len(part) for part in first.queue) <= MAX_MESSAGE_CHARS
    assert pbx._protocol is not first
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("without an end" in m for m in warned), warned
    # The new connection reads events as before.
    await pbx.originate(Dial("otp-2", "6281234567890", "622150001234", 60))
    fake.send("Event: Hangup\r\nUniqueid: otp-2\r\nCause: 16")
    async with asyncio.timeout(PROMPT_S):
        while (event := await pbx.next_event()).kind is not CallEventKind.HANGUP:
            pass
    assert (event.channel_id, event.cause) == ("otp-2", 16)


async def test_a_voice_call_is_placed_as_built_and_reports_its_code_spoken_once(
    fake_ami: tuple[AmiPbx, FakeAmi],
) -> None:
    pbx, fake = fake_ami
    speech = Speech("otp-voice", "4821", "id", 2, 90)
    dial = Dial("otp-v1", "6281234567890", "622150009999", 60, speech=speech)
    await pbx.originate(dial)
    await pbx.originate(Dial("otp-f1", "6281234567891", "622150001234", 60))
    # The Variable header, commas and all, reaches Asterisk as built.
    (sent,) = [a for a in fake.actions if a["Action"] == "Originate" and a["ChannelId"] == "otp-v1"]
    assert {k: v for k, v in sent.items() if k != "ActionID"} == originate_action(
        pbx.settings, dial
    )
    spoken = "Event: UserEvent\r\nPrivilege: user,all\r\nUniqueid: {}\r\nUserEvent: {}"
    fake.send(
        spoken.format("otp-v1", "OtpSpoken"),
        spoken.format("otp-v1", "OtpSpoken"),  # said a second time (repeat 2)
        spoken.format("otp-v1", "OtpHeard"),
        spoken.format("otp-other", "OtpSpoken"),  # another call, not ours
        spoken.format("otp-f1", "SomethingElse"),
        "Event: Hangup\r\nUniqueid: otp-v1\r\nCause: 16",
        "Event: Hangup\r\nUniqueid: otp-f1\r\nCause: 19",
    )
    seen: list[tuple[str, CallEventKind]] = []
    async with asyncio.timeout(PROMPT_S):
        while len([kind for _, kind in seen if kind is CallEventKind.HANGUP]) < 2:
            event = await pbx.next_event()
            seen.append((event.channel_id, event.kind))
    assert seen == [
        ("otp-v1", CallEventKind.SPOKEN),
        ("otp-v1", CallEventKind.HANGUP),
        ("otp-f1", CallEventKind.HANGUP),
    ]
