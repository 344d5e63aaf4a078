"""The dev bed's second Asterisk node (make cluster-up): a second Asterisk from the one
provisioned root, AMI 127.0.0.1:5039, SIP 5061, trunking to the same far end."""

from __future__ import annotations

import pytest

from gateway.config import AsteriskConfig
from gateway.pbx import AmiSettings
from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import GatewayFactory
from tests.integration.test_verifications_api import call_ended

pytestmark = pytest.mark.integration


async def test_node_b_carries_a_call_beside_node_a(
    start_gateway: GatewayFactory, dev_pbx: AmiSettings, dev_pbx_b: AmiSettings, far_end: FarEnd
) -> None:
    """A gateway whose only Asterisk is node b: its call reaches the far end, From user
    the caller ID, and is canceled after its ring time; node a runs beside it."""
    assert (dev_pbx.port, dev_pbx_b.port) == (5038, 5039)
    gateway = await start_gateway(
        asterisk=AsteriskConfig(secret=dev_pbx_b.secret, port=dev_pbx_b.port, settle_seconds=0)
    )
    number = phone_number(0)
    status, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
    assert status == 201
    record = await wire_record(far_end, number, lambda r: r.canceled_at is not None)
    assert record.from_user.startswith(created["cli"]["prefix"].lstrip("+"))
    assert len(record.from_user) == len(created["cli"]["prefix"]) - 1 + created["cli"]["length"]
    ended = await call_ended(gateway, created["id"])
    assert (ended["call"]["outcome"], ended["call"]["reason"]) == ("delivered", "ring_timeout")
