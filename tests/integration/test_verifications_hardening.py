"""Bad input against a live gateway: a clear problem+json error and no call, never a 500."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import phone_number
from tests.farend import FarEnd
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration

# Long enough for a wrongly placed call to have reached the far end.
NO_CALL_WAIT_S = 1.0


async def assert_no_invite_since(far_end: FarEnd, since: float) -> None:
    await asyncio.sleep(NO_CALL_WAIT_S)
    late = [r for r in far_end.records() if r.invited_at >= since]
    assert late == [], f"the far end was called: {late}"


@pytest.mark.parametrize(
    ("phone", "code"),
    [
        pytest.param("+62812", "invalid_phone", id="incomplete"),
        pytest.param("+6281234567890123456", "invalid_phone", id="too-long"),
        pytest.param("+999123456789", "invalid_phone", id="bad-country-code"),
        pytest.param("not a number", "invalid_phone", id="garbage"),
        pytest.param("+62215551234", "phone_type_not_allowed", id="landline"),
        pytest.param("+14155552671", "region_not_allowed", id="foreign-region"),
        pytest.param("+6281234567890\r\nAction: Originate", "invalid_request", id="crlf"),
        pytest.param("6" * 5000, "invalid_request", id="very-long"),
    ],
)
async def test_refused_phone_gets_422_and_no_call(
    gateway: Gateway, far_end: FarEnd, phone: str, code: str
) -> None:
    since = time.time()
    status, body = await gateway.post("/v1/verifications", {"phone": phone})
    assert status == (400 if code == "invalid_request" else 422), body
    assert body["code"] == code
    assert body["status"] == status
    await assert_no_invite_since(far_end, since)


async def test_missing_or_wrong_api_key_is_401(gateway: Gateway, far_end: FarEnd) -> None:
    since = time.time()
    body = {"phone": f"+{phone_number(0)}"}
    for key in ("", "otpk_wrong", "Basic abc"):
        response = await gateway.request("POST", "/v1/verifications", json=body, key=key)
        assert response.status == 401
        assert response.content_type == "application/problem+json"
        assert (await response.json(content_type=None))["code"] == "unauthorized"
    response = await gateway.http.post(gateway.url + "/v1/verifications", json=body)
    assert response.status == 401
    await assert_no_invite_since(far_end, since)


@pytest.mark.parametrize(
    ("payload", "content_type", "status", "code"),
    [
        pytest.param(b"{not json", "application/json", 400, "invalid_request", id="malformed"),
        pytest.param(b"[1, 2]", "application/json", 400, "invalid_request", id="array"),
        pytest.param(
            b'{"phone": "+6281234567890", "pin": 1}',
            "application/json",
            400,
            "invalid_request",
            id="unknown-field",
        ),
        pytest.param(
            b'{"phone": 6281234567890}',
            "application/json",
            400,
            "invalid_request",
            id="phone-not-string",
        ),
        pytest.param(
            b'{"phone": "+6281234567890", "ring_seconds": true}',
            "application/json",
            400,
            "invalid_request",
            id="bool-ring-seconds",
        ),
        pytest.param(
            b'{"phone": "+6281234567890", "ring_seconds": 999}',
            "application/json",
            400,
            "invalid_request",
            id="ring-seconds-too-long",
        ),
        pytest.param(
            b'{"phone": "+6281234567890"}',
            "text/plain",
            415,
            "unsupported_media_type",
            id="not-json-type",
        ),
        pytest.param(
            b'{"phone": "' + b"1" * 20000 + b'"}',
            "application/json",
            413,
            "payload_too_large",
            id="too-large",
        ),
        pytest.param(
            b'{"phone": "+6281234567890", "reference": "a\\r\\nAction: Hangup"}',
            "application/json",
            400,
            "invalid_request",
            id="crlf-reference",
        ),
        pytest.param(
            b'{"phone": "+6281234567890", "callback_url": "ftp://x"}',
            "application/json",
            400,
            "invalid_request",
            id="bad-callback",
        ),
        pytest.param(b"\xff\xfe", "application/json", 400, "invalid_request", id="not-utf8"),
    ],
)
async def test_bad_body_is_refused_without_a_call(
    gateway: Gateway, far_end: FarEnd, payload: bytes, content_type: str, status: int, code: str
) -> None:
    since = time.time()
    response = await gateway.request(
        "POST", "/v1/verifications", data=payload, headers={"Content-Type": content_type}
    )
    body = await response.json(content_type=None)
    assert (response.status, body["code"]) == (status, code), body
    await assert_no_invite_since(far_end, since)


async def test_unknown_verification_and_route_are_problem_404(gateway: Gateway) -> None:
    status, body = await gateway.get("/v1/verifications/vrf_nope")
    assert (status, body["code"]) == (404, "not_found")
    status, body = await gateway.get("/v1/nothing-here")
    assert (status, body["code"]) == (404, "not_found")


async def test_check_body_must_hold_code_or_cli(gateway: Gateway, far_end: FarEnd) -> None:
    _, created = await gateway.post("/v1/verifications", {"phone": f"+{phone_number(0)}"})
    path = f"/v1/verifications/{created['id']}/check"
    for body in ({}, {"code": "1234", "cli": "+622150001234"}, {"code": "12a4"}):
        status, problem = await gateway.post(path, body)
        assert (status, problem["code"]) == (400, "invalid_request"), body
    _, current = await gateway.get(f"/v1/verifications/{created['id']}")
    assert current["attempts_remaining"] == 5
