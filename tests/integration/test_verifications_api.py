"""Issue 3 end to end: HTTP in, a real call through the dev Asterisk, checked at the far end."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.config import CallsConfig, VerificationConfig
from tests.conftest import phone_number, stored_bytes, wire_record
from tests.fakes import until
from tests.farend import FarEnd, InviteRecord
from tests.integration.conftest import POOL_PREFIX, Gateway, GatewayFactory, scrape

pytestmark = pytest.mark.integration

RING_SECONDS = 2
WIRE_TOLERANCE_S = 1.0


async def call_ended(gateway: Gateway, verification_id: str, timeout: float = 15) -> dict[str, Any]:
    """The verification once its call has an outcome."""
    async with asyncio.timeout(timeout):
        while True:
            status, body = await gateway.get(f"/v1/verifications/{verification_id}")
            assert status == 200, body
            if body["call"]["status"] in ("completed", "failed"):
                return body
            await asyncio.sleep(0.05)


def code_of(record: InviteRecord) -> str:
    """The OTP the far end saw: the trailing digits of the caller ID."""
    prefix = POOL_PREFIX.lstrip("+")
    assert record.from_user.startswith(prefix) and len(record.from_user) == len(prefix) + 4
    return record.from_user[len(prefix) :]


async def test_ringing_call_delivers_code_in_caller_id(gateway: Gateway, far_end: FarEnd) -> None:
    number = phone_number(0)
    status, created = await gateway.post(
        "/v1/verifications", {"phone": f"+{number}", "reference": "order-123"}
    )
    assert status == 201, created
    assert created["status"] == "pending"
    assert created["phone"] == f"+{number}"
    assert created["reference"] == "order-123"
    assert created["cli"]["prefix"] == POOL_PREFIX
    assert created["cli"]["length"] == 4
    assert created["call"]["status"] in ("queued", "dialing")
    assert "code" not in created

    record = await wire_record(far_end, number, lambda r: r.canceled_at is not None)
    assert record.from_user.startswith(POOL_PREFIX.lstrip("+"))
    assert len(record.from_user) == len(POOL_PREFIX) - 1 + 4
    assert record.canceled_at is not None
    assert (
        RING_SECONDS - 0.1
        <= record.canceled_at - record.invited_at
        <= RING_SECONDS + WIRE_TOLERANCE_S
    )

    ended = await call_ended(gateway, created["id"])
    assert ended["call"]["status"] == "completed"
    assert ended["call"]["outcome"] == "delivered"
    assert ended["call"]["ringing_at"] is not None
    # The gateway hung up itself, RING_SECONDS after the 180: normal clearing, its reason
    # saying so (a far end's own 480 would be cause 19 with no reason).
    call = ended["call"]
    assert (call["hangup_cause"], call["sip_code"], call["reason"]) == (16, None, "ring_timeout")
    assert ended["status"] == "pending"
    assert record.from_user not in str(created) + str(ended)
    # Nor is it in the database (SQLite: file and WAL), where a copy would reveal the code.
    assert record.from_user.encode() not in await stored_bytes(gateway.database)

    status, checked = await gateway.post(
        f"/v1/verifications/{created['id']}/check", {"code": code_of(record)}
    )
    assert (status, checked["valid"], checked["status"]) == (200, True, "approved")


async def test_full_caller_id_approves(gateway: Gateway, far_end: FarEnd) -> None:
    number = phone_number(0)
    _, created = await gateway.post("/v1/verifications", {"phone": "0" + number[2:]})
    assert created["phone"] == f"+{number}", created
    record = await wire_record(far_end, number, lambda r: r.final_code is not None)
    status, checked = await gateway.post(
        f"/v1/verifications/{created['id']}/check", {"cli": f"+{record.from_user}"}
    )
    assert (status, checked["valid"], checked["status"]) == (200, True, "approved")


async def test_wrong_codes_spend_attempts_until_locked(gateway: Gateway, far_end: FarEnd) -> None:
    number = phone_number(0)
    _, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    right = code_of(await wire_record(far_end, number, lambda r: True))
    wrong = f"{(int(right) + 1) % 10000:04d}"
    path = f"/v1/verifications/{created['id']}/check"
    for remaining in (4, 3, 2, 1):
        status, checked = await gateway.post(path, {"code": wrong})
        assert (status, checked["valid"], checked["attempts_remaining"]) == (200, False, remaining)
        assert checked["status"] == "pending"
    status, checked = await gateway.post(path, {"code": wrong})
    assert (status, checked["status"], checked["attempts_remaining"]) == (
        200,
        "max_attempts_reached",
        0,
    )
    status, refused = await gateway.post(path, {"code": right})
    assert status == 409
    assert refused["code"] == "verification_not_pending"
    assert refused["verification_status"] == "max_attempts_reached"


async def test_a_call_superseded_before_it_alerted_ends_canceled(
    gateway: Gateway, far_end: FarEnd
) -> None:
    number = phone_number(9)  # 100 Trying only: it never alerts
    canceled_before = (await scrape(gateway))["otp_calls_total"][(("outcome", "canceled"),)]
    _, first = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    invited = await wire_record(far_end, number, lambda r: True)
    _, second = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    ended = await call_ended(gateway, first["id"])
    assert ended["status"] == "canceled"
    # The gateway hung it up: neither "rejected" nor a verdict on the number.
    assert (ended["call"]["outcome"], ended["call"]["reason"]) == ("error", "canceled")
    await wire_record(
        far_end,
        number,
        lambda r: r.invited_at != invited.invited_at or r.canceled_at is not None,
        count=2,
    )
    first_call = min(far_end.calls_to(number), key=lambda r: r.invited_at)
    assert first_call.canceled_at is not None  # the far end got our CANCEL
    canceled = (await scrape(gateway))["otp_calls_total"][(("outcome", "canceled"),)]
    assert canceled == canceled_before + 1  # counted apart from failed calls
    _, newest = await gateway.get(f"/v1/verifications/{second['id']}")
    assert newest["status"] == "pending"


async def test_a_call_superseded_as_soon_as_it_is_stored_never_rings_its_course(
    start_gateway: GatewayFactory, far_end: FarEnd
) -> None:
    """Two creates at once for a phone: the one stored first is superseded while its
    create may still be on its way to hand the call to the dialer (hanging up the
    phone's earlier call). Its call is kept from the PBX or hung up at once, never left
    to ring its course."""
    ring_seconds = 6
    gateway = await start_gateway(
        calls=CallsConfig(
            ring_seconds=ring_seconds, max_ring_seconds=10, max_concurrent=200, max_per_second=200
        )
    )
    numbers = [phone_number(0) for _ in range(8)]

    async def superseded(number: str) -> None:
        # One after the other, and two at once (which is superseded: whichever is
        # stored first).
        await gateway.post("/v1/verifications", {"phone": f"+{number}"})
        created = await asyncio.gather(
            *(gateway.post("/v1/verifications", {"phone": f"+{number}"}) for _ in range(2))
        )
        await asyncio.gather(*(call_ended(gateway, body["id"]) for _, body in created))

    await asyncio.gather(*(superseded(number) for number in numbers))

    async def settled() -> bool:
        calls = [r for number in numbers for r in far_end.calls_to(number)]
        return all(r.canceled_at for r in calls)

    await until(settled, timeout=ring_seconds + 5)
    for number in numbers:
        calls = far_end.calls_to(number)
        # The newest rang its ring time; a superseded one that reached the far end was
        # canceled at once (not after ring_seconds, nor at the cap).
        rang = sorted(r.canceled_at - r.invited_at for r in calls if r.canceled_at)
        assert 1 <= len(calls) <= 3 and len(rang) == len(calls), calls
        assert rang[-1] >= ring_seconds - 1, calls
        assert all(held < 2.0 for held in rang[:-1]), (number, rang)


async def test_check_by_phone_uses_newest_pending(gateway: Gateway, far_end: FarEnd) -> None:
    number = phone_number(0)
    _, first = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    _, second = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    status, old = await gateway.get(f"/v1/verifications/{first['id']}")
    assert old["status"] == "canceled"

    # The second call rings for RING_SECONDS and is hung up; the first was hung up when
    # superseded, so the far end got its CANCEL at once, or (hung up before Asterisk sent
    # its INVITE) never saw it. Which INVITE came first says nothing: Asterisk may send the
    # superseded call's INVITE after the new one; nor does which one is still live while
    # the far end's log catches up. Once both are settled, the second is the one canceled
    # last.
    await call_ended(gateway, second["id"])

    async def settled() -> list[InviteRecord] | None:
        calls = far_end.calls_to(number)
        return calls if 1 <= len(calls) <= 2 and all(r.canceled_at for r in calls) else None

    calls = await until(settled)
    assert calls is not None, far_end.calls_to(number)
    newest = max(calls, key=lambda r: r.canceled_at or 0.0)
    status, checked = await gateway.post(
        "/v1/verifications/check", {"phone": f"+{number}", "code": code_of(newest)}
    )
    assert (status, checked["id"], checked["valid"]) == (200, second["id"], True)


async def test_expires_after_ttl(start_gateway: GatewayFactory, far_end: FarEnd) -> None:
    gateway = await start_gateway(verification=VerificationConfig(ttl_seconds=2, max_attempts=5))
    number = phone_number(0)
    _, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    code = code_of(await wire_record(far_end, number, lambda r: True))
    await asyncio.sleep(2.3)
    _, current = await gateway.get(f"/v1/verifications/{created['id']}")
    assert current["status"] == "expired"
    status, refused = await gateway.post(f"/v1/verifications/{created['id']}/check", {"code": code})
    assert (status, refused["verification_status"]) == (409, "expired")


async def test_answered_call_is_hung_up_at_once(gateway: Gateway, far_end: FarEnd) -> None:
    number = phone_number(2)
    _, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    record = await wire_record(far_end, number, lambda r: r.bye_at is not None)
    assert record.answered_at is not None and record.bye_at is not None
    assert record.bye_at - record.answered_at <= WIRE_TOLERANCE_S
    ended = await call_ended(gateway, created["id"])
    assert (ended["call"]["outcome"], ended["call"]["status"]) == ("answered", "completed")
    assert ended["status"] == "pending"


@pytest.mark.parametrize(
    ("behaviour", "outcome", "call_status", "verification_status"),
    [
        # Early media only, until the ring timer: no verdict, the code stays usable.
        pytest.param(1, "progress_only", "completed", "pending", id="183-only"),
        pytest.param(3, "busy", "failed", "failed", id="486"),
        pytest.param(4, "invalid_number", "failed", "failed", id="404"),
        pytest.param(5, "rejected", "failed", "failed", id="603"),
        pytest.param(6, "congestion", "failed", "failed", id="503"),
        pytest.param(8, "unreachable", "failed", "failed", id="480"),
        pytest.param(7, "invalid_number", "failed", "failed", id="484"),
    ],
)
async def test_far_end_answer_sets_outcome(
    gateway: Gateway,
    far_end: FarEnd,
    behaviour: int,
    outcome: str,
    call_status: str,
    verification_status: str,
) -> None:
    number = phone_number(behaviour)
    _, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    ended = await call_ended(gateway, created["id"])
    assert ended["call"]["outcome"] == outcome
    assert ended["call"]["status"] == call_status
    assert ended["status"] == verification_status
    await wire_record(far_end, number)


async def test_fifty_at_once_each_with_its_own_caller_id(gateway: Gateway, far_end: FarEnd) -> None:
    numbers = [phone_number(0) for _ in range(50)]
    started = time.time()
    results = await asyncio.gather(
        *(gateway.post("/v1/verifications", {"phone": f"+{n}"}) for n in numbers)
    )
    assert [status for status, _ in results] == [201] * 50
    ended = await asyncio.gather(*(call_ended(gateway, body["id"], 20) for _, body in results))
    assert [e["call"]["outcome"] for e in ended] == ["delivered"] * 50
    records = [await wire_record(far_end, n, lambda r: r.canceled_at is not None) for n in numbers]
    assert all(r.invited_at >= started for r in records)
    assert len({r.from_user for r in records}) == 50


async def test_cancel_hangs_up_a_ringing_call(gateway: Gateway, far_end: FarEnd) -> None:
    number = phone_number(0)
    _, created = await gateway.post("/v1/verifications", {"phone": f"+{number}", "ring_seconds": 8})
    await wire_record(far_end, number, lambda r: r.sent_at(180) is not None)
    status, canceled = await gateway.post(f"/v1/verifications/{created['id']}/cancel", {})
    assert (status, canceled["status"]) == (200, "canceled")
    record = await wire_record(far_end, number, lambda r: r.canceled_at is not None)
    assert record.canceled_at is not None
    assert record.canceled_at - record.invited_at < 2, "the cancel did not end the ring early"
    ended = await call_ended(gateway, created["id"])
    assert ended["status"] == "canceled"
    assert [e["kind"] for e in ended["call"]["events"]][:2] == ["dialing", "ringing"]
    status, again = await gateway.post(f"/v1/verifications/{created['id']}/cancel", {})
    assert (status, again["code"], again["verification_status"]) == (
        409,
        "verification_not_pending",
        "canceled",
    )
