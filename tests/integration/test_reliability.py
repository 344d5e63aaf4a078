"""Issue 6 against the dev PBX: idempotent creates and load shedding."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.config import CallsConfig
from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway, GatewayFactory

pytestmark = pytest.mark.integration

NO_CALL_WAIT_S = 1.0


async def test_twenty_concurrent_posts_with_one_key_place_one_call(
    gateway: Gateway, far_end: FarEnd
) -> None:
    number = phone_number(0)
    body = {"phone": f"+{number}", "reference": "order-7"}
    headers = {"Idempotency-Key": "checkout-7f3a"}

    async def post() -> tuple[int, str]:
        response = await gateway.request("POST", "/v1/verifications", json=body, headers=headers)
        return response.status, await response.text()

    results = await asyncio.gather(*(post() for _ in range(20)))
    assert {status for status, _ in results} == {201}
    assert len({text for _, text in results}) == 1, "the responses differ"
    await wire_record(far_end, number, lambda r: r.canceled_at is not None)
    await asyncio.sleep(NO_CALL_WAIT_S)
    assert len(far_end.calls_to(number)) == 1

    # A later retry gets the same response; another body under the key is a conflict.
    status, replay = await post()
    assert (status, replay) == results[0]
    response = await gateway.request(
        "POST", "/v1/verifications", json={**body, "reference": "order-8"}, headers=headers
    )
    problem = await response.json(content_type=None)
    assert (response.status, problem["code"]) == (409, "idempotency_conflict")
    assert len(far_end.calls_to(number)) == 1


async def test_bad_idempotency_key_is_400(gateway: Gateway) -> None:
    for key in ("", "x" * 256, "caf\u00e9"):
        response = await gateway.request(
            "POST",
            "/v1/verifications",
            json={"phone": f"+{phone_number(0)}"},
            headers={"Idempotency-Key": key},
        )
        assert response.status == 400, key


async def test_a_full_queue_sheds_load_with_503(
    start_gateway: GatewayFactory, far_end: FarEnd
) -> None:
    gateway = await start_gateway(
        calls=CallsConfig(ring_seconds=1, max_concurrent=1, max_per_second=1, max_queue=3)
    )
    since = time.time()
    responses = []
    for _ in range(6):
        response = await gateway.request(
            "POST", "/v1/verifications", json={"phone": f"+{phone_number(3)}"}
        )
        responses.append((response.status, response.headers.get("Retry-After")))
    statuses = [s for s, _ in responses]
    assert statuses.count(201) >= 3
    shed = [(s, r) for s, r in responses if s == 503]
    assert shed, statuses
    assert all(r is not None and int(r) >= 1 for _, r in shed)
    await asyncio.sleep(NO_CALL_WAIT_S)
    called = [r for r in far_end.records() if r.invited_at >= since]
    assert len(called) <= statuses.count(201)
