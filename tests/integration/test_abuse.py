"""Issue 5 against the dev PBX: rate limits, toll-fraud guards, guessing caps, injection."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import phones
from gateway.config import LimitsConfig, NumbersConfig, Window
from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway, GatewayFactory, stop_gateway
from tests.integration.test_verifications_api import call_ended, code_of

pytestmark = pytest.mark.integration

NO_CALL_WAIT_S = 1.0


def invites_since(far_end: FarEnd, since: float, prefix: str = "") -> list[str]:
    return [
        r.request_user
        for r in far_end.records()
        if r.invited_at >= since and r.request_user.startswith(prefix)
    ]


async def test_fourth_call_to_a_phone_in_ten_minutes_is_429(
    gateway: Gateway, far_end: FarEnd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    phone = f"+{phone_number(3)}"
    for _ in range(3):
        status, created = await gateway.post("/v1/verifications", {"phone": phone})
        assert status == 201, created
        await call_ended(gateway, created["id"])
    since = time.time()
    response = await gateway.request("POST", "/v1/verifications", json={"phone": phone})
    body = await response.json(content_type=None)
    assert (response.status, body["code"]) == (429, "rate_limited")
    retry_after = int(response.headers["Retry-After"])
    assert 0 < retry_after <= 600
    assert body["detail"] == "too many requests; retry later"
    await asyncio.sleep(NO_CALL_WAIT_S)
    assert invites_since(far_end, since, phone[1:]) == []
    assert len(far_end.calls_to(phone[1:])) == 3
    refusals = [r.getMessage() for r in caplog.records if "rate limited" in r.getMessage()]
    assert refusals == [f"verification refused: rate limited (phone {phones.masked(phone)})"]
    assert phone[1:] not in "\n".join(r.getMessage() for r in caplog.records)


async def test_range_walk_is_cut_off_at_the_prefix_limit(
    start_gateway: GatewayFactory, far_end: FarEnd
) -> None:
    gateway = await start_gateway()
    base = phone_number(0)[:-4]  # 25 consecutive numbers: base0000 .. base0024
    since = time.time()
    statuses = []
    for n in range(25):
        status, _ = await gateway.post("/v1/verifications", {"phone": f"+{base}{n:04d}"})
        statuses.append(status)
    assert statuses == [201] * 20 + [429] * 5
    await asyncio.sleep(NO_CALL_WAIT_S)
    assert len(invites_since(far_end, since, base)) == 20


async def test_limits_hold_after_a_restart(start_gateway: GatewayFactory, far_end: FarEnd) -> None:
    first = await start_gateway()
    phone = f"+{phone_number(5)}"
    for _ in range(3):
        status, created = await first.post("/v1/verifications", {"phone": phone})
        assert status == 201
        await call_ended(first, created["id"])
    await stop_gateway(first)

    again = await start_gateway(database=first.database, key=first.key)
    status, body = await again.post("/v1/verifications", {"phone": phone})
    assert (status, body["code"]) == (429, "rate_limited")


async def test_global_ceiling_and_daily_key_budget(
    start_gateway: GatewayFactory, far_end: FarEnd
) -> None:
    gateway = await start_gateway(
        limits=LimitsConfig(global_calls=(Window(4, 60),), key_daily_calls=1000)
    )
    statuses = [
        (await gateway.post("/v1/verifications", {"phone": f"+{phone_number(3)}"}))[0]
        for _ in range(6)
    ]
    assert statuses == [201] * 4 + [429] * 2
    budget = await start_gateway(limits=LimitsConfig(key_daily_calls=2))
    statuses = [
        (await budget.post("/v1/verifications", {"phone": f"+{phone_number(3)}"}))[0]
        for _ in range(3)
    ]
    assert statuses == [201, 201, 429]
    # The budget's use shows in /metrics.
    response = await budget.http.get(budget.operator_url + "/metrics")
    assert response.status == 200
    samples = {
        (sample.name, sample.labels.get("name", "")): sample.value
        for family in text_string_to_metric_families(await response.text())
        for sample in family.samples
    }
    assert samples[("otp_api_key_calls_24h", "integration")] == 2
    assert samples[("otp_api_key_daily_call_budget", "")] == 2


@pytest.mark.parametrize(
    ("phone", "code"),
    [
        pytest.param("+628091234567", "phone_type_not_allowed", id="premium-rate"),
        pytest.param("+628001234567", "phone_type_not_allowed", id="toll-free"),
        pytest.param("+628041234567", "phone_type_not_allowed", id="shared-cost"),
        pytest.param("+628071123456", "phone_type_not_allowed", id="uan"),
        pytest.param("+447012345678", "region_not_allowed", id="foreign-personal-number"),
        pytest.param("+447912345678", "region_not_allowed", id="foreign-mobile"),
    ],
)
async def test_toll_fraud_destinations_get_422_and_no_call(
    gateway: Gateway, far_end: FarEnd, phone: str, code: str
) -> None:
    since = time.time()
    status, body = await gateway.post("/v1/verifications", {"phone": phone})
    assert (status, body["code"]) == (422, code)
    await asyncio.sleep(NO_CALL_WAIT_S)
    assert invites_since(far_end, since) == []


async def test_blocked_prefix_gets_422(start_gateway: GatewayFactory, far_end: FarEnd) -> None:
    gateway = await start_gateway(numbers=NumbersConfig(blocked_prefixes=("+62817",)))
    since = time.time()
    status, body = await gateway.post("/v1/verifications", {"phone": f"+{phone_number(0, '817')}"})
    assert (status, body["code"]) == (422, "destination_blocked")
    status, _ = await gateway.post("/v1/verifications", {"phone": f"+{phone_number(3, '812')}"})
    assert status == 201
    await asyncio.sleep(NO_CALL_WAIT_S)
    assert all(not u.startswith("62817") for u in invites_since(far_end, since))


async def test_ten_failed_checks_across_verifications_block_the_phone(
    gateway: Gateway, far_end: FarEnd, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    phone = phone_number(0)

    async def new_verification(n: int) -> tuple[str, str]:
        _, created = await gateway.post("/v1/verifications", {"phone": f"+{phone}"})
        await wire_record(far_end, phone, lambda r: True, count=n)
        newest = max(far_end.calls_to(phone), key=lambda r: r.invited_at)
        return created["id"], code_of(newest)

    async def check(vid: str, code: str) -> tuple[int, dict[str, Any]]:
        return await gateway.post(f"/v1/verifications/{vid}/check", {"code": code})

    def wrong(right: str) -> str:
        return f"{(int(right) + 1) % 10000:04d}"

    for n in (1, 2):  # five wrong codes lock each verification: ten in all
        vid, right = await new_verification(n)
        results = [await check(vid, wrong(right)) for _ in range(5)]
        assert [r["attempts_remaining"] for _, r in results] == [4, 3, 2, 1, 0]
        assert results[-1][1]["status"] == "max_attempts_reached"
        status, locked = await check(vid, right)
        assert (status, locked["verification_status"]) == (409, "max_attempts_reached")

    # A new verification does not reset the count: even its right code is refused today.
    vid, right = await new_verification(3)
    response = await gateway.request("POST", f"/v1/verifications/{vid}/check", json={"code": right})
    body = await response.json(content_type=None)
    assert (response.status, body["code"]) == (429, "rate_limited")
    assert 0 < int(response.headers["Retry-After"]) <= 86400
    status, by_phone = await gateway.post(
        "/v1/verifications/check", {"phone": f"+{phone}", "code": right}
    )
    assert (status, by_phone["code"]) == (429, "rate_limited")
    assert phone not in "\n".join(r.getMessage() for r in caplog.records)
    assert any(phones.masked(f"+{phone}") in r.getMessage() for r in caplog.records)
    _, current = await gateway.get(f"/v1/verifications/{vid}")
    assert (current["status"], current["attempts_remaining"]) == ("pending", 5)
