"""gateway.numbers on a real SQLite store: lookups with what calls taught about each
number, the health listing and its cursor, the resets, and the delivery statistics."""

from __future__ import annotations

import base64
import itertools
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import NumbersConfig
from gateway.errors import InvalidPhone, InvalidRequest
from gateway.numbers import Numbers
from gateway.outcomes import DELIVERED_OUTCOMES, UNCERTAIN_OUTCOMES, Outcome, health_of
from gateway.store import (
    CallStatus,
    Channel,
    CheckSource,
    NumberHealthRecord,
    Store,
    open_store,
)
from tests.conftest import make_call, make_config, make_verification

NOW = 1_700_000_000.0  # the Numbers' clock
DAY = 86400.0
MOBILE = "+6281234567890"
OTHER = "+6281298765432"
KNOWN_INVALID = "+6281311111111"
LONG_INVALID = "+6281322222222"
NEVER_CALLED = "+6281399999999"

_serial = itertools.count(1)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite3"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(db_path)
    yield opened
    await opened.close()


def numbers_on(store: Store, db_path: Path, **policy: Any) -> Numbers:
    """Numbers under the `numbers` settings `policy` (the defaults otherwise), at NOW."""
    config = make_config(f"sqlite:///{db_path}", numbers=NumbersConfig(**policy))
    return Numbers(config, store, clock=lambda: NOW)


@pytest.fixture
def numbers(store: Store, db_path: Path) -> Numbers:
    return numbers_on(store, db_path)


async def called(
    store: Store,
    phone: str,
    outcome: Outcome,
    at: float,
    *,
    carrier: str | None = "Telkomsel",
    reason: str | None = None,
    dialed: bool = True,
    channel: Channel = Channel.FLASHCALL,
) -> str:
    """A verification to `phone` whose call was dialed (unless not `dialed`) and ended
    at `at` with `outcome`, stored as the dialer stores it; its id."""
    n = next(_serial)
    vid, cid = f"vrf_{n}", f"call_{n}"
    queued_at = at - 10
    await store.create_verification(
        make_verification(
            vid,
            phone=phone,
            created_at=queued_at,
            api_key_id=f"key_{n}",  # each its own: a new one never supersedes another
            carrier=carrier,
            channels=channel.value,
        ),
        make_call(cid, vid, phone=phone, queued_at=queued_at, channel=channel),
    )
    if dialed:
        await store.call_progress(cid, CallStatus.DIALING, "dialed_at", queued_at + 1, "dialing")
    delivered, uncertain = outcome in DELIVERED_OUTCOMES, outcome in UNCERTAIN_OUTCOMES
    await store.end_call(
        cid,
        call_status=CallStatus.COMPLETED if delivered or uncertain else CallStatus.FAILED,
        outcome=outcome,
        cause=None,
        sip_code=None,
        reason=reason,
        at=at,
        fail_verification=not (delivered or uncertain),
        health=health_of(outcome),
        delivered=delivered,
        uncertain=uncertain,
    )
    return vid


def status_of(record: NumberHealthRecord | None) -> str | None:
    return None if record is None else record.status


# -- lookup and describe --------------------------------------------------------


async def test_lookup_describes_each_entry_in_order_with_its_health(
    numbers: Numbers, store: Store
) -> None:
    await called(store, MOBILE, Outcome.DELIVERED, NOW - DAY)
    await called(store, KNOWN_INVALID, Outcome.INVALID_NUMBER, NOW - 2 * DAY)
    await called(store, LONG_INVALID, Outcome.INVALID_NUMBER, NOW - 40 * DAY)
    await called(store, OTHER, Outcome.UNREACHABLE, NOW - DAY)
    entries: list[object] = [
        MOBILE,
        OTHER,
        "0813-1111-1111",  # KNOWN_INVALID, written nationally
        LONG_INVALID,
        NEVER_CALLED,
        "+62215551234",  # a Jakarta landline
        "+14155552671",  # a US number
        "not a number",
        42,
        None,
    ]

    described = await numbers.lookup(entries)

    assert [
        (d["input"], d["e164"], d["callable"], d["refused_by"], status_of(record))
        for d, record in described
    ] == [
        (MOBILE, MOBILE, True, None, "reachable"),
        (OTHER, OTHER, True, None, "unreachable"),  # switched off, maybe: tried again
        ("0813-1111-1111", KNOWN_INVALID, False, "number_known_invalid", "invalid"),
        # Called invalid 40 days ago, beyond refuse_invalid_days (30): tried again.
        (LONG_INVALID, LONG_INVALID, True, None, "invalid"),
        (NEVER_CALLED, NEVER_CALLED, True, None, None),
        ("+62215551234", "+62215551234", False, "phone_type_not_allowed", None),
        ("+14155552671", "+14155552671", False, "region_not_allowed", None),
        ("not a number", None, False, "invalid_phone", None),
        (42, None, False, "invalid_phone", None),
        (None, None, False, "invalid_phone", None),
    ]
    detail, record = described[0]
    assert (detail["type"], detail["region"], detail["carrier"]) == ("mobile", "ID", "Telkomsel")
    assert record is not None
    assert (record.last_outcome, record.last_call_at, record.calls, record.delivered) == (
        "delivered",
        NOW - DAY,
        1,
        1,
    )


async def test_a_number_called_invalid_is_refused_for_refuse_invalid_days(
    store: Store, db_path: Path
) -> None:
    """Refused while its invalid verdict is younger than numbers.refuse_invalid_days
    (to the second), never with 0; a later delivery clears the verdict."""
    inside, outside, fresh = "+6281300000001", "+6281300000002", "+6281300000003"
    await called(store, inside, Outcome.INVALID_NUMBER, NOW - 30 * DAY + 1)
    await called(store, outside, Outcome.INVALID_NUMBER, NOW - 30 * DAY - 1)
    await called(store, fresh, Outcome.INVALID_NUMBER, NOW - 60)
    await called(store, MOBILE, Outcome.INVALID_NUMBER, NOW - 5 * DAY)
    await called(store, MOBILE, Outcome.DELIVERED, NOW - DAY)  # reassigned, and it rang

    async def refused(numbers: Numbers, phone: str) -> bool:
        detail, record = await numbers.describe(phone)
        assert record is not None
        return not detail["callable"] and detail["refused_by"] == "number_known_invalid"

    thirty_days = numbers_on(store, db_path)
    assert [await refused(thirty_days, p) for p in (inside, outside, fresh, MOBILE)] == [
        True,
        False,
        True,
        False,
    ]
    week = numbers_on(store, db_path, refuse_invalid_days=7)
    assert [await refused(week, p) for p in (inside, fresh)] == [False, True]
    never = numbers_on(store, db_path, refuse_invalid_days=0)
    assert [await refused(never, p) for p in (inside, fresh)] == [False, False]


async def test_describe_reads_a_number_in_the_region_given_or_the_default(
    store: Store, db_path: Path
) -> None:
    malaysian = "012-345 6789"  # a Maxis mobile, written as in Malaysia
    numbers = numbers_on(store, db_path)
    assert (await numbers.describe(malaysian))[0]["reason"] == "invalid_for_region"  # in ID
    detail, record = await numbers.describe(malaysian, region="MY")
    assert (detail["e164"], detail["region"], detail["refused_by"]) == (
        "+60123456789",
        "MY",
        "region_not_allowed",
    )
    assert record is None
    both = numbers_on(store, db_path, default_region="MY", allowed_regions=("ID", "MY"))
    detail, _ = await both.describe(malaysian)
    assert (detail["e164"], detail["callable"]) == ("+60123456789", True)


# -- by_health -----------------------------------------------------------------


async def pages(numbers: Numbers, status: str, limit: int) -> list[list[str]]:
    """Every page of the listing, following the cursors to the end."""
    found: list[list[str]] = []
    cursor = None
    for _ in range(20):
        page, cursor = await numbers.by_health(status, cursor, limit)
        assert all(record.status == status for record in page)
        found.append([record.phone for record in page])
        if cursor is None:
            return found
    raise AssertionError(f"more than 20 pages: {found}")


async def test_by_health_pages_through_one_status_in_phone_order(
    numbers: Numbers, store: Store
) -> None:
    unreachable = [f"+628130000000{i}" for i in (4, 1, 5, 3, 2)]
    reachable = [f"+628120000000{i}" for i in (2, 4, 1, 3)]
    for phone in unreachable:
        await called(store, phone, Outcome.UNREACHABLE, NOW - 100)
    for phone in reachable:
        await called(store, phone, Outcome.BUSY, NOW - 100)  # busy: it is in service
    await called(store, KNOWN_INVALID, Outcome.INVALID_NUMBER, NOW - 100)
    await called(store, NEVER_CALLED, Outcome.CONGESTION, NOW - 100)  # says nothing: unknown

    by_two = sorted(unreachable)
    assert await pages(numbers, "unreachable", 2) == [by_two[:2], by_two[2:4], by_two[4:]]
    assert await pages(numbers, "unreachable", 1) == [[phone] for phone in by_two]
    # A last page that is full has no cursor after it: no empty page to fetch.
    assert await pages(numbers, "reachable", 2) == [sorted(reachable)[:2], sorted(reachable)[2:]]
    assert await pages(numbers, "invalid", 1000) == [[KNOWN_INVALID]]


@pytest.mark.parametrize(
    ("status", "cursor", "limit"),
    [
        ("unknown", None, 10),  # not listed: every number never called is unknown
        ("blocked", None, 10),
        ("reachable", None, 0),
        ("reachable", None, 1001),
        ("reachable", "%%%", 10),
        ("reachable", base64.urlsafe_b64encode(b"not-a-phone").decode(), 10),
    ],
)
async def test_by_health_refuses_what_it_cannot_list(
    numbers: Numbers, status: str, cursor: str | None, limit: int
) -> None:
    with pytest.raises(InvalidRequest):
        await numbers.by_health(status, cursor, limit)


async def test_by_health_takes_up_to_a_thousand(numbers: Numbers, store: Store) -> None:
    await called(store, MOBILE, Outcome.DELIVERED, NOW - 100)
    page, cursor = await numbers.by_health("reachable", None, 1000)
    assert ([r.phone for r in page], cursor) == ([MOBILE], None)


# -- resets --------------------------------------------------------------------


async def test_reset_forgets_one_numbers_health(numbers: Numbers, store: Store) -> None:
    await called(store, KNOWN_INVALID, Outcome.INVALID_NUMBER, NOW - DAY)
    await called(store, OTHER, Outcome.DELIVERED, NOW - DAY)
    assert (await numbers.describe(KNOWN_INVALID))[0]["callable"] is False

    assert await numbers.reset("0813 1111 1111") is True  # written nationally

    detail, record = await numbers.describe(KNOWN_INVALID)
    assert (detail["callable"], record) == (True, None)  # reassigned: called again
    assert status_of((await numbers.describe(OTHER))[1]) == "reachable"
    assert await numbers.reset(KNOWN_INVALID) is False  # nothing left to forget
    assert await numbers.reset(NEVER_CALLED) is False
    with pytest.raises(InvalidPhone):
        await numbers.reset("not a number")


async def test_reset_failed_checks_forgets_every_keys_wrong_codes_for_one_number(
    numbers: Numbers, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    mine = await called(store, MOBILE, Outcome.DELIVERED, NOW)
    theirs = await called(store, MOBILE, Outcome.DELIVERED, NOW)  # another API key's
    elsewhere = await called(store, OTHER, Outcome.DELIVERED, NOW)
    for vid in (mine, mine, theirs, elsewhere):
        assert await store.spend_attempt(vid, False, NOW + 1) is not None
    caplog.set_level(logging.INFO, logger="gateway.numbers")

    assert await numbers.reset_failed_checks("0812-3456-7890", by_key="key_admin") == 3

    assert await numbers.reset_failed_checks(MOBILE, by_key="key_admin") == 0
    assert await numbers.reset_failed_checks(OTHER, by_key="key_admin") == 1  # untouched
    [first, *_] = [r.getMessage() for r in caplog.records if r.name == "gateway.numbers"]
    assert first.startswith("3 wrong checks against +62812") and "key_admin" in first
    assert MOBILE not in caplog.text and MOBILE[1:] not in caplog.text  # masked


# -- stats ---------------------------------------------------------------------


async def test_stats_count_calls_that_ended_in_the_window_by_carrier_and_outcome(
    numbers: Numbers, store: Store
) -> None:
    since, until = NOW - 3600, NOW
    await called(store, MOBILE, Outcome.DELIVERED, since)  # the window's first instant
    await called(store, MOBILE, Outcome.DELIVERED, NOW - 100)
    await called(store, MOBILE, Outcome.BUSY, NOW - 200)
    await called(store, MOBILE, Outcome.PROGRESS_ONLY, NOW - 300)
    await called(store, OTHER, Outcome.ANSWERED, NOW - 50, carrier="Indosat")
    await called(store, OTHER, Outcome.INVALID_NUMBER, NOW - 60, carrier="Indosat")
    await called(store, NEVER_CALLED, Outcome.UNREACHABLE, NOW - 70, carrier=None)
    # Not counted: after the window, before it, canceled by the gateway, never dialed.
    await called(store, MOBILE, Outcome.DELIVERED, until)
    await called(store, MOBILE, Outcome.DELIVERED, since - 1)
    await called(store, MOBILE, Outcome.ERROR, NOW - 10, reason="canceled")
    await called(store, MOBILE, Outcome.ERROR, NOW - 10, reason="pbx_unavailable", dialed=False)

    stats = await numbers.stats(since, until)

    # No verification approved: no code's source to count (test_stats_count_how_...).
    none_said = {"intercepted": 0, "manual": 0, "unspecified": 0, "intercepted_share": None}
    assert stats.pop("approved_by_source") == none_said
    assert [c.pop("approved_by_source") for c in stats["by_carrier"]] == [none_said] * 3
    counted = {"delivered": 2, "answered": 1, "busy": 1, "progress_only": 1}
    counted |= {"invalid_number": 1, "unreachable": 1}
    assert stats == {
        "calls": 7,
        "delivered": 3,
        "uncertain": 1,
        "failed": 3,
        "delivery_rate": 0.4286,
        "by_outcome": {outcome.value: counted.get(outcome.value, 0) for outcome in Outcome},
        "by_carrier": [
            {
                "carrier": "Telkomsel",
                "calls": 4,
                "delivered": 2,
                "uncertain": 1,
                "failed": 1,
                "delivery_rate": 0.5,
                "by_outcome": {"busy": 1, "delivered": 2, "progress_only": 1},
            },
            {
                "carrier": "Indosat",  # fewer calls than Telkomsel: after it
                "calls": 2,
                "delivered": 1,
                "uncertain": 0,
                "failed": 1,
                "delivery_rate": 0.5,
                "by_outcome": {"answered": 1, "invalid_number": 1},
            },
            {
                "carrier": "unknown",
                "calls": 1,
                "delivered": 0,
                "uncertain": 0,
                "failed": 1,
                "delivery_rate": 0.0,
                "by_outcome": {"unreachable": 1},
            },
        ],
        "by_channel": [
            {
                "channel": "flashcall",
                "calls": 7,
                "delivered": 3,
                "uncertain": 1,
                "failed": 3,
                "delivery_rate": 0.4286,
                "approved": 0,
                "approval_rate": 0.0,
                "by_outcome": {k: v for k, v in counted.items() if v},
            },
            {
                "channel": "voice",
                "calls": 0,
                "delivered": 0,
                "uncertain": 0,
                "failed": 0,
                "delivery_rate": None,
                "approved": 0,
                "approval_rate": None,
                "by_outcome": {},
            },
        ],
    }


async def test_stats_count_how_the_approved_codes_were_obtained_by_carrier(
    numbers: Numbers, store: Store
) -> None:
    checks = [
        (MOBILE, "Telkomsel", CheckSource.INTERCEPTED),
        (MOBILE, "Telkomsel", CheckSource.INTERCEPTED),
        (MOBILE, "Telkomsel", CheckSource.MANUAL),
        (MOBILE, "Telkomsel", None),  # the client did not say
        (OTHER, "Indosat", CheckSource.MANUAL),
    ]
    for phone, carrier, source in checks:
        vid = await called(store, phone, Outcome.DELIVERED, NOW - 100, carrier=carrier)
        assert await store.spend_attempt(vid, True, NOW - 50, source=source) is not None
    wrong = await called(store, OTHER, Outcome.DELIVERED, NOW - 100, carrier="Indosat")
    # A wrong code's source counts nothing: only approvals do.
    assert await store.spend_attempt(wrong, False, NOW - 50, source=CheckSource.MANUAL)

    stats = await numbers.stats(NOW - 3600, NOW)

    assert stats["approved_by_source"] == {
        "intercepted": 2,
        "manual": 2,
        "unspecified": 1,
        "intercepted_share": 0.5,
    }
    by_carrier = {c["carrier"]: c["approved_by_source"] for c in stats["by_carrier"]}
    assert by_carrier == {
        "Telkomsel": {"intercepted": 2, "manual": 1, "unspecified": 1, "intercepted_share": 0.6667},
        "Indosat": {"intercepted": 0, "manual": 1, "unspecified": 0, "intercepted_share": 0.0},
    }
    found = await store.verification(wrong)
    assert found is not None and found[0].check_source is None


async def test_stats_split_delivery_and_approval_by_channel(numbers: Numbers, store: Store) -> None:
    flash = await called(store, MOBILE, Outcome.DELIVERED, NOW - 100)
    await called(store, MOBILE, Outcome.BUSY, NOW - 90)
    spoken = await called(store, OTHER, Outcome.SPOKEN, NOW - 80, channel=Channel.VOICE)
    await called(store, OTHER, Outcome.SPOKEN, NOW - 70, channel=Channel.VOICE)
    await called(store, OTHER, Outcome.NO_ANSWER, NOW - 60, channel=Channel.VOICE)
    await called(store, OTHER, Outcome.ANSWERED_EARLY, NOW - 50, channel=Channel.VOICE)
    for vid in (flash, spoken):  # the right code: approved
        assert await store.spend_attempt(vid, True, NOW - 10) is not None

    by_channel = {c["channel"]: c for c in (await numbers.stats(NOW - 3600, NOW))["by_channel"]}

    flashcall, voice = by_channel["flashcall"], by_channel["voice"]
    assert (flashcall["calls"], flashcall["delivered"], flashcall["approved"]) == (2, 1, 1)
    assert (voice["calls"], voice["delivered"], voice["failed"], voice["approved"]) == (4, 2, 2, 1)
    assert (voice["delivery_rate"], voice["approval_rate"]) == (0.5, 0.25)
    assert voice["by_outcome"] == {"spoken": 2, "no_answer": 1, "answered_early": 1}


async def test_stats_of_a_window_without_calls(numbers: Numbers, store: Store) -> None:
    await called(store, MOBILE, Outcome.DELIVERED, NOW - 100)
    stats = await numbers.stats(NOW, NOW + 3600)
    assert (stats["calls"], stats["delivered"], stats["failed"]) == (0, 0, 0)
    assert (stats["delivery_rate"], stats["by_carrier"]) == (None, [])
    assert stats["by_outcome"] == {outcome.value: 0 for outcome in Outcome}
