"""A gateway among others on one database: it adopts a dead gateway's calls once, takes
back what its own previous process left, and picks up calls it lost track of."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from gateway import instances
from gateway.instances import Membership
from gateway.store import CallRecord
from tests.conftest import make_call, make_verification
from tests.fakes import fresh_mobile, until
from tests.test_verifications import KEY, Domain, DomainFactory, make_domain  # noqa: F401

OLD_HASH = "hash-of-a-code-nobody-saw"


async def stored(domain: Domain, owner: str, status: str, *, age: float = 0.0) -> CallRecord:
    """A verification made by gateway `owner`, its call `status`, `age` seconds ago."""
    now = time.time() - age
    phone = fresh_mobile("0")
    verification = make_verification(
        f"vrf_{phone[-7:]}", phone=phone, created_at=now, api_key_id=KEY, code_hash=OLD_HASH
    )
    call = make_call(
        f"otp-{phone[-7:]}",
        verification.id,
        phone=phone,
        queued_at=now,
        status=status,
        ring_seconds=1,
        dialed_at=None if status == "queued" else now,
        owner=owner,
    )
    await domain.store.create_verification(verification, call)
    return call


@pytest.fixture
async def membership(
    make_domain: DomainFactory,  # noqa: F811 - the fixture imported above
) -> AsyncIterator[tuple[Domain, Membership]]:
    domain = await make_domain()
    joined = Membership(
        domain.store, domain.dialer, domain.verifications, domain.dialer.owner, lease_seconds=10
    )
    yield domain, joined
    await joined.close(timeout=1)


async def test_a_dead_gateways_queued_call_is_placed_once_with_a_fresh_code(
    membership: tuple[Domain, Membership],
) -> None:
    domain, joined = membership
    now = time.time()
    await domain.store.register_instance("gw-dead", "x", now - 60, lease_until=now - 30)
    call = await stored(domain, "gw-dead", "queued")

    await joined.join()

    async def ended() -> CallRecord | None:
        found = await domain.store.verification(call.verification_id)
        assert found is not None
        return found[1] if found[1].ended_at is not None else None

    ended_call = await until(ended)
    assert [d.channel_id for d in domain.pbx.placed] == [call.id]
    assert ended_call.owner == joined.name
    found = await domain.store.verification(call.verification_id)
    assert found is not None and found[0].code_hash != OLD_HASH  # nobody saw the old code


async def test_a_live_gateways_calls_are_left_alone(
    membership: tuple[Domain, Membership],
) -> None:
    domain, joined = membership
    now = time.time()
    await domain.store.register_instance("gw-alive", "x", now, lease_until=now + 60)
    call = await stored(domain, "gw-alive", "queued")
    await joined.join()
    assert domain.pbx.placed == []
    found = await domain.store.verification(call.verification_id)
    assert found is not None and found[1].owner == "gw-alive"


async def test_a_dead_gateways_ringing_call_is_followed_not_dialed_again(
    membership: tuple[Domain, Membership],
) -> None:
    domain, joined = membership
    now = time.time()
    await domain.store.register_instance("gw-dead", "x", now - 60, lease_until=now - 30)
    call = await stored(domain, "gw-dead", "ringing")

    await joined.join()
    assert domain.pbx.adopted == [call.id]
    domain.pbx.end_adopted(call.id, 16, None)

    async def ended() -> CallRecord | None:
        found = await domain.store.verification(call.verification_id)
        assert found is not None
        return found[1] if found[1].ended_at is not None else None

    assert (await until(ended)).hangup_cause == 16
    assert domain.pbx.placed == []


async def test_a_call_of_its_own_no_longer_followed_is_taken_up_again(
    membership: tuple[Domain, Membership], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its end could not be written (the database was away): the call stays ringing in
    the database; the gateway finds it and follows it on the PBX to its end."""
    monkeypatch.setattr(instances, "STRAY_CHECK_S", 0.0)
    domain, joined = membership
    await joined.join()
    call = await stored(domain, joined.name, "ringing", age=instances.STRAY_AFTER_S + 1)

    async def followed() -> bool:
        return call.id in domain.pbx.adopted

    await until(followed, timeout=5)
    domain.pbx.end_adopted(call.id, 16, None)

    async def ended() -> CallRecord | None:
        found = await domain.store.verification(call.verification_id)
        assert found is not None
        return found[1] if found[1].ended_at is not None else None

    assert (await until(ended)).hangup_cause == 16
    assert domain.pbx.placed == []
