"""The voice call that speaks the code, when a flash call cannot land (issue 18).

The gateway dials the voice far end (tests/sipp/voice.xml) through the dev Asterisk's
`otp-voice` endpoint. Its voice calls (From VOICE_CLI) are answered with an SDP that
sends Asterisk's RTP to VOICE_RTP_PORT, where a test listens (tests/rtp.py): the code is
recognised in the audio by comparing it with the prompt files the PBX plays, and checked
through the API. Flash calls to the same numbers ring (last digit 0), are refused busy
(3) or get 100 Trying only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.config import CallsConfig, PoolConfig, VoiceConfig
from gateway.pbx import AmiSettings
from tests.conftest import REPO, VOICE_CLI, VOICE_RTP_PORT, phone_number, wire_record
from tests.farend import FarEnd, InviteRecord
from tests.integration.conftest import Gateway, GatewayFactory, dialing_through
from tests.rtp import RtpListener, prompts_for, recognise, samples, spoken_codes

pytestmark = pytest.mark.integration

VOICE_CHANNEL = "PJSIP/{number}@otp-voice"
SOUNDS = REPO / ".cache" / "asterisk-root" / "usr" / "share" / "asterisk" / "sounds"
CODE_LENGTH = 4
REPEAT = 2
# How long a voice call takes to say the code REPEAT times, with room to spare.
SAID_WITHIN_S = 25.0


def voice_sections(dev_pbx: AmiSettings, **voice: Any) -> dict[str, Any]:
    """Config sections for a gateway on the voice far end."""
    return {
        "asterisk": dialing_through(dev_pbx, VOICE_CHANNEL),
        "pools": (PoolConfig(name="dev", prefix="+6221500", code_length=CODE_LENGTH),),
        "calls": CallsConfig(
            ring_seconds=2, max_ring_seconds=10, max_concurrent=50, max_per_second=50
        ),
        "voice": VoiceConfig(
            **{
                "caller_id": VOICE_CLI,
                "repeat": REPEAT,
                "ring_seconds": 5,
                "fallback_after_seconds": None,
                "next_min_gap_seconds": 0,
                **voice,
            }
        ),
    }


@pytest.fixture
async def voice_gateway(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, voice_end: FarEnd
) -> Gateway:
    return await start_gateway(**voice_sections(dev_pbx))


@pytest.fixture
async def rtp() -> Any:
    async with RtpListener(port=VOICE_RTP_PORT) as listener:
        yield listener


def landline(behaviour: int) -> str:
    """A fresh Jakarta fixed-line number (no +) ending in `behaviour`."""
    while True:
        number = phone_number(behaviour)
        digits = "6221" + number[-8:]
        if digits != number:
            return digits


async def create(gateway: Gateway, phone: str, **body: Any) -> tuple[int, dict[str, Any]]:
    return await gateway.post("/v1/verifications", {"phone": "+" + phone, **body})


async def ended(gateway: Gateway, vid: str, steps: int = 1, timeout: float = 30.0) -> Any:
    """The verification once its `steps`-th call has ended."""
    deadline = time.monotonic() + timeout
    while True:
        _, body = await gateway.get(f"/v1/verifications/{vid}")
        if len(body["steps"]) >= steps and body["call"]["ended_at"] is not None:
            return body
        assert time.monotonic() < deadline, f"call not ended within {timeout}s: {body}"
        await asyncio.sleep(0.1)


def voice_invites(voice_end: FarEnd, number: str) -> list[InviteRecord]:
    return [r for r in voice_end.calls_to(number) if r.from_user == VOICE_CLI.lstrip("+")]


async def voice_invite(voice_end: FarEnd, number: str, timeout: float) -> InviteRecord:
    """The voice call's INVITE to `number`, once it came."""
    deadline = time.monotonic() + timeout
    while not voice_invites(voice_end, number):
        assert time.monotonic() < deadline, f"no voice INVITE to {number} within {timeout}s"
        await asyncio.sleep(0.02)
    [invite] = voice_invites(voice_end, number)
    return invite


def heard_codes(rtp: RtpListener, locale: str) -> list[str]:
    """The codes said in the audio received, recognised against the PBX's prompts."""
    pcm = samples(rtp.packets)
    return spoken_codes(recognise(pcm, pcm.starts, prompts_for(SOUNDS, locale)))


@pytest.mark.parametrize("locale", ["en", "id"])
async def test_a_voice_call_speaks_the_code_that_then_approves(
    voice_gateway: Gateway, voice_end: FarEnd, rtp: RtpListener, locale: str
) -> None:
    number = phone_number(2)
    status, created = await create(voice_gateway, number, channels=["voice"], locale=locale)
    assert status == 201, created
    assert created["channels"] == ["voice"] and created["locale"] == locale
    assert created["call"]["channel"] == "voice"

    body = await ended(voice_gateway, created["id"], timeout=SAID_WITHIN_S)
    assert body["call"]["outcome"] == "spoken", body["call"]
    # What the wire saw: one INVITE from the voice caller ID, answered, then Asterisk's BYE.
    record = await wire_record(voice_end, number, lambda r: r.bye_at is not None)
    assert record.from_user == VOICE_CLI.lstrip("+")
    assert record.answered_at is not None and record.bye_at is not None
    await rtp.wait_quiet(1.0, timeout=5)
    codes = heard_codes(rtp, locale)
    assert len(codes) == REPEAT and len(set(codes)) == 1, codes
    assert len(codes[0]) == CODE_LENGTH
    status, checked = await voice_gateway.post(
        f"/v1/verifications/{created['id']}/check", {"code": codes[0]}
    )
    assert (status, checked["status"], checked["valid"]) == (200, "approved", True)


async def test_a_refused_flash_call_is_followed_by_a_voice_call_saying_its_code(
    voice_gateway: Gateway, voice_end: FarEnd, rtp: RtpListener
) -> None:
    number = phone_number(3)  # the flash call's INVITE gets 486 Busy Here
    status, created = await create(voice_gateway, number, channels=["flashcall", "voice"])
    assert status == 201, created
    assert created["next_channel"] == "voice"

    body = await ended(voice_gateway, created["id"], steps=2, timeout=SAID_WITHIN_S)
    records = voice_end.calls_to(number)
    assert len(records) == 2, records
    flash, voice = records
    assert flash.final_code == 486 and flash.from_user != VOICE_CLI.lstrip("+")
    assert voice.from_user == VOICE_CLI.lstrip("+")
    assert voice.invited_at - flash.sent_at(486) < 2.0, (flash, voice)  # type: ignore[operator]
    assert [s["channel"] for s in body["steps"]] == ["flashcall", "voice"]
    assert [s["call"]["outcome"] for s in body["steps"]] == ["busy", "spoken"]
    assert body["status"] == "pending" and body["next_channel"] is None
    await rtp.wait_quiet(1.0, timeout=5)
    codes = heard_codes(rtp, "en")
    # One code for the verification's whole life: the caller ID's trailing digits.
    assert codes and set(codes) == {flash.from_user[-CODE_LENGTH:]}, (codes, flash.from_user)


async def test_a_delivered_flash_call_not_checked_in_time_is_followed_by_a_voice_call(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, voice_end: FarEnd
) -> None:
    gateway = await start_gateway(**voice_sections(dev_pbx, fallback_after_seconds=2))
    unchecked, checked = phone_number(0), phone_number(0)  # both flash calls ring
    ids = {}
    for number in (unchecked, checked):
        status, created = await create(gateway, number, channels=["flashcall", "voice"])
        assert status == 201, created
        ids[number] = created["id"]
    flash = await wire_record(voice_end, checked, lambda r: r.canceled_at is not None)
    delivered = await ended(gateway, ids[checked])
    assert delivered["call"]["outcome"] == "delivered"
    status, result = await gateway.post(
        f"/v1/verifications/{ids[checked]}/check", {"code": flash.from_user[-CODE_LENGTH:]}
    )
    assert (status, result["status"]) == (200, "approved")

    first = await wire_record(voice_end, unchecked, lambda r: r.canceled_at is not None)
    body = await ended(gateway, ids[unchecked], steps=2, timeout=SAID_WITHIN_S)
    voice = voice_invites(voice_end, unchecked)
    assert len(voice) == 1
    # Two seconds after the flash call ended, not before.
    assert 1.5 < voice[0].invited_at - first.canceled_at < 4.0  # type: ignore[operator]
    assert [s["call"]["outcome"] for s in body["steps"]] == ["delivered", "spoken"]
    await asyncio.sleep(3)
    assert voice_invites(voice_end, checked) == []


async def test_next_starts_the_voice_call_at_once_and_a_second_next_is_refused(
    voice_gateway: Gateway, voice_end: FarEnd
) -> None:
    number = phone_number(0)
    status, created = await create(
        voice_gateway, number, channels=["flashcall", "voice"], fallback_after_seconds=None
    )
    assert status == 201 and created["fallback_after_seconds"] is None
    vid = created["id"]
    delivered = await ended(voice_gateway, vid)
    assert delivered["call"]["outcome"] == "delivered" and delivered["next_at"] is None
    asked = time.time()
    response = await voice_gateway.request("POST", f"/v1/verifications/{vid}/next")
    body = await response.json()
    assert response.status == 200, body
    assert [s["channel"] for s in body["steps"]] == ["flashcall", "voice"]
    voice = await voice_invite(voice_end, number, timeout=2.0)
    assert voice.invited_at - asked < 2.0
    again = await voice_gateway.request("POST", f"/v1/verifications/{vid}/next")
    problem = await again.json(content_type=None)
    assert (again.status, problem["code"]) == (409, "no_next_channel")


async def test_a_landline_gets_only_the_voice_call_and_is_refused_a_flash_call(
    voice_gateway: Gateway, voice_end: FarEnd
) -> None:
    number = landline(2)
    status, problem = await create(voice_gateway, number)
    assert (status, problem["code"]) == (422, "phone_type_not_allowed")
    status, created = await create(voice_gateway, number, channels=["flashcall", "voice"])
    assert status == 201, created
    assert created["channels"] == ["voice"] and created["call"]["channel"] == "voice"
    body = await ended(voice_gateway, created["id"], timeout=SAID_WITHIN_S)
    assert body["call"]["outcome"] == "spoken"
    records = voice_end.calls_to(number)
    assert len(records) == 1 and records[0].from_user == VOICE_CLI.lstrip("+")


async def test_a_far_end_that_never_hangs_up_is_hung_up_at_max_seconds(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, voice_end: FarEnd
) -> None:
    # Said five times, the code would take some 20 s: the cap ends the call first.
    gateway = await start_gateway(**voice_sections(dev_pbx, max_seconds=6, repeat=5))
    number = phone_number(2)
    status, created = await create(gateway, number, channels=["voice"])
    assert status == 201, created
    record = await wire_record(voice_end, number, lambda r: r.bye_at is not None, timeout=20)
    assert record.answered_at is not None and record.bye_at is not None
    assert 5.5 < record.bye_at - record.answered_at < 7.5, record
    body = await ended(gateway, created["id"])
    assert (body["call"]["outcome"], body["call"]["reason"]) == ("spoken", "max_seconds")


@pytest.mark.parametrize(
    ("behaviour", "outcome"),
    [(1, "answered_early"), (5, "busy"), (9, "no_answer")],
)
async def test_a_voice_call_that_does_not_say_the_code_says_why(
    voice_gateway: Gateway, voice_end: FarEnd, behaviour: int, outcome: str
) -> None:
    number = phone_number(behaviour)
    status, created = await create(voice_gateway, number, channels=["voice"])
    assert status == 201, created
    body = await ended(voice_gateway, created["id"], timeout=20)
    assert body["call"]["outcome"] == outcome, body["call"]
    assert body["status"] == "failed"  # its one channel tried


async def test_voice_limits_and_unknown_channels_or_locales_place_no_call(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, voice_end: FarEnd
) -> None:
    gateway = await start_gateway(**voice_sections(dev_pbx, per_phone_per_hour=1))
    number = phone_number(9)  # a voice call rings there; the test cancels it
    status, first = await create(gateway, number, channels=["voice"])
    assert status == 201, first
    await wire_record(voice_end, number, lambda r: r.sent_at(180) is not None)
    status, problem = await create(gateway, number, channels=["voice"])
    assert (status, problem["code"]) == (429, "rate_limited")
    other = phone_number(2)
    status, problem = await create(gateway, other, channels=["voice"], locale="fr")
    assert (status, problem["code"]) == (422, "unknown_locale")
    status, problem = await create(gateway, other, channels=["sms"])
    assert (status, problem["code"]) == (422, "unknown_channel")
    await gateway.post(f"/v1/verifications/{first['id']}/cancel", {})
    await asyncio.sleep(1.0)
    assert len(voice_end.calls_to(number)) == 1
    assert voice_end.calls_to(other) == []
