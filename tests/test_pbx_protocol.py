"""The AMI reader: the call events it reads itself match what panoramisk would read."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from panoramisk.actions import Action
from panoramisk.ami_protocol import AMIProtocol

from gateway.pbx import _Protocol

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
    protocol = protocol_class()
    protocol.connection_made(_Transport())
    factory = _Factory()
    protocol.factory = factory
    protocol.encoding = "utf8"
    originate = Action({"Action": "Originate", "ActionID": "act-1"}, as_list=False)
    status = Action({"Action": "Status", "Channel": "other", "ActionID": "act-2"}, as_list=True)
    for action in (originate, status):
        protocol.send(action, as_list=action.as_list)
    data = _stream(originate.id, status.id)
    edges = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(edges):
        protocol.data_received(data[start:end])
    replies = [
        [dict(r.items()) for r in (a.future.result() if a.future.done() else [])]
        if a.as_list
        else (dict(a.future.result().items()) if a.future.done() else None)
        for a in (originate, status)
    ]
    return protocol.version, factory.events, replies


@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_events_and_replies_match_panoramisk_however_the_stream_is_cut(
    cuts: list[int],
) -> None:
    ours = await _read(_Protocol, cuts)
    theirs = await _read(AMIProtocol, cuts)
    assert ours == theirs
    _, events, (originate, _) = ours
    assert originate["Message"] == "Originate successfully queued"
    assert [e[0] for e in events] == [
        "FullyBooted",
        "Newstate",
        "DialState",
        "OriginateResponse",
        "Hangup",
        "Newstate",
    ]
    assert events[-2][1:] == ("9f1c", None, None, None, "19", "480", None, None)


async def test_the_banner_gives_the_protocol_version() -> None:
    version, events, _ = await _read(_Protocol, [])
    assert version == "9.0.0"
    assert len(events) == 6
