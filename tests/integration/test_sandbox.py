"""Sandbox numbers (config test_numbers): approved with their fixed code, never dialed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway, scrape
from tests.integration.test_verifications_api import call_ended, code_of

pytestmark = pytest.mark.integration

CODE = "4321"


async def test_sandbox_verification_is_approved_with_its_code_and_nobody_is_called(
    start_gateway: Any, far_end: FarEnd
) -> None:
    sandbox = phone_number(0)  # a ringing far end: a call to it would be seen
    real = phone_number(0)
    gateway: Gateway = await start_gateway(test_numbers={f"+{sandbox}": CODE})

    # More than the per-phone limit (3 in 10 minutes): QA may repeat as often as it likes.
    for _ in range(5):
        status, created = await gateway.post("/v1/verifications", {"phone": f"+{sandbox}"})
        assert status == 201, created
    assert created["sandbox"] is True
    assert created["call"]["status"] == "completed"
    assert (created["call"]["outcome"], created["call"]["reason"]) == ("delivered", "sandbox")
    assert created["call"]["dialed_at"] is None

    # A real verification in the same gateway is dialed: the far end is listening.
    status, other = await gateway.post("/v1/verifications", {"phone": f"+{real}"})
    assert (status, other["sandbox"]) == (201, False)
    record = await wire_record(far_end, real, timeout=10)
    await call_ended(gateway, other["id"])
    assert len(code_of(record)) == 4

    status, wrong = await gateway.post(f"/v1/verifications/{created['id']}/check", {"code": "0000"})
    assert (status, wrong["valid"], wrong["attempts_remaining"]) == (200, False, 4)
    status, checked = await gateway.post(f"/v1/verifications/{created['id']}/check", {"code": CODE})
    assert (status, checked["valid"], checked["status"]) == (200, True, "approved")

    # Well past the ring time of the real call: still no INVITE to the sandbox phone.
    await asyncio.sleep(1.0)
    assert far_end.calls_to(sandbox) == []

    metrics = await scrape(gateway)
    assert metrics["otp_sandbox_verifications_total"][()] == 5
    calls = {dict(k)["outcome"]: v for k, v in metrics["otp_calls_total"].items() if v}
    assert calls == {"delivered": 1}  # only the real call
    status, stats = await gateway.get("/v1/stats?window=1h")
    assert (status, stats["calls"]) == (200, 1)


async def test_sandbox_check_by_full_caller_id(start_gateway: Any, far_end: FarEnd) -> None:
    sandbox = phone_number(0)
    gateway: Gateway = await start_gateway(test_numbers={f"+{sandbox}": CODE})
    status, created = await gateway.post("/v1/verifications", {"phone": f"+{sandbox}"})
    assert status == 201, created
    cli = created["cli"]["prefix"] + CODE
    status, checked = await gateway.post(
        "/v1/verifications/check", {"phone": f"+{sandbox}", "cli": cli}
    )
    assert (status, checked["id"], checked["valid"]) == (200, created["id"], True)
    assert far_end.calls_to(sandbox) == []
