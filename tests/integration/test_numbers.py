"""Issue 4: number health learned from real calls, lookup, listing, reset and statistics."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway
from tests.integration.test_verifications_api import call_ended

pytestmark = pytest.mark.integration

NO_CALL_WAIT_S = 1.0


async def number(gateway: Gateway, phone: str) -> dict[str, Any]:
    status, body = await gateway.get(f"/v1/numbers/{phone}")
    assert status == 200, body
    return body


async def test_404_marks_invalid_refuses_then_reset_calls_again(
    gateway: Gateway, far_end: FarEnd
) -> None:
    phone = f"+{phone_number(4)}"
    _, first = await gateway.post("/v1/verifications", {"phone": phone})
    ended = await call_ended(gateway, first["id"])
    assert ended["call"]["outcome"] == "invalid_number"
    described = await number(gateway, phone)
    assert described["health"]["status"] == "invalid"
    assert described["health"]["last_cause"] == 1
    assert described["health"]["last_sip_code"] == 404
    assert (described["callable"], described["refused_by"]) == (False, "number_known_invalid")

    since = time.time()
    status, refused = await gateway.post("/v1/verifications", {"phone": phone})
    assert (status, refused["code"]) == (422, "number_known_invalid")
    await asyncio.sleep(NO_CALL_WAIT_S)
    assert len(far_end.calls_to(phone[1:])) == 1
    assert all(r.invited_at < since for r in far_end.calls_to(phone[1:]))

    status, _ = await gateway.post("/v1/numbers/lookup", {"phones": [phone]})
    response = await gateway.request("DELETE", f"/v1/numbers/{phone}/health")
    assert response.status == 204
    assert (await number(gateway, phone))["health"]["status"] == "unknown"
    status, again = await gateway.post("/v1/verifications", {"phone": phone})
    assert status == 201, again
    await wire_record(far_end, phone[1:], count=2)


async def test_ringing_marks_reachable(gateway: Gateway, far_end: FarEnd) -> None:
    phone = f"+{phone_number(0)}"
    assert (await number(gateway, phone))["health"]["status"] == "unknown"
    _, created = await gateway.post("/v1/verifications", {"phone": phone})
    await call_ended(gateway, created["id"])
    health = (await number(gateway, phone))["health"]
    assert (health["status"], health["calls"], health["delivered"]) == ("reachable", 1, 1)
    assert health["last_outcome"] == "delivered"
    assert health["last_delivered_at"] is not None


async def test_unreachable_and_invalid_are_listed_for_clean_up(
    gateway: Gateway, far_end: FarEnd
) -> None:
    invalid = [f"+{phone_number(4)}" for _ in range(3)]
    unreachable = [f"+{phone_number(8)}"]
    created = [
        (await gateway.post("/v1/verifications", {"phone": p}))[1] for p in invalid + unreachable
    ]
    await asyncio.gather(*(call_ended(gateway, c["id"]) for c in created))

    listed: list[str] = []
    cursor = None
    while True:
        query = "/v1/numbers?health=invalid&limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, page = await gateway.get(query)
        assert status == 200, page
        assert len(page["numbers"]) <= 2
        listed += [n["phone"] for n in page["numbers"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(listed) == sorted(invalid)
    _, page = await gateway.get("/v1/numbers?health=unreachable")
    assert [n["phone"] for n in page["numbers"]] == unreachable
    status, problem = await gateway.get("/v1/numbers?health=bogus")
    assert (status, problem["code"]) == (400, "invalid_request")


async def test_lookup_batch_answers_each_entry_in_order(gateway: Gateway) -> None:
    phones: list[Any] = [
        "+6281234567890",
        "0817 1234 5678",
        "+62215551234",
        "+62812",
        "+999123456789",
        "garbage!",
        12345,
        None,
        "+14155552671",
        "+62 0812-3456-7890",
    ]
    status, body = await gateway.post("/v1/numbers/lookup", {"phones": phones})
    assert status == 200, body
    results = body["results"]
    assert len(results) == len(phones)
    summary = [
        (r["valid"], r["reason"], r["type"], r["callable"], r["refused_by"]) for r in results
    ]
    assert summary == [
        (True, None, "mobile", True, None),
        (True, None, "mobile", True, None),
        (True, None, "fixed_line", False, "phone_type_not_allowed"),
        (False, "too_short", None, False, "invalid_phone"),
        (False, "invalid_country_code", None, False, "invalid_phone"),
        (False, "not_a_number", None, False, "invalid_phone"),
        (False, "not_a_number", None, False, "invalid_phone"),
        (False, "not_a_number", None, False, "invalid_phone"),
        (True, None, "fixed_line_or_mobile", False, "region_not_allowed"),
        (True, None, "mobile", True, None),
    ]
    assert results[0]["carrier"] == "Telkomsel"
    assert results[1]["carrier"] == "XL"
    assert results[9]["e164"] == "+6281234567890"
    status, problem = await gateway.post("/v1/numbers/lookup", {"phones": ["1"] * 1001})
    assert (status, problem["code"]) == (400, "invalid_request")


async def test_stats_by_carrier_match_the_calls_made(start_gateway: Any, far_end: FarEnd) -> None:
    gateway: Gateway = await start_gateway()  # its own database: only this test's calls
    plan = {
        "812": [0, 0, 3],  # Telkomsel: 2 delivered, 1 busy
        "817": [1, 4],  # XL: 1 uncertain (183 only), 1 invalid
        "881": [2, 5, 6, 8],  # Smartfren: 1 answered, rejected, congestion, unreachable
    }
    created = [
        (await gateway.post("/v1/verifications", {"phone": f"+{phone_number(b, net)}"}))[1]
        for net, behaviours in plan.items()
        for b in behaviours
    ]
    await asyncio.gather(*(call_ended(gateway, c["id"]) for c in created))

    status, stats = await gateway.get("/v1/stats?window=1h")
    assert status == 200, stats
    assert (stats["calls"], stats["delivered"], stats["uncertain"], stats["failed"]) == (9, 3, 1, 5)
    assert stats["delivery_rate"] == round(3 / 9, 4)
    carriers = {c["carrier"]: c for c in stats["by_carrier"]}
    assert {k: (v["calls"], v["delivered"], v["delivery_rate"]) for k, v in carriers.items()} == {
        "Telkomsel": (3, 2, round(2 / 3, 4)),
        "XL": (2, 0, 0.0),
        "Smartfren": (4, 1, 0.25),
    }
    outcomes = {k: v for k, v in stats["by_outcome"].items() if v}
    assert carriers["XL"]["by_outcome"] == {"progress_only": 1, "invalid_number": 1}
    assert outcomes == {
        "progress_only": 1,
        "delivered": 2,
        "answered": 1,
        "busy": 1,
        "invalid_number": 1,
        "rejected": 1,
        "congestion": 1,
        "unreachable": 1,
    }
    status, empty = await gateway.get(
        "/v1/stats?since=2020-01-01T00:00:00Z&until=2020-01-02T00:00:00Z"
    )
    assert (status, empty["calls"], empty["delivery_rate"]) == (200, 0, None)


async def test_export_writes_invalid_numbers_as_csv(
    gateway: Gateway, far_end: FarEnd, tmp_path: Path
) -> None:
    invalid = sorted(f"+{phone_number(4)}" for _ in range(2))
    created = [(await gateway.post("/v1/verifications", {"phone": p}))[1] for p in invalid]
    await asyncio.gather(*(call_ended(gateway, c["id"]) for c in created))
    config = tmp_path / "export.yaml"
    config.write_text(
        "asterisk: {secret: unused}\nsecurity: {code_secret: unused-but-16-chars}\n"
        f"pools: [{{name: p, prefix: '+6221500'}}]\ndatabase: {{url: '{gateway.database}'}}\n"
    )
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "gateway",
            "numbers",
            "export",
            "--health",
            "invalid",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["phone"] for r in rows] == invalid
    assert {
        (r["status"], r["last_outcome"], r["last_cause"], r["last_sip_code"]) for r in rows
    } == {("invalid", "invalid_number", "1", "404")}
