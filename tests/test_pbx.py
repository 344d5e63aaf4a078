"""Building AMI actions: nothing unchecked reaches Asterisk."""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.pbx import (
    CHANNEL_ID_PREFIX,
    AmiPbx,
    AmiSettings,
    Dial,
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
