"""The conversion watch (issue 19): a destination block whose verifications are created
and never completed (traffic pumping) is flagged, and in `block` mode refused, while the
rest of its carrier and country, which convert, are not.

Every call is a real one through the dev Asterisk to the lab far end; a refused create
is seen to place no call at the far end.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.config import ConversionConfig, LimitsConfig
from tests.conftest import phone_number, wire_record
from tests.fakes import until
from tests.farend import FarEnd
from tests.integration.conftest import POOL_PREFIX, Gateway, GatewayFactory

pytestmark = pytest.mark.integration

PUMPED = 60  # verifications to one block, none checked
CONVERTED = 20  # verifications elsewhere on the same carrier, each checked right


def conversion_sections(mode: str) -> dict[str, Any]:
    return {
        "conversion": ConversionConfig(
            mode=mode, min_rate=0.2, min_verifications=50, grace_seconds=0, block_seconds=600
        ),
        # Sixty numbers in one block: no range-walking limit in the way.
        "limits": LimitsConfig(key_requests_per_minute=1_000_000, per_prefix=()),
    }


def block_number(block: str) -> str:
    """A fresh number (no +) in `block` (digits: all but the last four), ringing."""
    return phone_number(0, block=block)


async def create(gateway: Gateway, number: str) -> tuple[int, dict[str, Any]]:
    return await gateway.post("/v1/verifications", {"phone": f"+{number}", "ring_seconds": 1})


async def converted(gateway: Gateway, far_end: FarEnd) -> None:
    """A verification to a fresh Telkomsel number, checked with the code it showed."""
    number = phone_number(0, "812")
    status, created = await create(gateway, number)
    assert status == 201, created
    record = await wire_record(far_end, number, timeout=10.0)
    code = record.from_user[len(POOL_PREFIX) - 1 :]
    status, checked = await gateway.post(f"/v1/verifications/{created['id']}/check", {"code": code})
    assert (status, checked["status"]) == (200, "approved"), checked


async def pump(gateway: Gateway, block: str) -> None:
    """PUMPED verifications to `block`, never checked."""
    numbers = [block_number(block) for _ in range(PUMPED)]
    answers = await asyncio.gather(*(create(gateway, n) for n in numbers))
    assert [status for status, _ in answers] == [201] * PUMPED


async def open_alerts(gateway: Gateway) -> list[dict[str, Any]]:
    status, body = await gateway.get("/v1/alerts")
    assert status == 200, body
    alerts: list[dict[str, Any]] = body["alerts"]
    return alerts


async def flagged(gateway: Gateway, block: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        alerts = await open_alerts(gateway)
        return next((a for a in alerts if a["target"] == f"+{block}"), None)

    return await until(found, timeout=20.0)


async def test_a_pumped_block_is_suspended_until_its_alert_is_lifted(
    start_gateway: GatewayFactory, far_end: FarEnd
) -> None:
    gateway = await start_gateway(**conversion_sections("block"))
    # The carrier and the country convert: 20 of 80 (0.25) once the block is pumped.
    await asyncio.gather(*(converted(gateway, far_end) for _ in range(CONVERTED)))
    block = phone_number(0, "812")[:-4]
    await pump(gateway, block)

    alert = await flagged(gateway, block)
    assert (alert["kind"], alert["mode"], alert["approved"]) == ("block", "block", 0)
    assert alert["created"] == PUMPED and alert["blocked_until"] is not None
    # Only the block: its carrier and its country convert well enough.
    assert [a["kind"] for a in await open_alerts(gateway)] == ["block"]

    # The next create to the block is refused, and nothing is dialed.
    refused = block_number(block)
    response = await gateway.request(
        "POST", "/v1/verifications", json={"phone": f"+{refused}", "ring_seconds": 1}
    )
    body = await response.json(content_type=None)
    assert (response.status, body["code"]) == (429, "destination_suspended"), body
    assert 500 < int(response.headers["Retry-After"]) <= 600
    # Another block of the same carrier is called.
    elsewhere = phone_number(0, "812")
    status, _ = await create(gateway, elsewhere)
    assert status == 201
    await wire_record(far_end, elsewhere, timeout=10.0)
    assert far_end.calls_to(refused) == []

    # An admin lifts the alert: the block is called again.
    lifted = await gateway.request("DELETE", f"/v1/alerts/{alert['id']}")
    assert lifted.status == 204
    again = await gateway.request("DELETE", f"/v1/alerts/{alert['id']}")
    assert again.status == 404
    assert await open_alerts(gateway) == []
    status, _ = await create(gateway, refused)
    assert status == 201
    await wire_record(far_end, refused, timeout=10.0)
    status, body = await gateway.get("/v1/alerts?state=all")
    assert [(a["id"], a["cleared_by"]) for a in body["alerts"]] == [(alert["id"], "admin")]


async def test_report_mode_flags_and_still_calls(
    start_gateway: GatewayFactory, far_end: FarEnd
) -> None:
    gateway = await start_gateway(**conversion_sections("report"))
    await asyncio.gather(*(converted(gateway, far_end) for _ in range(CONVERTED)))
    block = phone_number(0, "812")[:-4]
    await pump(gateway, block)
    alert = await flagged(gateway, block)
    assert (alert["mode"], alert["blocked_until"]) == ("report", None)
    number = block_number(block)
    status, _ = await create(gateway, number)
    assert status == 201
    await wire_record(far_end, number, timeout=10.0)
