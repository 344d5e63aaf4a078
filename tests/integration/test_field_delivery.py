"""Delivery in the field: far ends that behave like real mobile networks (issue 14).

The gateway dials the field far end (tests/sipp/field.xml) through the dev Asterisk's
`otp-field` endpoint. Each test asserts what the far end received on the wire (when its
CANCEL or BYE came) and what the gateway then says: the outcome, the verification, the
number's health.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config import CallsConfig, EarlyMediaConfig, NumbersConfig
from gateway.pbx import AmiSettings
from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd, InviteRecord
from tests.integration.conftest import (
    Gateway,
    GatewayFactory,
    by_label,
    dialing_through,
    scrape,
)

pytestmark = pytest.mark.integration

FIELD_CHANNEL = "PJSIP/{number}@otp-field"
RING_SECONDS = 4
POST_DIAL_DELAY_S = 6.0  # field digit 0: 100 Trying, then 180 six seconds later
# How far the CANCEL may land from its due time on the far end's clock.
TIMER_TOLERANCE_S = 0.5


def field_sections(dev_pbx: AmiSettings, **calls: Any) -> dict[str, Any]:
    """Config sections for a gateway that dials the field far end."""
    return {
        "asterisk": dialing_through(dev_pbx, FIELD_CHANNEL),
        "calls": CallsConfig(
            **{
                "ring_seconds": RING_SECONDS,
                "max_ring_seconds": 10,
                "max_concurrent": 50,
                "max_per_second": 50,
                **calls,
            }
        ),
    }


@pytest.fixture
async def field_gateway(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, field_end: FarEnd
) -> Gateway:
    """A gateway on the field far end, with the default 15 s post-dial cap."""
    return await start_gateway(**field_sections(dev_pbx))


async def verify(gateway: Gateway, number: str) -> str:
    status, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    assert status == 201, created
    return str(created["id"])


async def ended(gateway: Gateway, verification_id: str, timeout: float = 30) -> dict[str, Any]:
    """The verification once its call has ended."""
    async with asyncio.timeout(timeout):
        while True:
            status, body = await gateway.get(f"/v1/verifications/{verification_id}")
            assert status == 200, body
            if body["call"]["ended_at"] is not None:
                return body
            await asyncio.sleep(0.05)


async def health(gateway: Gateway, number: str) -> dict[str, Any]:
    status, body = await gateway.get(f"/v1/numbers/+{number}")
    assert status == 200, body
    return dict(body["health"])


def after(record: InviteRecord, code: int) -> float:
    """When the far end sent `code` to the INVITE."""
    sent = record.sent_at(code)
    assert sent is not None, f"the far end never sent {code}: {record.responses}"
    return sent


# -- 1. post-dial delay, and nothing alerting ---------------------------------------


async def test_post_dial_delay_does_not_eat_the_ring(
    field_gateway: Gateway, field_end: FarEnd
) -> None:
    number = phone_number(0)  # 100, then 180 six seconds later
    verification_id = await verify(field_gateway, number)
    record = await wire_record(
        field_end, number, lambda r: r.canceled_at is not None, timeout=POST_DIAL_DELAY_S + 10
    )
    ringing = after(record, 180)
    assert ringing - record.invited_at >= POST_DIAL_DELAY_S - 0.2
    assert record.canceled_at is not None
    rang = record.canceled_at - ringing
    assert abs(rang - RING_SECONDS) <= TIMER_TOLERANCE_S, f"rang {rang:.2f}s"

    body = await ended(field_gateway, verification_id)
    call = body["call"]
    assert (call["outcome"], call["reason"], call["status"]) == (
        "delivered",
        "ring_timeout",
        "completed",
    )
    assert body["status"] == "pending"
    assert (await health(field_gateway, number))["status"] == "reachable"


async def test_nothing_alerting_within_the_cap_ends_no_alerting(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, field_end: FarEnd
) -> None:
    gateway = await start_gateway(**field_sections(dev_pbx, max_post_dial_seconds=2))
    number = phone_number(5)  # 100 Trying only
    verification_id = await verify(gateway, number)
    record = await wire_record(field_end, number, lambda r: r.canceled_at is not None, timeout=15)
    assert record.canceled_at is not None
    cap = 2 + RING_SECONDS  # post-dial cap plus the ring time
    assert abs(record.canceled_at - record.invited_at - cap) <= TIMER_TOLERANCE_S

    body = await ended(gateway, verification_id)
    call = body["call"]
    assert (call["outcome"], call["reason"]) == ("no_alerting", "post_dial_timeout")
    assert body["status"] == "failed"  # a fallback can start
    assert (await health(gateway, number))["status"] == "unknown"


# -- 2. early media -----------------------------------------------------------------


async def test_an_announcement_then_480_is_unreachable_never_delivered(
    field_gateway: Gateway, field_end: FarEnd
) -> None:
    number = phone_number(1)  # 183 with SDP, 480 two seconds later
    verification_id = await verify(field_gateway, number)
    record = await wire_record(field_end, number, lambda r: r.final_code is not None)
    assert record.final_code == 480 and record.canceled_at is None

    body = await ended(field_gateway, verification_id)
    call = body["call"]
    assert (call["outcome"], call["hangup_cause"], call["sip_code"]) == ("unreachable", 19, 480)
    assert call["reason"] is None  # the network ended it, not the gateway
    assert body["status"] == "failed"
    assert (await health(field_gateway, number))["status"] == "unreachable"


async def test_a_lone_183_until_the_timer_is_progress_only_and_stays_pending(
    field_gateway: Gateway, field_end: FarEnd
) -> None:
    number = phone_number(4)  # 183 with SDP, no 180, until CANCEL
    verification_id = await verify(field_gateway, number)
    record = await wire_record(field_end, number, lambda r: r.canceled_at is not None, timeout=15)
    assert record.canceled_at is not None
    assert abs(record.canceled_at - after(record, 183) - RING_SECONDS) <= TIMER_TOLERANCE_S

    body = await ended(field_gateway, verification_id)
    call = body["call"]
    assert (call["outcome"], call["reason"], call["status"]) == (
        "progress_only",
        "ring_timeout",
        "completed",
    )
    assert body["status"] == "pending"  # the user may have seen it: the code still works
    assert (await health(field_gateway, number))["status"] == "unknown"
    status, stats = await field_gateway.get("/v1/stats?window=1h")
    assert status == 200, stats
    assert (stats["uncertain"], stats["by_outcome"]["progress_only"]) == (1, 1)
    assert stats["delivered"] == 0


async def test_early_media_is_alerting_counts_a_lone_183_as_delivered(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, field_end: FarEnd
) -> None:
    gateway = await start_gateway(
        **field_sections(dev_pbx),
        numbers=NumbersConfig(early_media_is_alerting=EarlyMediaConfig(regions=("ID",))),
    )
    number = phone_number(4)
    verification_id = await verify(gateway, number)
    body = await ended(gateway, verification_id)
    assert (body["call"]["outcome"], body["status"]) == ("delivered", "pending")
    assert (await health(gateway, number))["status"] == "reachable"


# -- 3. answers -----------------------------------------------------------------------


async def test_an_answer_with_no_180_is_a_network_answer(
    field_gateway: Gateway, field_end: FarEnd
) -> None:
    number = phone_number(2)  # 200 OK at once
    verification_id = await verify(field_gateway, number)
    record = await wire_record(field_end, number, lambda r: r.bye_at is not None)
    assert record.answered_at is not None and after(record, 200) == record.answered_at
    assert record.sent_at(180) is None and record.sent_at(183) is None

    body = await ended(field_gateway, verification_id)
    assert body["call"]["outcome"] == "network_answer"
    assert body["status"] == "failed"
    assert (await health(field_gateway, number))["status"] == "unknown"


async def test_an_answer_after_a_180_is_answered(field_gateway: Gateway, field_end: FarEnd) -> None:
    number = phone_number(8)  # 180, then 200 OK 500 ms later
    verification_id = await verify(field_gateway, number)
    record = await wire_record(field_end, number, lambda r: r.bye_at is not None)
    assert record.bye_at is not None and record.answered_at is not None
    assert record.bye_at - record.answered_at < 1.0  # hung up at once

    body = await ended(field_gateway, verification_id)
    assert (body["call"]["outcome"], body["status"]) == ("answered", "pending")
    assert (await health(field_gateway, number))["status"] == "reachable"


# -- 4. the trunk refuses -------------------------------------------------------------


@pytest.mark.parametrize(("digit", "sip_code"), [(3, 403), (9, 401)])
async def test_a_trunk_refusal_is_trunk_rejected_and_counted(
    field_gateway: Gateway, field_end: FarEnd, digit: int, sip_code: int
) -> None:
    number = phone_number(digit)
    verification_id = await verify(field_gateway, number)
    record = await wire_record(field_end, number)
    assert record.final_code == sip_code

    body = await ended(field_gateway, verification_id)
    call = body["call"]
    assert (call["outcome"], call["sip_code"]) == ("trunk_rejected", sip_code)
    assert body["status"] == "failed"
    number_health = await health(field_gateway, number)
    assert (number_health["status"], number_health["calls"]) == ("unknown", 0)

    samples = await scrape(field_gateway)
    refusals = samples["otp_trunk_rejections_total"]
    assert refusals == {(("sip_code", str(sip_code)), ("trunk", "otp-field")): 1.0}
    assert by_label(samples["otp_calls_total"], "outcome") == {"trunk_rejected": 1.0}
