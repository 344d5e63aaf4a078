"""Webhooks: every event reaches a receiver that fails at first, signed, with stable ids;
a callback URL reaches no address inside unless the operator allows it."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from gateway.config import VerificationConfig, WebhooksConfig
from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway, GatewayFactory, wait_for
from tests.integration.test_verifications_api import call_ended, code_of

pytestmark = pytest.mark.integration

SECRET = "whsec_" + base64.b64encode(b"integration-webhook-secret-0123").decode()
FAILURES_FIRST = 2  # the receiver answers 500 to the first two attempts of each message
# The receiver runs on this host: by default no webhook may reach it.
LOOPBACK = ("127.0.0.0/8", "::1/128")


class Receiver:
    """A webhook endpoint that fails each message's first attempts, then accepts it."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.accepted: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        webhook_id = request.headers["webhook-id"]
        self.attempts[webhook_id] += 1
        try:
            Webhook(SECRET).verify(body, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400)
        if self.attempts[webhook_id] <= FAILURES_FIRST:
            return web.Response(status=500)
        self.accepted.append(json.loads(body) | {"_id_header": webhook_id})
        return web.Response(status=204)

    def types_by_verification(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = defaultdict(list)
        for event in self.accepted:
            found[event["data"]["id"]].append(event["type"])
        return found


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiving = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", receiving.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    receiving.url = str(server.make_url("/hooks"))
    yield receiving
    await server.close()


async def test_every_event_arrives_signed_after_failed_attempts(
    start_gateway: GatewayFactory, far_end: FarEnd, receiver: Receiver
) -> None:
    gateway = await start_gateway(
        webhooks=WebhooksConfig(
            secret=SECRET, retry_base_seconds=0.2, timeout_seconds=2, allowed_networks=LOOPBACK
        ),
        verification=VerificationConfig(ttl_seconds=6, max_attempts=5),
    )

    async def create(behaviour: int) -> tuple[str, str]:
        number = phone_number(behaviour)
        status, body = await gateway.post(
            "/v1/verifications", {"phone": f"+{number}", "callback_url": receiver.url}
        )
        assert status == 201, body
        return body["id"], number

    approved, approved_number = await create(0)
    await call_ended(gateway, approved)
    right = code_of(await wire_record(far_end, approved_number))
    await gateway.post(f"/v1/verifications/{approved}/check", {"code": right})

    failed, _ = await create(3)
    locked, locked_number = await create(0)
    wrong = f"{(int(code_of(await wire_record(far_end, locked_number))) + 1) % 10000:04d}"
    for _ in range(5):
        await gateway.post(f"/v1/verifications/{locked}/check", {"code": wrong})
    canceled, _ = await create(9)  # 100 Trying only: never rings, so never delivered
    await gateway.post(f"/v1/verifications/{canceled}/cancel", {})
    expired, _ = await create(1)

    expected = {
        approved: ["verification.delivered", "verification.approved"],
        failed: ["verification.failed"],
        locked: ["verification.max_attempts_reached", "verification.delivered"],
        canceled: ["verification.canceled"],
        # 183 only: no verdict on delivery, the verification stays pending until it expires.
        expired: ["verification.delivery_uncertain", "verification.expired"],
    }

    async def all_arrived() -> bool:
        got = receiver.types_by_verification()
        return all(sorted(got.get(v, [])) == sorted(types) for v, types in expected.items())

    await wait_for(all_arrived, 30, "every webhook delivered")
    assert receiver.bad_signatures == 0
    # Each message was tried three times under one webhook-id, then accepted once.
    assert set(receiver.attempts.values()) == {FAILURES_FIRST + 1}
    assert all(e["id"] == e["_id_header"] for e in receiver.accepted)
    assert len({e["id"] for e in receiver.accepted}) == len(receiver.accepted)

    status, shown = await gateway.get(f"/v1/verifications/{approved}")
    assert status == 200
    assert [(w["type"], w["status"], w["attempts"]) for w in shown["webhooks"]] == [
        ("verification.delivered", "delivered", 3),
        ("verification.approved", "delivered", 3),
    ]


async def test_an_event_carries_the_verification_as_it_was_then(
    start_gateway: GatewayFactory, far_end: FarEnd, receiver: Receiver
) -> None:
    """A code checked right after the call: the delivered event still says pending.

    The sender looks for new rows about once a second, so the check lands before the
    delivered event's first attempt; three verifications make that all but certain."""
    gateway = await start_gateway(
        webhooks=WebhooksConfig(
            secret=SECRET, retry_base_seconds=0.2, timeout_seconds=2, allowed_networks=LOOPBACK
        ),
    )
    approved = []
    for behaviour in (0, 0, 0):
        number = phone_number(behaviour)
        status, body = await gateway.post(
            "/v1/verifications", {"phone": f"+{number}", "callback_url": receiver.url}
        )
        assert status == 201, body
        await call_ended(gateway, body["id"])
        right = code_of(await wire_record(far_end, number))
        status, checked = await gateway.post(
            f"/v1/verifications/{body['id']}/check", {"code": right}
        )
        assert (status, checked["status"]) == (200, "approved"), checked
        approved.append(body["id"])

    async def all_arrived() -> bool:
        got = receiver.types_by_verification()
        return all(len(got.get(v, [])) == 2 for v in approved)

    await wait_for(all_arrived, 30, "two events for each verification")
    for event in receiver.accepted:
        data = event["data"]
        if event["type"] == "verification.delivered":
            assert data["status"] == "pending", event
        else:
            assert event["type"] == "verification.approved"
            assert data["status"] == "approved", event
        assert (data["call"]["status"], data["call"]["outcome"]) == ("completed", "delivered")
        # The event's time is when it happened; the data was last changed then too.
        assert data["updated_at"] <= event["created_at"], event


async def test_callback_url_needs_webhooks_configured(
    start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gateway = await start_gateway()
    status, body = await gateway.post(
        "/v1/verifications", {"phone": f"+{phone_number(0)}", "callback_url": receiver.url}
    )
    assert (status, body["code"]) == (400, "invalid_request")


async def webhooks_attempted(gateway: Gateway, verification_id: str) -> list[dict[str, Any]]:
    """The verification's webhooks once each has been attempted."""
    async with asyncio.timeout(10):
        while True:
            status, body = await gateway.get(f"/v1/verifications/{verification_id}")
            assert status == 200, body
            if body["webhooks"] and all(w["attempts"] for w in body["webhooks"]):
                return list(body["webhooks"])
            await asyncio.sleep(0.05)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2@hooks.example.com/otp",
        "https://token@hooks.example.com/otp",
        "http://127.0.0.1:8080/hooks",
        "http://0.0.0.0/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1:5038/",
        "http://[fd00::1]/",
    ],
)
async def test_a_callback_url_with_credentials_or_an_inside_address_is_refused(
    start_gateway: GatewayFactory, url: str
) -> None:
    gateway = await start_gateway(webhooks=WebhooksConfig(secret=SECRET))
    status, body = await gateway.post(
        "/v1/verifications", {"phone": f"+{phone_number(9)}", "callback_url": url}
    )
    assert (status, body["code"], body["field"]) == (422, "invalid_callback_url", "callback_url")
    assert "hunter2" not in body["detail"]


async def test_a_name_that_resolves_inside_is_refused_at_delivery(
    start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    gateway = await start_gateway(webhooks=WebhooksConfig(secret=SECRET))
    inside = receiver.url.replace("127.0.0.1", "localhost")  # a name, so accepted at create
    status, created = await gateway.post(
        "/v1/verifications", {"phone": f"+{phone_number(9)}", "callback_url": inside}
    )
    assert status == 201, created
    await gateway.post(f"/v1/verifications/{created['id']}/cancel", {})
    [webhook] = await webhooks_attempted(gateway, created["id"])
    assert (webhook["status"], webhook["last_error"]) == ("pending", "refused_address")
    assert receiver.attempts == {}


async def test_the_client_sees_a_class_of_error_not_its_detail(
    start_gateway: GatewayFactory,
) -> None:
    gateway = await start_gateway(webhooks=WebhooksConfig(secret=SECRET, allowed_networks=LOOPBACK))
    nowhere = f"http://127.0.0.1:{closed_port()}/hooks"  # allowed, but nothing listens
    status, created = await gateway.post(
        "/v1/verifications", {"phone": f"+{phone_number(9)}", "callback_url": nowhere}
    )
    assert status == 201, created
    await gateway.post(f"/v1/verifications/{created['id']}/cancel", {})
    [webhook] = await webhooks_attempted(gateway, created["id"])
    assert (webhook["last_error"], webhook["last_status"]) == ("connect_failed", None)
