"""/metrics after real calls: it parses, and its counters match what was placed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.outcomes import CANCELED, Outcome
from tests.conftest import phone_number
from tests.farend import FarEnd
from tests.integration.conftest import Gateway, by_label, scrape
from tests.integration.test_verifications_api import call_ended

pytestmark = pytest.mark.integration

# Far-end behaviour (last digit) -> (outcome, Q.850 cause), as measured in test_pbx_calls.
PLAN = [
    (0, "delivered", "16"),  # the gateway's ring timer hangs up: normal clearing
    (0, "delivered", "16"),
    (1, "progress_only", "16"),  # 183 only, until the ring timer
    (2, "answered", "16"),
    (3, "busy", "17"),
    (4, "invalid_number", "1"),
    (5, "rejected", "21"),
    (6, "congestion", "34"),
    (8, "unreachable", "19"),
]


async def test_outcome_counters_match_the_calls_made(start_gateway: Any, far_end: FarEnd) -> None:
    gateway: Gateway = await start_gateway()  # its own app: counters start at zero
    before = await scrape(gateway)
    assert by_label(before["otp_calls_total"], "outcome") == {}
    assert before["otp_ami_connected"][()] == 1

    created = []
    for behaviour, _, _ in PLAN:
        status, body = await gateway.post(
            "/v1/verifications", {"phone": f"+{phone_number(behaviour)}"}
        )
        assert status == 201, body
        created.append(body)
    ended = await asyncio.gather(*(call_ended(gateway, c["id"]) for c in created))

    after = await scrape(gateway)
    expected_outcomes: dict[str, float] = {}
    expected_causes: dict[str, float] = {}
    for _, outcome, cause in PLAN:
        expected_outcomes[outcome] = expected_outcomes.get(outcome, 0) + 1
        expected_causes[cause] = expected_causes.get(cause, 0) + 1
    assert by_label(after["otp_calls_total"], "outcome") == expected_outcomes
    assert by_label(after["otp_call_hangup_causes_total"], "cause") == expected_causes
    # Every outcome is exported, at 0 until it happens.
    assert {dict(k)["outcome"] for k in after["otp_calls_total"]} == {
        *(o.value for o in Outcome),
        CANCELED,
    }

    # One latency observation per call that rang, each the POST-to-ringing time.
    rang = [v for v in ended if v["call"]["ringing_at"] is not None]
    assert after["otp_call_ringing_latency_seconds_count"][()] == len(rang) >= 3
    assert 0 < after["otp_call_ringing_latency_seconds_sum"][()] < 2 * len(rang)

    requests = after["otp_http_requests_total"]
    route = (("method", "POST"), ("route", "/v1/verifications"), ("status", "201"))
    assert requests[route] == len(PLAN)
    polled = by_label(
        {k: v for k, v in requests.items() if ("route", "/v1/verifications/{id}") in k}, "status"
    )
    assert set(polled) == {"200"}  # GETs counted under the route template, never the raw id

    failed = sum(
        1 for _, outcome, _ in PLAN if outcome not in ("delivered", "answered", "progress_only")
    )
    statuses = by_label(after["otp_verifications_total"], "status")
    assert statuses == {"pending": len(PLAN), "failed": failed}
    assert after["otp_calls_in_flight"][()] == 0
    assert after["otp_calls_queued"][()] == 0
    assert after["otp_webhooks_pending"][()] == 0
    assert after["otp_ami_reconnects_total"][()] == 0


async def test_rate_limit_refusals_are_counted_by_limit(gateway: Gateway, far_end: FarEnd) -> None:
    phone = f"+{phone_number(0)}"  # rings for 2 s: each stays pending until superseded
    statuses = [(await gateway.post("/v1/verifications", {"phone": phone}))[0] for _ in range(4)]
    assert statuses == [201, 201, 201, 429]  # limits.per_phone: 3 in 10 minutes
    metrics = await scrape(gateway)
    assert by_label(metrics["otp_rate_limited_total"], "limit") == {"phone": 1}
    # Each new verification superseded the one before it (same key, same phone).
    statuses_seen = by_label(metrics["otp_verifications_total"], "status")
    assert statuses_seen["pending"] == 3
    assert statuses_seen["canceled"] == 2
