"""The verification domain on a real store and real pools, dialing through a FakePbx."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway import verifications as verifications_module
from gateway.config import CallsConfig, LimitsConfig, VerificationConfig, VoiceConfig
from gateway.dialer import PBX_CAP_MARGIN_S, Dialer
from gateway.errors import (
    ChannelUnavailable,
    InvalidPhone,
    InvalidRequest,
    NoNextChannel,
    NotFound,
    NumberKnownInvalid,
    PbxUnavailable,
    PhoneTypeNotAllowed,
    RateLimited,
    RegionNotAllowed,
    UnknownChannel,
    UnknownLocale,
    VerificationNotPending,
)
from gateway.instances import Membership
from gateway.nodes import Nodes
from gateway.pbx import CHANNEL_ID_PREFIX, CallEventKind, Dial, Speech
from gateway.pool import Pool
from gateway.store import CallEventRecord, CallRecord, Store, VerificationRecord, open_store
from gateway.verifications import (
    PBX_RETRY_AFTER_S,
    VOICE_PBX_MARGIN_S,
    NewVerification,
    Verifications,
)
from tests.conftest import (
    TEST_POOL,
    NewDatabase,
    make_call,
    make_config,
    make_verification,
    raw_query,
)
from tests.fakes import (
    WAIT_S,
    FakePbx,
    Fate,
    by_last_digit,
    fresh_mobile,
    listened,
    rings_until_hung_up,
    talks_on,
    until,
    voice_listened,
)

KEY = "key_a"
OTHER_KEY = "key_b"
THIRD_KEY = "key_c"
DAY = 86400.0
TTL_S = 300
MAX_ATTEMPTS = 5


class Clock:
    """A settable wall clock for the TTL; `running`, it goes on with the dialer's (real)
    clock from where it was set, as the next steps' times are the dialer's."""

    def __init__(self, running: bool = False) -> None:
        self.running = running
        self._set, self._set_at = time.time(), time.time()

    @property
    def now(self) -> float:
        return self._set + (time.time() - self._set_at if self.running else 0.0)

    @now.setter
    def now(self, value: float) -> None:
        self._set, self._set_at = value, time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclasses.dataclass
class Domain:
    """Verifications wired to a store, pools and a dialer on a FakePbx."""

    verifications: Verifications
    store: Store
    pbx: FakePbx
    dialer: Dialer
    clock: Clock
    database: str

    async def create(self, phone: str, key: str = KEY, **fields: object) -> VerificationRecord:
        verification, _ = await self.verifications.create(
            NewVerification(api_key_id=key, phone=phone, **fields)  # type: ignore[arg-type]
        )
        return verification

    async def dial_of(self, verification: VerificationRecord) -> Dial:
        """The Dial that reached the PBX for `verification`."""
        _, call = await self.call_of(verification)

        async def placed() -> Dial | None:
            return next((d for d in self.pbx.placed if d.channel_id == call.id), None)

        dial = await until(placed)
        assert dial is not None
        return dial

    async def code_of(self, verification: VerificationRecord) -> str:
        """The code, as the user reads it: the trailing digits of the caller ID."""
        dial = await self.dial_of(verification)
        return dial.caller_id[-verification.cli_length :]

    async def call_of(
        self, verification: VerificationRecord
    ) -> tuple[VerificationRecord, CallRecord]:
        found = await self.store.verification(verification.id)
        assert found is not None
        return found

    async def until_call(
        self, verification: VerificationRecord, done: Callable[[CallRecord], bool]
    ) -> CallRecord:
        """The verification's call, once `done(call)` holds."""

        async def probe() -> CallRecord | None:
            _, call = await self.call_of(verification)
            return call if done(call) else None

        call = await until(probe)
        assert call is not None
        return call

    async def rows(self, table: str) -> int:
        return int((await raw_query(self.database, f"SELECT COUNT(*) FROM {table}"))[0][0])


DomainFactory = Callable[..., Awaitable[Domain]]


@pytest.fixture
async def make_domain(new_database: NewDatabase) -> AsyncIterator[DomainFactory]:
    """Build a domain (a config override, a PBX script); everything stops after the test."""
    started: list[Domain] = []

    async def make(
        code_length: int = 4,
        script: Callable[[Dial], Fate] = by_last_digit,
        test_numbers: dict[str, str] | None = None,
        limits: LimitsConfig | None = None,
        voice: VoiceConfig | None = None,
        steps: bool = False,
    ) -> Domain:
        """`steps`: the verifications' loops run (next steps, expiry), on a running clock."""
        database = new_database()
        config = make_config(
            database,
            pools=(dataclasses.replace(TEST_POOL, code_length=code_length),),
            calls=CallsConfig(ring_seconds=1, max_concurrent=50, max_per_second=1000),
            verification=VerificationConfig(ttl_seconds=TTL_S, max_attempts=MAX_ATTEMPTS),
            test_numbers=test_numbers or {},
            limits=limits or LimitsConfig(),
            voice=voice or VoiceConfig(),
        )
        store = await open_store(database)
        pools = [Pool(p) for p in config.pools]
        by_name = {p.name: p for p in pools}

        def release_cli(pool: str, cli: str) -> None:
            by_name[pool].release(cli)

        pbx = FakePbx(script)
        dialer = Dialer(Nodes.one(pbx, config.calls), store, config.calls, release_cli)
        clock = Clock(running=steps)
        verifications = Verifications(config, store, pools, dialer, clock=clock)
        dialer.on_ended = verifications.call_ended  # as the app wires them
        domain = Domain(verifications, store, pbx, dialer, clock, database)
        started.append(domain)
        dialer.start()
        if steps:
            verifications.start()
        return domain

    yield make
    for domain in started:
        await domain.verifications.stop()
        await domain.dialer.stop()
        await domain.pbx.close()
        await domain.store.close()


@pytest.fixture
async def domain(make_domain: DomainFactory) -> Domain:
    return await make_domain()


# -- create --------------------------------------------------------------------


async def test_create_stores_and_dials(domain: Domain) -> None:
    verification = await domain.create("0812-3456-7890", reference="order-1")

    assert verification.status == "pending"
    assert verification.phone == "+6281234567890"
    assert verification.reference == "order-1"
    assert verification.attempts_remaining == MAX_ATTEMPTS
    assert verification.expires_at == domain.clock.now + TTL_S
    assert verification.id.startswith("vrf_") and len(verification.id) >= 4 + 32
    dial = await domain.dial_of(verification)
    assert dial.number == "6281234567890"  # e164_no_plus, the default dial_format
    assert dial.caller_id.startswith("6221500") and len(dial.caller_id) == 11
    # Originate's Timeout is a cap: post-dial delay, the ring time, then a margin.
    assert dial.timeout_seconds == 15 + 1 + PBX_CAP_MARGIN_S
    # The AMI user's event filter hears only calls whose ChannelId has the prefix.
    assert dial.channel_id.startswith(CHANNEL_ID_PREFIX)


async def test_a_create_with_room_to_dial_is_stored_dialing_in_its_own_commit(
    domain: Domain,
) -> None:
    """Nothing waiting: the call is stored dialing with its creation and placed."""
    verification = await domain.create("081234567890")
    found = await domain.store.verification(verification.id)
    assert found is not None
    call = found[1]
    assert (call.status, call.dialed_at) == ("dialing", domain.clock.now)
    events = await domain.store.call_events(call.id)
    assert [(e.kind, e.at) for e in events][:1] == [("dialing", domain.clock.now)]
    await domain.dial_of(verification)


def hold_after_commit(
    domain: Domain, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold each create after its commit (where a request's timeout can land) until
    `resume` is set; `committed` is set once it is stored."""
    committed, resume = asyncio.Event(), asyncio.Event()
    real = domain.store.create_verification

    async def slow_return(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)
        committed.set()
        await resume.wait()
        return result

    monkeypatch.setattr(domain.store, "create_verification", slow_return)
    return committed, resume


@pytest.mark.parametrize("pbx_up", [True, False])  # claimed and placed, or queued
async def test_a_create_canceled_after_its_commit_still_places_its_call(
    domain: Domain, monkeypatch: pytest.MonkeyPatch, pbx_up: bool
) -> None:
    committed, resume = hold_after_commit(domain, monkeypatch)
    domain.pbx.connected = pbx_up
    request = asyncio.create_task(domain.create("081234567890"))
    await committed.wait()
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    resume.set()
    domain.pbx.connected = True

    async def placed() -> bool:
        return len(domain.pbx.placed) == 1

    await until(placed)  # stored, so called: not left for the next start to find
    assert await domain.rows("verifications") == 1


async def test_stop_waits_for_a_create_whose_request_gave_up(
    domain: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed, resume = hold_after_commit(domain, monkeypatch)
    request = asyncio.create_task(domain.create("081234567890"))
    await committed.wait()
    request.cancel()
    stopping = asyncio.create_task(domain.verifications.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # the dialer must not stop before the call reaches it
    resume.set()
    await stopping

    async def placed() -> bool:
        return len(domain.pbx.placed) == 1

    await until(placed)


async def test_a_create_behind_a_waiting_call_is_queued(domain: Domain) -> None:
    domain.pbx.connected = False  # the first waits for the PBX
    first = await domain.create("081234567890")
    second = await domain.create("081234567891")
    for created in (first, second):
        _, call = await domain.call_of(created)
        assert call.status == "queued"
    domain.pbx.connected = True
    await domain.dial_of(second)


async def test_create_refused_while_the_pbx_has_been_down_past_its_wait(
    domain: Domain,
) -> None:
    domain.pbx.lost_ami(seconds_ago=CallsConfig().pbx_wait_seconds + 1)
    with pytest.raises(PbxUnavailable) as refused:
        await domain.create("081234567890")
    assert refused.value.retry_after == PBX_RETRY_AFTER_S
    assert (await domain.rows("verifications"), await domain.rows("calls")) == (0, 0)
    # Bad input is still told as such, not as a PBX problem.
    with pytest.raises(InvalidPhone):
        await domain.create("12345")
    domain.pbx.connected = True
    await domain.dial_of(await domain.create("081234567890"))


async def test_a_sandbox_number_is_served_while_the_pbx_is_long_gone(
    make_domain: DomainFactory,
) -> None:
    domain = await make_domain(test_numbers={"+6281234567890": "1234"})
    domain.pbx.lost_ami(seconds_ago=CallsConfig().pbx_wait_seconds + 1)
    verification = await domain.create("081234567890")  # nobody is called
    _, call = await domain.call_of(verification)
    assert (call.status, call.outcome, call.reason) == ("completed", "delivered", "sandbox")
    with pytest.raises(PbxUnavailable):
        await domain.create("081234567891")  # a real number still needs the PBX


async def test_a_short_pbx_loss_is_absorbed_by_the_queue(domain: Domain) -> None:
    domain.pbx.lost_ami(seconds_ago=CallsConfig().pbx_wait_seconds - 2)
    verification = await domain.create("081234567890")
    _, call = await domain.call_of(verification)
    assert call.status == "queued"
    domain.pbx.connected = True
    await domain.dial_of(verification)


@pytest.mark.parametrize(
    ("phone", "error"),
    [
        ("12345", InvalidPhone),
        ("not a phone", InvalidPhone),
        ("+6281234567890\r\n", InvalidPhone),
        ("+62215551234", PhoneTypeNotAllowed),  # a Jakarta landline
        ("+14155552671", RegionNotAllowed),  # a valid US number
    ],
)
async def test_create_validates_before_storing(
    domain: Domain, phone: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await domain.create(phone)

    assert await domain.rows("verifications") == 0
    assert await domain.rows("calls") == 0
    assert (domain.dialer.queued, domain.dialer.in_flight) == (0, 0)
    assert domain.pbx.dials == []


async def test_create_refuses_ring_seconds_over_the_limit(domain: Domain) -> None:
    with pytest.raises(InvalidRequest):
        await domain.create(fresh_mobile(), ring_seconds=60)

    assert await domain.rows("verifications") == 0
    assert domain.dialer.queued == 0


# -- check ---------------------------------------------------------------------


async def test_right_code_approves(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile())
    code = await domain.code_of(verification)

    result = await domain.verifications.check(KEY, verification.id, code, None)

    assert result.valid
    assert result.verification.status == "approved"
    assert result.verification.attempts_remaining == MAX_ATTEMPTS


@pytest.mark.parametrize("form", ["e164", "digits", "spaced", "national"])
async def test_right_cli_approves(domain: Domain, form: str) -> None:
    verification = await domain.create(fresh_mobile())
    caller_id = "+" + (await domain.dial_of(verification)).caller_id  # +62215001234
    cli = {
        "e164": caller_id,
        "digits": caller_id[1:],  # as the trunk presented it (cli_format e164_no_plus)
        "spaced": f"{caller_id[:3]} {caller_id[3:5]} {caller_id[5:9]} {caller_id[9:]}",
        "national": "0" + caller_id[3:],  # how a phone's call log may show it
    }[form]

    result = await domain.verifications.check(KEY, verification.id, None, cli)

    assert result.valid and result.verification.status == "approved"


async def test_right_cli_approves_for_an_eight_digit_pool(make_domain: DomainFactory) -> None:
    domain = await make_domain(code_length=8)
    verification = await domain.create(fresh_mobile())
    cli = "+" + (await domain.dial_of(verification)).caller_id

    result = await domain.verifications.check(KEY, verification.id, None, cli)

    assert result.valid


async def test_check_by_phone(domain: Domain) -> None:
    phone = fresh_mobile()
    verification = await domain.create(phone)
    code = await domain.code_of(verification)

    wrong = await domain.verifications.check_by_phone(KEY, phone, None, "0" * 5, None)
    right = await domain.verifications.check_by_phone(KEY, phone[3:], "ID", code, None)

    assert (wrong.valid, wrong.verification.attempts_remaining) == (False, MAX_ATTEMPTS - 1)
    assert right.valid and right.verification.id == verification.id


async def test_wrong_codes_spend_attempts_until_none_remain(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile())
    code = await domain.code_of(verification)
    wrong = f"{(int(code) + 1) % 10_000:04d}"

    remaining = []
    for _ in range(MAX_ATTEMPTS):
        result = await domain.verifications.check(KEY, verification.id, wrong, None)
        assert not result.valid
        remaining.append(result.verification.attempts_remaining)

    assert remaining == [4, 3, 2, 1, 0]
    assert result.verification.status == "max_attempts_reached"
    with pytest.raises(VerificationNotPending) as refused:
        await domain.verifications.check(KEY, verification.id, code, None)
    assert refused.value.extra["verification_status"] == "max_attempts_reached"


async def test_a_wrong_cli_spends_an_attempt(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile())

    result = await domain.verifications.check(KEY, verification.id, None, "+6281234567890")

    assert not result.valid
    assert result.verification.attempts_remaining == MAX_ATTEMPTS - 1


MALFORMED_CHECKS = [
    (None, None),
    ("1234", "+622150001234"),
    ("12a4", None),
    ("", None),
    ("1" * 17, None),
    (None, "private number"),  # no reading of it is a number
    (None, "+62 21 5OO 1234"),
]


@pytest.mark.parametrize(("code", "cli"), MALFORMED_CHECKS)
async def test_malformed_check_spends_nothing(
    domain: Domain, code: str | None, cli: str | None
) -> None:
    verification = await domain.create(fresh_mobile())

    with pytest.raises(InvalidRequest):
        await domain.verifications.check(KEY, verification.id, code, cli)

    current, _ = await domain.verifications.get(KEY, verification.id)
    assert current.attempts_remaining == MAX_ATTEMPTS


async def test_an_approved_verification_refuses_further_checks(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile())
    code = await domain.code_of(verification)
    await domain.verifications.check(KEY, verification.id, code, None)

    with pytest.raises(VerificationNotPending) as refused:
        await domain.verifications.check(KEY, verification.id, code, None)

    assert refused.value.extra["verification_status"] == "approved"


async def test_concurrent_wrong_checks_never_overspend(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile())
    code = await domain.code_of(verification)
    wrong = f"{(int(code) + 1) % 10_000:04d}"

    results = await asyncio.gather(
        *(domain.verifications.check(KEY, verification.id, wrong, None) for _ in range(20)),
        return_exceptions=True,
    )

    checked = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(checked) == MAX_ATTEMPTS and not any(r.valid for r in checked)
    assert len(refused) == 20 - MAX_ATTEMPTS
    assert all(isinstance(r, VerificationNotPending) for r in refused)
    current, _ = await domain.verifications.get(KEY, verification.id)
    assert (current.status, current.attempts_remaining) == ("max_attempts_reached", 0)


async def test_concurrent_right_checks_approve_once(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile())
    code = await domain.code_of(verification)

    results = await asyncio.gather(
        *(domain.verifications.check(KEY, verification.id, code, None) for _ in range(10)),
        return_exceptions=True,
    )

    approved = [r for r in results if not isinstance(r, BaseException)]
    assert len(approved) == 1 and approved[0].valid
    assert all(isinstance(r, VerificationNotPending) for r in results if r not in approved)


@pytest.mark.parametrize(("code", "cli"), MALFORMED_CHECKS)
async def test_check_by_phone_validates_the_body_before_looking_anything_up(
    domain: Domain, code: str | None, cli: str | None
) -> None:
    """A malformed body is 400 whether or not something is pending (not 404, 409 or 429)."""
    with pytest.raises(InvalidRequest):
        await domain.verifications.check_by_phone(KEY, fresh_mobile(), None, code, cli)


async def wrong_code(domain: Domain, verification: VerificationRecord) -> str:
    return f"{(int(await domain.code_of(verification)) + 1) % 10_000:04d}"


async def spend_all_attempts(domain: Domain, verification: VerificationRecord, key: str) -> None:
    wrong = await wrong_code(domain, verification)
    for _ in range(MAX_ATTEMPTS):
        result = await domain.verifications.check(key, verification.id, wrong, None)
        assert not result.valid


async def failed_checks(domain: Domain, phone: str) -> int:
    """Wrong checks against `phone`, as its verifications count them."""
    rows = await raw_query(
        domain.database,
        f"SELECT COALESCE(SUM(failed_checks), 0) FROM verifications WHERE phone = '{phone}'",
    )
    return int(rows[0][0])


async def test_concurrent_wrong_checks_never_pass_the_phones_limit(domain: Domain) -> None:
    """Nine wrong codes recorded; five more at once while other work keeps the store
    busy (as a loaded gateway's does): one is checked, four are refused, never 14."""
    phone = fresh_mobile()
    first = await domain.create(phone)
    await spend_all_attempts(domain, first, KEY)
    second = await domain.create(phone)
    wrong = await wrong_code(domain, second)
    for _ in range(4):
        await domain.verifications.check(KEY, second.id, wrong, None)
    assert await failed_checks(domain, phone) == 9
    third = await domain.create(phone)
    wrong = await wrong_code(domain, third)

    busy = True

    async def other_requests() -> None:
        while busy:
            await domain.store.ping()

    load = asyncio.create_task(other_requests())
    await asyncio.sleep(0)
    try:
        results = await asyncio.gather(
            *(domain.verifications.check(KEY, third.id, wrong, None) for _ in range(5)),
            return_exceptions=True,
        )
    finally:
        busy = False
        await load

    assert len([r for r in results if not isinstance(r, BaseException)]) == 1
    assert [type(r) for r in results if isinstance(r, BaseException)] == [RateLimited] * 4
    assert await failed_checks(domain, phone) == 10


async def test_check_by_phone_finds_the_callers_own_verification(domain: Domain) -> None:
    phone = fresh_mobile()
    mine = await domain.create(phone)
    code = await domain.code_of(mine)
    await domain.create(phone, key=OTHER_KEY)  # newer, and another service's

    result = await domain.verifications.check_by_phone(KEY, phone, None, code, None)

    assert result.valid and result.verification.id == mine.id


async def test_a_strangers_wrong_checks_leave_the_owner_room(domain: Domain) -> None:
    """Ten wrong codes through another key lock that key out for the day, not this one."""
    phone = fresh_mobile()
    mine = await domain.create(phone)
    code = await domain.code_of(mine)
    for _ in range(2):
        await spend_all_attempts(domain, await domain.create(phone, key=OTHER_KEY), OTHER_KEY)

    result = await domain.verifications.check_by_phone(KEY, phone, None, code, None)

    assert result.valid and result.verification.status == "approved"
    domain.clock.advance(601)  # the phone's calls per ten minutes
    theirs = await domain.create(phone, key=OTHER_KEY)
    with pytest.raises(RateLimited) as refused:
        await domain.verifications.check(OTHER_KEY, theirs.id, await domain.code_of(theirs), None)
    assert refused.value.limit == "failed_checks"


async def test_wrong_checks_across_keys_stop_at_their_ceiling(make_domain: DomainFactory) -> None:
    domain = await make_domain(
        limits=LimitsConfig(
            failed_checks_per_phone_per_day=5, failed_checks_per_phone_per_day_all_keys=10
        )
    )
    phone = fresh_mobile()
    mine = await domain.create(phone)
    code = await domain.code_of(mine)
    for key in (OTHER_KEY, THIRD_KEY):
        await spend_all_attempts(domain, await domain.create(phone, key=key), key)

    with pytest.raises(RateLimited) as refused:
        await domain.verifications.check(KEY, mine.id, code, None)

    assert refused.value.limit == "failed_checks_all_keys"
    assert 0 < refused.value.retry_after <= DAY
    current, _ = await domain.verifications.get(KEY, mine.id)
    assert (current.status, current.attempts_remaining) == ("pending", MAX_ATTEMPTS)


async def test_the_30_day_window_refuses_until_it_passes(domain: Domain) -> None:
    """Twenty wrong codes in 30 days (ten a day, the daily limit): refused after the
    day's window has passed, until the oldest leave the 30 days."""
    phone = fresh_mobile()
    for _day in range(2):  # ten wrong codes a day, two days
        for _ in range(2):
            await spend_all_attempts(domain, await domain.create(phone), KEY)
            domain.clock.advance(601)
        domain.clock.advance(DAY)
    first_wrong_at = domain.clock.now - 2 * DAY - 4 * 601

    refused_at = domain.clock.now
    verification = await domain.create(phone)
    with pytest.raises(RateLimited) as refused:
        await domain.verifications.check(
            KEY, verification.id, await domain.code_of(verification), None
        )
    assert refused.value.limit == "failed_checks_30_days"
    frees_at = first_wrong_at + 30 * DAY  # the first five leave: room for one more
    assert refused.value.retry_after == pytest.approx(frees_at - refused_at, abs=2)

    domain.clock.now = frees_at + 1
    verification = await domain.create(phone)
    code = await domain.code_of(verification)
    result = await domain.verifications.check(KEY, verification.id, code, None)
    assert result.valid


async def test_code_hash_hides_the_code(make_domain: DomainFactory) -> None:
    # Eight digits: a 64-hex-digit hash holds a given 4-digit run by chance 1 time in 1,000.
    domain = await make_domain(code_length=8)
    verification = await domain.create(fresh_mobile())
    code = await domain.code_of(verification)

    stored, _ = await domain.call_of(verification)
    assert stored.code_hash != code
    assert code not in stored.code_hash
    assert stored.code_hash not in (
        hashlib.sha256(code.encode()).hexdigest(),
        hashlib.sha256(f"{verification.id}:{code}".encode()).hexdigest(),
    ), "the hash must be keyed by the server secret"
    assert all(code not in str(value) for value in dataclasses.astuple(stored))


async def test_a_failed_call_fails_the_verification(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile("3"))  # busy
    code = await domain.code_of(verification)
    await domain.until_call(verification, lambda call: call.ended_at is not None)

    with pytest.raises(VerificationNotPending) as refused:
        await domain.verifications.check(KEY, verification.id, code, None)

    assert refused.value.extra["verification_status"] == "failed"


async def test_a_delivered_call_leaves_the_verification_pending(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile("0"))
    code = await domain.code_of(verification)
    call = await domain.until_call(verification, lambda call: call.ended_at is not None)

    assert call.outcome == "delivered"
    result = await domain.verifications.check(KEY, verification.id, code, None)
    assert result.valid


# -- expiry --------------------------------------------------------------------


async def test_expires_with_the_clock(domain: Domain) -> None:
    verification = await domain.create(fresh_mobile())
    code = await domain.code_of(verification)

    domain.clock.advance(TTL_S - 1)
    still, _ = await domain.verifications.get(KEY, verification.id)
    assert still.status == "pending"

    domain.clock.advance(1)
    expired, _ = await domain.verifications.get(KEY, verification.id)
    assert expired.status == "expired"
    with pytest.raises(VerificationNotPending) as refused:
        await domain.verifications.check(KEY, verification.id, code, None)
    assert refused.value.extra["verification_status"] == "expired"


async def test_an_expired_verification_is_not_checked_by_phone(domain: Domain) -> None:
    phone = fresh_mobile()
    verification = await domain.create(phone)
    code = await domain.code_of(verification)
    domain.clock.advance(TTL_S + 1)

    with pytest.raises(VerificationNotPending):
        await domain.verifications.check_by_phone(KEY, phone, None, code, None)


# -- supersede and cancel ------------------------------------------------------


async def test_second_create_cancels_the_first_and_hangs_up(make_domain: DomainFactory) -> None:
    domain = await make_domain(script=rings_until_hung_up)
    phone = fresh_mobile()
    first = await domain.create(phone)
    await domain.until_call(first, lambda call: call.status == "ringing")

    second = await domain.create(phone)

    old, old_call = await domain.call_of(first)
    assert old.status == "canceled"
    assert domain.pbx.hangups == [old_call.id]
    old_call = await domain.until_call(first, lambda call: call.ended_at is not None)
    assert old_call.hangup_cause == 16
    assert (await domain.call_of(second))[0].status == "pending"
    await domain.dial_of(second)
    with pytest.raises(VerificationNotPending):
        await domain.verifications.check(KEY, first.id, "0000", None)


async def test_another_keys_create_leaves_the_first_pending(make_domain: DomainFactory) -> None:
    domain = await make_domain(script=rings_until_hung_up)
    phone = fresh_mobile()
    first = await domain.create(phone)
    await domain.until_call(first, lambda call: call.status == "ringing")

    await domain.create(phone, key=OTHER_KEY)

    mine, _ = await domain.call_of(first)
    assert mine.status == "pending"
    assert domain.pbx.hangups == []


async def test_cancel_hangs_up_a_ringing_call(make_domain: DomainFactory) -> None:
    domain = await make_domain(script=rings_until_hung_up)
    verification = await domain.create(fresh_mobile())
    await domain.until_call(verification, lambda call: call.status == "ringing")

    canceled, call = await domain.verifications.cancel(KEY, verification.id)

    assert canceled.status == "canceled"
    assert domain.pbx.hangups == [call.id]
    await domain.until_call(verification, lambda call: call.ended_at is not None)
    with pytest.raises(VerificationNotPending) as refused:
        await domain.verifications.cancel(KEY, verification.id)
    assert refused.value.extra["verification_status"] == "canceled"


# -- keys ----------------------------------------------------------------------


async def test_keys_cannot_reach_each_others_verifications(domain: Domain) -> None:
    phone = fresh_mobile()
    verification = await domain.create(phone)
    code = await domain.code_of(verification)
    other = domain.verifications

    with pytest.raises(NotFound):
        await other.get(OTHER_KEY, verification.id)
    with pytest.raises(NotFound):
        await other.check(OTHER_KEY, verification.id, code, None)
    with pytest.raises(NotFound):
        await other.check_by_phone(OTHER_KEY, phone, None, code, None)
    with pytest.raises(NotFound):
        await other.cancel(OTHER_KEY, verification.id)

    mine, _ = await domain.verifications.get(KEY, verification.id)
    assert (mine.status, mine.attempts_remaining) == ("pending", MAX_ATTEMPTS)


async def test_unknown_id_is_not_found(domain: Domain) -> None:
    with pytest.raises(NotFound):
        await domain.verifications.get(KEY, "vrf_" + "0" * 32)


# -- number health ---------------------------------------------------------------


async def test_invalid_number_is_refused_for_the_period_then_tried_once(domain: Domain) -> None:
    phone = fresh_mobile()[:-1] + "4"  # the fake answers 404: cause 1
    first = await domain.create(phone)
    await domain.until_call(first, lambda call: call.ended_at is not None)
    health = await domain.store.number_health(first.phone)
    assert health is not None
    assert (health.status, health.last_cause, health.calls) == ("invalid", 1, 1)

    dials = len(domain.pbx.dials)
    with pytest.raises(NumberKnownInvalid):
        await domain.create(phone)
    domain.clock.advance(29 * 86400)
    with pytest.raises(NumberKnownInvalid):
        await domain.create(phone)
    assert len(domain.pbx.dials) == dials

    domain.clock.advance(1 * 86400 + 1)
    retried = await domain.create(phone)
    await domain.until_call(retried, lambda call: call.ended_at is not None)
    assert len(domain.pbx.dials) == dials + 1
    with pytest.raises(NumberKnownInvalid):
        domain.clock.now = time.time()  # the retry failed again: refused anew
        await domain.create(phone)


async def test_reset_health_allows_the_next_call(domain: Domain) -> None:
    phone = fresh_mobile()[:-1] + "4"
    first = await domain.create(phone)
    await domain.until_call(first, lambda call: call.ended_at is not None)
    assert await domain.store.reset_number_health(first.phone)
    assert await domain.store.number_health(first.phone) is None
    await domain.create(phone)


# -- channels: flash call, then voice --------------------------------------------

# The voice calls of the domains below: the operator's number, a config default
# (fallback_after_seconds) the gateway's own default is not.
VOICE = VoiceConfig(caller_id="+622180001000", fallback_after_seconds=45)
FLASH_THEN_VOICE = ("flashcall", "voice")
JAKARTA_LANDLINE = "+622155501232"


@pytest.fixture
async def voice_domain(make_domain: DomainFactory) -> Domain:
    """Voice set up; every voice call is listened to; the next steps start by themselves."""
    return await make_domain(voice=VOICE, script=voice_listened, steps=True)


async def spoken_code(domain: Domain, verification: VerificationRecord) -> str:
    """The code the verification's current call, a voice call, says."""
    dial = await domain.dial_of(verification)
    assert dial.speech is not None, "not a voice call"
    return dial.speech.code


@pytest.mark.parametrize(("locale", "spoken_in"), [(None, "en"), ("id", "id")])
async def test_a_voice_call_says_the_code_that_approves(
    voice_domain: Domain, locale: str | None, spoken_in: str
) -> None:
    verification = await voice_domain.create(fresh_mobile(), channels=("voice",), locale=locale)

    dial = await voice_domain.dial_of(verification)
    assert dial.caller_id == VOICE.caller_id  # cli_format e164: not a pool's caller ID
    assert dial.speech is not None
    code = dial.speech.code
    assert dial.speech == Speech(
        VOICE.context, code, spoken_in, VOICE.repeat, VOICE.max_seconds + VOICE_PBX_MARGIN_S
    )
    assert len(code) == TEST_POOL.code_length and code.isdigit()
    call = await voice_domain.until_call(verification, lambda call: call.ended_at is not None)
    assert (call.channel, call.outcome, call.ring_seconds) == (
        "voice",
        "spoken",
        VOICE.ring_seconds,
    )

    result = await voice_domain.verifications.check(KEY, verification.id, code, None)
    assert result.valid and result.verification.status == "approved"


async def test_a_wrong_code_does_not_approve_a_voice_verification(voice_domain: Domain) -> None:
    verification = await voice_domain.create(fresh_mobile(), channels=("voice",))
    code = await spoken_code(voice_domain, verification)

    wrong = f"{(int(code) + 1) % 10_000:04d}"
    result = await voice_domain.verifications.check(KEY, verification.id, wrong, None)
    assert not result.valid and result.verification.status == "pending"


async def test_approving_hangs_up_the_voice_call_still_talking(make_domain: DomainFactory) -> None:
    domain = await make_domain(voice=VOICE, script=talks_on)
    verification = await domain.create(fresh_mobile(), channels=("voice",))
    code = await spoken_code(domain, verification)
    _, call = await domain.call_of(verification)

    async def spoken() -> bool:
        return "spoken" in [e.kind for e in await domain.store.call_events(call.id)]

    await until(spoken)
    assert call.id in domain.pbx.live
    result = await domain.verifications.check(KEY, verification.id, code, None)

    assert result.verification.status == "approved"
    assert domain.pbx.hangups == [call.id]
    ended = await domain.until_call(verification, lambda call: call.ended_at is not None)
    assert ended.outcome == "spoken"


async def test_a_failed_flash_call_is_followed_at_once_by_a_voice_call_saying_its_code(
    make_domain: DomainFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the dialer's word (call_ended) starts the step in time: the loop's poll is
    # slower than the test's patience.
    monkeypatch.setattr(verifications_module, "STEPS_POLL_S", 10 * WAIT_S)
    domain = await make_domain(voice=VOICE, script=voice_listened, steps=True)
    verification = await domain.create(fresh_mobile("3"), channels=FLASH_THEN_VOICE)  # busy
    flash = await domain.dial_of(verification)
    assert flash.speech is None
    shown = flash.caller_id[-verification.cli_length :]

    await domain.until_call(verification, lambda call: call.channel == "voice")
    voice = await domain.dial_of(verification)
    assert voice.speech is not None
    assert (voice.number, voice.caller_id, voice.speech.code) == (
        flash.number,
        VOICE.caller_id,
        shown,
    )
    calls = await domain.store.calls_of(verification.id)
    assert [(c.channel, c.step) for c in calls] == [("flashcall", 0), ("voice", 1)]
    assert calls[0].outcome == "busy"
    stepped, _ = await domain.call_of(verification)
    assert (stepped.status, stepped.step) == ("pending", 1)

    result = await domain.verifications.check(KEY, verification.id, shown, None)
    assert result.valid and result.verification.status == "approved"


async def test_a_flash_call_after_a_voice_call_shows_its_code_and_rings_as_configured(
    make_domain: DomainFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verifications_module, "STEPS_POLL_S", 10 * WAIT_S)
    domain = await make_domain(voice=VOICE, steps=True)  # the last digit 3: busy, both
    verification = await domain.create(fresh_mobile("3"), channels=("voice", "flashcall"))
    voice = await domain.dial_of(verification)
    assert voice.speech is not None

    flash_call = await domain.until_call(verification, lambda call: call.channel == "flashcall")
    flash = await domain.dial_of(verification)
    # The caller ID carries the code the voice call said: one code for the verification.
    assert flash.speech is None
    assert flash.caller_id[-verification.cli_length :] == voice.speech.code
    # Not the voice call's ring time (voice.ring_seconds): the flash calls' own (1 s).
    assert (voice.timeout_seconds > flash.timeout_seconds, flash_call.ring_seconds) == (True, 1)


async def test_a_voice_call_follows_a_delivered_flash_call_after_fallback_after(
    voice_domain: Domain,
) -> None:
    fallback_after = 20
    verification = await voice_domain.create(
        fresh_mobile("0"),  # rings, then the network's 480: delivered
        channels=FLASH_THEN_VOICE,
        fallback_after_seconds=fallback_after,
        fallback_after_given=True,
    )
    shown = await voice_domain.code_of(verification)
    flash = await voice_domain.until_call(verification, lambda call: call.ended_at is not None)
    assert flash.outcome == "delivered" and flash.ended_at is not None
    waiting, _ = await voice_domain.call_of(verification)
    assert waiting.next_at == pytest.approx(flash.ended_at + fallback_after)
    await asyncio.sleep(0.3)
    assert [d for d in voice_domain.pbx.dials if d.speech is not None] == []

    voice_domain.clock.advance(fallback_after)  # the steps loop looks every second
    await voice_domain.until_call(verification, lambda call: call.channel == "voice")
    assert await spoken_code(voice_domain, verification) == shown


async def test_next_starts_the_voice_call_and_there_is_no_next_after_it(
    voice_domain: Domain,
) -> None:
    verification = await voice_domain.create(
        fresh_mobile("0"),
        channels=FLASH_THEN_VOICE,
        fallback_after_seconds=None,  # only when asked
        fallback_after_given=True,
    )
    shown = await voice_domain.code_of(verification)
    await voice_domain.until_call(verification, lambda call: call.ended_at is not None)
    waiting, _ = await voice_domain.call_of(verification)
    assert (waiting.status, waiting.next_at) == ("pending", None)

    stepped, call = await voice_domain.verifications.next_step(KEY, verification.id)

    assert (stepped.step, call.channel, call.step) == (1, "voice", 1)
    assert await spoken_code(voice_domain, verification) == shown
    with pytest.raises(NoNextChannel):
        await voice_domain.verifications.next_step(KEY, verification.id)
    with pytest.raises(NotFound):
        await voice_domain.verifications.next_step(OTHER_KEY, verification.id)
    assert len([d for d in voice_domain.pbx.dials if d.speech is not None]) == 1


async def test_next_hangs_up_the_flash_call_still_ringing(make_domain: DomainFactory) -> None:
    def flash_rings_on(dial: Dial) -> Fate:
        return listened(dial) if dial.speech is not None else rings_until_hung_up(dial)

    domain = await make_domain(voice=VOICE, script=flash_rings_on)
    verification = await domain.create(fresh_mobile(), channels=FLASH_THEN_VOICE)
    flash = await domain.until_call(verification, lambda call: call.status == "ringing")

    await domain.verifications.next_step(KEY, verification.id)

    assert domain.pbx.hangups == [flash.id]
    await spoken_code(domain, verification)


async def test_next_again_within_the_gap_is_rate_limited(voice_domain: Domain) -> None:
    verification = await voice_domain.create(
        fresh_mobile("0"),
        channels=("flashcall", "voice", "voice"),
        fallback_after_seconds=None,
        fallback_after_given=True,
    )
    shown = await voice_domain.code_of(verification)
    await voice_domain.verifications.next_step(KEY, verification.id)
    assert await spoken_code(voice_domain, verification) == shown

    voice_domain.clock.advance(VOICE.next_min_gap_seconds - 5)
    with pytest.raises(RateLimited) as refused:
        await voice_domain.verifications.next_step(KEY, verification.id)
    assert refused.value.limit == "next_gap"
    assert 1 <= refused.value.retry_after <= 6
    stepped, call = await voice_domain.call_of(verification)
    assert (stepped.step, call.step) == (1, 1)
    assert len([d for d in voice_domain.pbx.dials if d.speech is not None]) == 1

    voice_domain.clock.advance(5)
    stepped, call = await voice_domain.verifications.next_step(KEY, verification.id)
    assert (stepped.step, call.channel) == (2, "voice")
    assert await spoken_code(voice_domain, verification) == shown


@pytest.mark.parametrize(
    ("voice", "fields", "error"),
    [
        (VOICE, {"channels": ("fax",)}, UnknownChannel),
        (VOICE, {"channels": ("flashcall", "sms")}, UnknownChannel),
        (VOICE, {"channels": ("voice",), "locale": "fr"}, UnknownLocale),
        (VoiceConfig(), {"channels": ("voice",)}, ChannelUnavailable),  # no caller_id
        (VoiceConfig(), {"channels": FLASH_THEN_VOICE}, ChannelUnavailable),
        (VOICE, {"channels": ()}, InvalidRequest),
        (VOICE, {"channels": ("flashcall", "voice", "voice", "voice")}, InvalidRequest),
    ],
    ids=[
        "unknown",
        "unknown_later",
        "unknown_locale",
        "voice_off",
        "voice_off_later",
        "none",
        "four",
    ],
)
async def test_a_channel_request_is_refused_before_any_dial(
    make_domain: DomainFactory,
    voice: VoiceConfig,
    fields: dict[str, Any],
    error: type[Exception],
) -> None:
    domain = await make_domain(voice=voice)
    with pytest.raises(error):
        await domain.create(fresh_mobile(), **fields)

    assert (await domain.rows("verifications"), await domain.rows("calls")) == (0, 0)
    assert domain.pbx.dials == []


async def test_a_landline_gets_only_the_voice_call(voice_domain: Domain) -> None:
    verification = await voice_domain.create(JAKARTA_LANDLINE, channels=FLASH_THEN_VOICE)

    assert verification.channels == "voice"
    code = await spoken_code(voice_domain, verification)
    await voice_domain.until_call(verification, lambda call: call.ended_at is not None)
    calls = await voice_domain.store.calls_of(verification.id)
    assert [(c.channel, c.outcome) for c in calls] == [("voice", "spoken")]
    assert [d.number for d in voice_domain.pbx.dials] == [JAKARTA_LANDLINE[1:]]
    result = await voice_domain.verifications.check(KEY, verification.id, code, None)
    assert result.valid


async def test_a_landline_gets_no_flash_call(voice_domain: Domain) -> None:
    with pytest.raises(PhoneTypeNotAllowed):
        await voice_domain.create(JAKARTA_LANDLINE, channels=("flashcall",))
    assert await voice_domain.rows("verifications") == 0
    assert voice_domain.pbx.dials == []


async def test_the_voice_limit_per_phone_refuses_a_second_voice_call(
    make_domain: DomainFactory,
) -> None:
    voice = dataclasses.replace(VOICE, per_phone_per_hour=1, per_phone_per_day=1)
    domain = await make_domain(voice=voice, script=voice_listened)
    phone = fresh_mobile()
    first = await domain.create(phone, channels=("voice",))
    await domain.until_call(first, lambda call: call.ended_at is not None)

    with pytest.raises(RateLimited) as refused:
        await domain.create(phone, channels=("voice",))

    assert refused.value.limit == "voice_phone"
    assert 3590 <= refused.value.retry_after <= 3600
    assert len(domain.pbx.dials) == 1
    assert await domain.rows("verifications") == 1
    # Its flash calls are not voice calls: not counted against the phone's voice calls.
    flash = await domain.create(phone)
    assert (await domain.dial_of(flash)).speech is None


async def test_an_automatic_voice_step_over_its_limit_fails_a_verification_whose_call_failed(
    make_domain: DomainFactory,
) -> None:
    voice = dataclasses.replace(VOICE, per_phone_per_hour=1, per_phone_per_day=1)
    domain = await make_domain(voice=voice, script=voice_listened, steps=True)
    phone = fresh_mobile("3")  # flash calls busy; voice calls listened to
    spent = await domain.create(phone, channels=("voice",))
    await domain.until_call(spent, lambda call: call.ended_at is not None)

    verification = await domain.create(phone, channels=FLASH_THEN_VOICE)

    async def failed() -> bool:
        current, _ = await domain.call_of(verification)
        return current.status == "failed"

    await until(failed)
    calls = await domain.store.calls_of(verification.id)
    assert [(c.channel, c.outcome) for c in calls] == [("flashcall", "busy")]
    assert len([d for d in domain.pbx.dials if d.speech is not None]) == 1  # the first only


@pytest.mark.parametrize(
    ("fields", "stored"),
    [
        ({"fallback_after_seconds": 90, "fallback_after_given": True}, 90.0),
        ({"fallback_after_seconds": 0, "fallback_after_given": True}, 0.0),
        ({"fallback_after_seconds": None, "fallback_after_given": True}, None),  # never
        ({}, float(VOICE.fallback_after_seconds or 0)),  # not given: the config's default
    ],
    ids=["given", "zero", "null", "absent"],
)
async def test_fallback_after_lands_in_the_verification(
    voice_domain: Domain, fields: dict[str, Any], stored: float | None
) -> None:
    verification = await voice_domain.create(fresh_mobile("0"), channels=FLASH_THEN_VOICE, **fields)

    assert verification.fallback_after == stored
    kept, _ = await voice_domain.call_of(verification)
    assert kept.fallback_after == stored


async def test_a_voice_call_answered_before_its_gateway_died_is_adopted_as_answered(
    make_domain: DomainFactory,
) -> None:
    domain = await make_domain(voice=VOICE)
    joined = Membership(
        domain.store, domain.dialer, domain.verifications, domain.dialer.owner, lease_seconds=10
    )
    now = time.time()
    await domain.store.register_instance("gw-dead", "x", now - 60, lease_until=now - 30)
    phone = fresh_mobile()
    verification = make_verification(
        f"vrf_{phone[-7:]}", phone=phone, created_at=now, api_key_id=KEY, channels="voice"
    )
    call = make_call(
        f"otp-{phone[-7:]}",
        verification.id,
        phone=phone,
        queued_at=now,
        status="ringing",
        ring_seconds=VOICE.ring_seconds,
        dialed_at=now,
        ringing_at=now,
        owner="gw-dead",
        channel="voice",
    )
    await domain.store.create_verification(verification, call)
    # The dead gateway heard the answer and the code said in full.
    for kind in (CallEventKind.RINGING, CallEventKind.ANSWERED, CallEventKind.SPOKEN):
        await domain.store.add_call_event(CallEventRecord(call.id, now, kind, None, None))
    try:
        await joined.join()
        assert domain.pbx.adopted == [call.id]
        domain.pbx.end_adopted(call.id, 16, None)  # the user hangs up
        ended = await domain.until_call(verification, lambda call: call.ended_at is not None)
    finally:
        await joined.close(timeout=1)

    current, _ = await domain.call_of(verification)
    # Today: error, and the verification failed: the code the user heard is refused.
    assert (ended.outcome, current.status) == ("spoken", "pending")
