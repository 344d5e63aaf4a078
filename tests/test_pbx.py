"""Building AMI actions: nothing unchecked reaches Asterisk."""

from __future__ import annotations

import pytest

from gateway.pbx import AmiSettings, Dial, UnsafeAmiValue, originate_action

SETTINGS = AmiSettings("127.0.0.1", 5038, "otp-gateway", "s", channel="PJSIP/{number}@otp-trunk")


def test_originate_action_fields() -> None:
    action = originate_action(SETTINGS, Dial("abc123", "6281234567890", "622150001234", 8))
    assert action == {
        "Action": "Originate",
        "Channel": "PJSIP/6281234567890@otp-trunk",
        "CallerID": "<622150001234>",
        "Timeout": "8000",
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
        Dial("abc", "6281234567890", "622150001234", 121),
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
