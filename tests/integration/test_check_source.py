"""A check says how its code was obtained, and /v1/stats counts it (issue 19, part).

Against the dev PBX: the code is read where the user reads it, off the caller ID the far
end received; an app watches the call log as long as the create response says.
"""

from __future__ import annotations

import pytest

from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway

pytestmark = pytest.mark.integration


async def test_a_checks_source_is_validated_kept_and_counted_by_carrier(
    gateway: Gateway, far_end: FarEnd
) -> None:
    numbers = [phone_number(0) for _ in range(3)]  # each rings, then the gateway hangs up
    sources = ["intercepted", "manual", None]
    created = []
    for number in numbers:
        status, body = await gateway.post("/v1/verifications", {"phone": "+" + number})
        assert status == 201, body
        # Post-dial delay (15 s by default) and the ring time (2 s here), whole seconds.
        assert body["cli"]["interception_timeout_seconds"] == 17
        created.append(body)
    for number, body, source in zip(numbers, created, sources, strict=True):
        record = await wire_record(far_end, number, lambda r: r.canceled_at is not None)
        code = record.from_user[-4:]  # what the user sees
        check = f"/v1/verifications/{body['id']}/check"
        status, problem = await gateway.post(check, {"code": code, "source": "guessed"})
        assert (status, problem["code"], problem.get("field")) == (
            400,
            "invalid_request",
            "source",
        )
        said = {"code": code} | ({"source": source} if source else {})
        status, result = await gateway.post(check, said)
        assert (status, result["status"]) == (200, "approved"), result

    status, stats = await gateway.get("/v1/stats")
    assert status == 200, stats
    # Every number is Telkomsel's (0812...); other tests' calls may share the window.
    telkomsel = next(c for c in stats["by_carrier"] if c["carrier"] == "Telkomsel")
    counted = telkomsel["approved_by_source"]
    assert (counted["intercepted"], counted["manual"], counted["unspecified"]) == (1, 1, 1)
    assert counted["intercepted_share"] == 0.5
