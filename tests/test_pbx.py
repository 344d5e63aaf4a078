"""Building AMI actions: nothing unchecked reaches Asterisk."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import pbx as pbx_module
from gateway.pbx import (
    CHANNEL_ID_PREFIX,
    AmiPbx,
    AmiSettings,
    CallEvent,
    CallEventKind,
    Dial,
    Speech,
    UnsafeAmiValue,
    check_text,
    new_channel_id,
    originate_action,
)

SETTINGS = AmiSettings("127.0.0.1", 5038, "otp-gateway", "s", channel="PJSIP/{number}@otp-trunk")


def test_originate_action_fields() -> None:
    action = originate_action(SETTINGS, Dial("abc123", "6281234567890", "622150001234", 8))
    assert action == {
        "Action": "Originate",
        "Channel": "PJSIP/6281234567890@otp-trunk",
        "CallerID": "<622150001234>",
        "Timeout": "8000",
        "Variable": "CDR_PROP(disable)=1",
        "Application": "Hangup",
        "Async": "true",
        "ChannelId": "abc123",
    }


@pytest.mark.parametrize(
    "dial",
    [
        Dial("abc", "62812\r\nAction: Hangup", "622150001234", 8),
        Dial("abc", "6281234567890", "6221500\n1234", 8),
        Dial("abc", "62812 3456", "622150001234", 8),
        Dial("abc", "", "622150001234", 8),
        Dial("abc", "6281234567890", "+62-21-500", 8),
        Dial("a\r\nb", "6281234567890", "622150001234", 8),
        Dial("abc", "6281234567890", "622150001234", 0),
        Dial("abc", "6281234567890", "622150001234", 181),
        Dial("abc", "1" * 21, "622150001234", 8),
    ],
)
def test_originate_action_refuses_unsafe_values(dial: Dial) -> None:
    with pytest.raises(UnsafeAmiValue):
        originate_action(SETTINGS, dial)


def test_channel_template_with_line_break_is_refused() -> None:
    settings = AmiSettings("h", 1, "u", "s", channel="PJSIP/{number}@trunk\r\nAction: Logoff")
    with pytest.raises(UnsafeAmiValue):
        originate_action(settings, Dial("abc", "6281234567890", "622150001234", 8))


def test_a_dials_own_channel_replaces_the_nodes() -> None:
    """A pool with a trunk of its own (pools[].channel): its calls leave through it."""
    dial = Dial("abc123", "6281234567890", "622160001234", 8, channel="PJSIP/{number}@trunk-b")
    action = originate_action(SETTINGS, dial)
    assert action["Channel"] == "PJSIP/6281234567890@trunk-b"
    default = originate_action(SETTINGS, dataclasses.replace(dial, channel=None))
    assert default["Channel"] == "PJSIP/6281234567890@otp-trunk"
    assert {k: v for k, v in action.items() if k != "Channel"} == {
        k: v for k, v in default.items() if k != "Channel"
    }


def test_a_dials_own_channel_may_name_the_number_anywhere() -> None:
    dial = Dial("abc", "+6281234567890", "622160001234", 8, channel="PJSIP/b/sip:{number}@host")
    assert originate_action(SETTINGS, dial)["Channel"] == "PJSIP/b/sip:+6281234567890@host"


def test_a_dials_own_channel_with_a_line_break_is_refused() -> None:
    dial = Dial("abc", "6281234567890", "622150001234", 8, channel="PJSIP/{number}@b\r\nX: y")
    with pytest.raises(UnsafeAmiValue):
        originate_action(SETTINGS, dial)


# -- voice calls: the dialplan is told what to say, in values checked one by one --------

SPEECH = Speech(context="otp-voice", code="4821", locale="id", repeat=3, max_seconds=90)
VOICE_DIAL = Dial("otp-v1", "6281234567890", "622150009999", 60, speech=SPEECH)


def test_a_voice_call_runs_its_context_told_the_code_by_channel_variables() -> None:
    assert originate_action(SETTINGS, VOICE_DIAL) == {
        "Action": "Originate",
        "Channel": "PJSIP/6281234567890@otp-trunk",
        "CallerID": "<622150009999>",
        "Timeout": "60000",
        "Context": "otp-voice",
        "Exten": "s",
        "Priority": "1",
        "Variable": "CDR_PROP(disable)=1,CHANNEL(language)=id,OTP_CODE=4821,"
        "OTP_REPEAT=3,OTP_MAX=90",
        "Async": "true",
        "ChannelId": "otp-v1",
    }


def test_a_flash_call_still_hangs_up_when_answered() -> None:
    action = originate_action(SETTINGS, dataclasses.replace(VOICE_DIAL, speech=None))
    assert action["Application"] == "Hangup"
    assert action["Variable"] == "CDR_PROP(disable)=1"
    assert not {"Context", "Exten", "Priority"} & action.keys()


@pytest.mark.parametrize(
    "change",
    [
        {"code": ""},
        {"code": "48a1"},
        {"code": "1" * 17},
        {"code": "48,21"},  # Asterisk splits Variable at commas: a fifth variable
        {"code": "4821,OTP_REPEAT=100"},
        {"code": "4821\r\nAction: Logoff"},
        {"code": "\u0664\u0668\u0662\u0661"},  # Arabic-Indic digits
        {"code": "-4821"},
        {"locale": ""},
        {"locale": "EN"},
        {"locale": "english"},
        {"locale": "en_us"},
        {"locale": "en,OTP_CODE=0000"},
        {"locale": "en\n"},
        {"locale": "../../tmp/x"},
        {"context": ""},
        {"context": "otp voice"},
        {"context": "otp,voice"},
        {"context": "otp.voice"},
        {"context": "x" * 65},
        {"context": "otp-voice\r\nAction: Logoff"},
        {"repeat": 0},
        {"repeat": -1},
        {"repeat": 11},
        {"max_seconds": 0},
        {"max_seconds": -90},
        {"max_seconds": 601},
    ],
)
def test_a_voice_call_with_an_unsafe_value_is_refused(change: dict[str, Any]) -> None:
    speech = dataclasses.replace(SPEECH, **change)
    with pytest.raises(UnsafeAmiValue):
        originate_action(SETTINGS, dataclasses.replace(VOICE_DIAL, speech=speech))


@pytest.mark.parametrize(
    ("change", "told"),
    [
        ({"code": "0"}, "OTP_CODE=0"),
        ({"code": "1" * 16}, f"OTP_CODE={'1' * 16}"),
        ({"locale": "pt_BR"}, "CHANNEL(language)=pt_BR"),
        ({"locale": "fil"}, "CHANNEL(language)=fil"),
        ({"repeat": 1}, "OTP_REPEAT=1"),
        ({"repeat": 10}, "OTP_REPEAT=10"),
        ({"max_seconds": 1}, "OTP_MAX=1"),
        ({"max_seconds": 600}, "OTP_MAX=600"),
    ],
)
def test_a_voice_call_at_the_bounds_is_placed(change: dict[str, Any], told: str) -> None:
    speech = dataclasses.replace(SPEECH, **change)
    action = originate_action(SETTINGS, dataclasses.replace(VOICE_DIAL, speech=speech))
    assert told in action["Variable"].split(",")


def test_a_voice_calls_context_may_have_64_characters() -> None:
    speech = dataclasses.replace(SPEECH, context="x" * 64)
    action = originate_action(SETTINGS, dataclasses.replace(VOICE_DIAL, speech=speech))
    assert action["Context"] == "x" * 64


@given(
    code=st.text(max_size=20),
    locale=st.text(max_size=8),
    context=st.text(max_size=70),
    repeat=st.integers(min_value=-5, max_value=20),
    max_seconds=st.integers(min_value=-5, max_value=1000),
)
@settings(max_examples=300)
def test_no_input_builds_an_unsafe_voice_originate(
    code: str, locale: str, context: str, repeat: int, max_seconds: int
) -> None:
    speech = Speech(context, code, locale, repeat, max_seconds)
    try:
        action = originate_action(SETTINGS, dataclasses.replace(VOICE_DIAL, speech=speech))
    except UnsafeAmiValue:
        return
    for value in action.values():
        assert "\r" not in value and "\n" not in value
    names = [assignment.split("=", 1)[0] for assignment in action["Variable"].split(",")]
    assert names == ["CDR_PROP(disable)", "CHANNEL(language)", "OTP_CODE", "OTP_REPEAT", "OTP_MAX"]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", action["Context"])


@given(
    number=st.text(max_size=40),
    caller_id=st.text(max_size=40),
    channel_id=st.text(max_size=80),
    ring=st.floats(allow_nan=True, allow_infinity=True),
)
@settings(max_examples=500)
def test_no_input_builds_an_unsafe_originate(
    number: str, caller_id: str, channel_id: str, ring: float
) -> None:
    try:
        action = originate_action(SETTINGS, Dial(channel_id, number, caller_id, ring))
    except UnsafeAmiValue:
        return
    for value in action.values():
        assert "\r" not in value and "\n" not in value
    dialed = action["Channel"].removeprefix("PJSIP/").removesuffix("@otp-trunk")
    assert re.fullmatch(r"\+?[0-9]+", dialed)
    assert re.fullmatch(r"<\+?[0-9]+>", action["CallerID"])


@given(st.text(min_size=1, max_size=30, alphabet=st.characters(codec="utf-8")))
def test_every_value_is_checked_for_line_breaks(text: str) -> None:
    """check_text refuses exactly the values that could break an AMI header."""
    try:
        check_text(text, "field")
    except UnsafeAmiValue:
        assert "\r" in text or "\n" in text or not text.isprintable()
    else:
        assert "\r" not in text and "\n" not in text


def test_new_channel_ids_carry_the_prefix_and_are_safe_to_send() -> None:
    ids = {new_channel_id() for _ in range(1000)}
    assert len(ids) == 1000
    for channel_id in ids:
        assert channel_id.startswith(CHANNEL_ID_PREFIX)
        action = originate_action(SETTINGS, Dial(channel_id, "6281234567890", "622150001234", 8))
        assert action["ChannelId"] == channel_id


async def test_down_for_counts_from_start_until_a_login() -> None:
    pbx = AmiPbx(SETTINGS)  # never started: never logged in
    first = pbx.down_for
    await asyncio.sleep(0.01)
    assert not pbx.connected
    assert 0 < first < pbx.down_for


# -- hostile AMI input: every call ends, with nothing unchecked in its event ------------


def _tracked(*channel_ids: str) -> AmiPbx:
    """An AmiPbx (never connected) following `channel_ids`, as if it had placed them."""
    pbx = AmiPbx(SETTINGS)
    for channel_id in channel_ids:
        pbx.adopt(channel_id)
    return pbx


def _ended(pbx: AmiPbx) -> list[CallEvent]:
    events = []
    while not pbx._events.empty():
        events.append(pbx._events.get_nowait())
    assert all(e.kind is CallEventKind.HANGUP for e in events), events
    return events


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        ("17", 17),
        ("0", 0),
        ("127", 127),
        ("128", None),
        ("99999999999999999999999", None),  # int() reads it; SQLite cannot store it
        ("9" * 5000, None),  # past int()'s digit limit
        ("\u0661\u0667", None),  # Arabic-Indic 17: int() reads it as busy
        ("\uff11\uff17", None),  # fullwidth digits
        ("1_7", None),  # int() allows underscores
        ("+17", None),
        ("-1", None),
        (" 17", None),
        ("17 ", None),
        ("", None),
        ("unknown", None),
    ],
)
async def test_a_hangup_cause_is_an_ascii_q850_value_or_none(
    cause: str, expected: int | None
) -> None:
    pbx = _tracked("otp-1")
    pbx._on_message({"Event": "Hangup", "Uniqueid": "otp-1", "Cause": cause})
    [event] = _ended(pbx)
    assert (event.channel_id, event.cause) == ("otp-1", expected)
    assert "otp-1" not in pbx._calls


@pytest.mark.parametrize(
    ("tech_cause", "expected"),
    [
        ("480", 480),
        ("100", 100),
        ("699", 699),
        ("99", None),
        ("700", None),
        ("99999999999999999999", None),
        ("\u0664\u0668\u0660", None),  # Arabic-Indic 480
        ("4_80", None),
        ("+480", None),
        ("", None),
    ],
)
async def test_a_sip_code_is_an_ascii_final_or_provisional_response_or_none(
    tech_cause: str, expected: int | None
) -> None:
    pbx = _tracked("otp-1")
    pbx._on_message(
        {"Event": "Hangup", "Uniqueid": "otp-1", "Cause": "21", "TechCause": tech_cause}
    )
    [event] = _ended(pbx)
    assert (event.cause, event.sip_code) == (21, expected)


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("0", "originate_failed:0"),
        ("5", "originate_failed:5"),
        ("99", "originate_failed:99"),
        ("100", "originate_failed:unknown"),
        ("<img src=x onerror=alert(1)>", "originate_failed:unknown"),
        ("\u0665", "originate_failed:unknown"),
        ("", "originate_failed:unknown"),
        (None, "originate_failed:unknown"),
    ],
)
async def test_an_originate_failure_reason_is_a_small_number_or_unknown(
    reason: str | None, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pbx_module, "ORIGINATE_FAILURE_GRACE_S", 0.0)
    pbx = _tracked("otp-1")
    message = {"Event": "OriginateResponse", "Uniqueid": "otp-1", "Response": "Failure"}
    if reason is not None:
        message["Reason"] = reason
    pbx._on_message(message)
    await asyncio.sleep(0.01)  # the grace for a Hangup that would say more
    [event] = _ended(pbx)
    assert (event.reason, event.cause, event.sip_code) == (expected, None, None)


# Numbers in range and out, digits of any script, and any text.
_HEADER_VALUES = st.one_of(
    st.integers(min_value=-1000, max_value=10**25).map(str),
    st.text(alphabet=st.characters(categories=["Nd"]), min_size=1, max_size=4),
    st.text(max_size=30),
)


@given(cause=_HEADER_VALUES, tech_cause=_HEADER_VALUES)
@settings(max_examples=300)
def test_any_hangup_ends_its_call_once_with_bounded_values(cause: str, tech_cause: str) -> None:
    pbx = _tracked("otp-1", "otp-2")
    hangup = {"Event": "Hangup", "Uniqueid": "otp-1", "Cause": cause, "TechCause": tech_cause}
    pbx._on_message(hangup)
    pbx._on_message(hangup)  # a repeat says nothing new
    [event] = _ended(pbx)
    assert event.channel_id == "otp-1"
    assert event.cause is None or 0 <= event.cause <= 127
    assert event.sip_code is None or 100 <= event.sip_code <= 699
    assert list(pbx._calls) == ["otp-2"]


# -- the voice call's spoken code: a UserEvent of the dialplan, once per call ------------


def _drained(pbx: AmiPbx) -> list[tuple[str, CallEventKind]]:
    events = []
    while not pbx._events.empty():
        event = pbx._events.get_nowait()
        events.append((event.channel_id, event.kind))
    return events


def _spoken(channel_id: str) -> dict[str, str]:
    """The UserEvent extensions.conf's [otp-voice] raises after each saying of the code."""
    return {
        "Event": "UserEvent",
        "Privilege": "user,all",
        "Channel": "PJSIP/otp-trunk-00000001",
        "Uniqueid": channel_id,
        "UserEvent": "OtpSpoken",
    }


async def test_the_code_spoken_is_reported_once_per_call() -> None:
    pbx = _tracked("otp-1", "otp-2")
    pbx._on_message(_spoken("otp-1"))
    assert _drained(pbx) == [("otp-1", CallEventKind.SPOKEN)]
    pbx._on_message(_spoken("otp-1"))  # said again (repeat): nothing new
    assert _drained(pbx) == []
    pbx._on_message(_spoken("otp-2"))
    assert _drained(pbx) == [("otp-2", CallEventKind.SPOKEN)]
    pbx._on_message({"Event": "Hangup", "Uniqueid": "otp-1", "Cause": "16"})
    assert _drained(pbx) == [("otp-1", CallEventKind.HANGUP)]


@pytest.mark.parametrize(
    "message",
    [
        _spoken("otp-1") | {"UserEvent": "OtpHeard"},
        _spoken("otp-1") | {"UserEvent": "OtpSpokenTwice"},
        {"Event": "UserEvent", "Uniqueid": "otp-1"},  # no name
        _spoken("otp-9"),  # a call not followed
        _spoken(""),
        {k: v for k, v in _spoken("otp-1").items() if k != "Uniqueid"},
        {"Event": "UserEvent", "DestUniqueid": "otp-1", "UserEvent": "OtpSpoken"},
        _spoken("otp-1") | {"Event": "VarSet"},  # not a UserEvent at all
    ],
)
async def test_no_other_user_event_says_the_code_was_spoken(message: dict[str, str]) -> None:
    pbx = _tracked("otp-1")
    pbx._on_message(message)
    assert _drained(pbx) == []
    pbx._on_message(_spoken("otp-1"))  # the call still reports its own, once
    assert _drained(pbx) == [("otp-1", CallEventKind.SPOKEN)]


async def test_a_call_ended_is_not_reported_spoken() -> None:
    pbx = _tracked("otp-1")
    pbx._on_message({"Event": "Hangup", "Uniqueid": "otp-1", "Cause": "16"})
    assert _drained(pbx) == [("otp-1", CallEventKind.HANGUP)]
    pbx._on_message(_spoken("otp-1"))  # late: the call is over
    assert _drained(pbx) == []
