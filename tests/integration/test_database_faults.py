"""PostgreSQL lost while the gateway runs: it says so, refuses new work with 503, writes
nothing by halves, and resumes by itself when the server is back."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from tests.conftest import phone_number, raw_query
from tests.farend import FarEnd
from tests.integration.conftest import GatewayFactory, wait_for
from tests.integration.test_verifications_api import call_ended
from tests.pg import DevPostgres

pytestmark = pytest.mark.integration


@pytest.fixture
def backend() -> str:
    """Only PostgreSQL is a server that can be lost."""
    return "postgresql"


@pytest.fixture
def postgres_database(dev_postgres: DevPostgres) -> Iterator[str]:
    """A new database on the dev PostgreSQL, which this test stops and starts."""
    name = f"faults_{os.getpid()}"
    url = dev_postgres.create_database(name, replace=True)
    yield url
    dev_postgres.up()  # running again whatever the test did
    dev_postgres.drop_database(name)


async def test_postgresql_lost_while_running_gives_503_and_work_resumes(
    dev_postgres: DevPostgres,
    postgres_database: str,  # before start_gateway: dropped after the gateway stops
    start_gateway: GatewayFactory,
    far_end: FarEnd,
) -> None:
    gateway = await start_gateway(database=postgres_database)
    before = phone_number(0)
    status, created = await gateway.post("/v1/verifications", {"phone": f"+{before}"})
    assert status == 201

    await asyncio.to_thread(dev_postgres.down)
    try:
        response = await gateway.request("GET", "/readyz")
        body = await response.json()
        assert (response.status, body["checks"]["database"]) == (503, False)
        refused = phone_number(0)
        response = await gateway.request("POST", "/v1/verifications", json={"phone": f"+{refused}"})
        problem = await response.json(content_type=None)
        assert (response.status, problem["code"]) == (503, "overloaded")
        assert response.headers["Retry-After"] == "2"
        assert response.content_type == "application/problem+json"
        status, read = await gateway.get(f"/v1/verifications/{created['id']}")
        assert (status, read["code"]) == (503, "overloaded")
    finally:
        await asyncio.to_thread(dev_postgres.up)

    async def ready() -> bool:
        return (await gateway.request("GET", "/readyz")).status == 200

    await wait_for(ready, 10, "/readyz 200 once PostgreSQL is back")
    after = phone_number(0)
    status, again = await gateway.post("/v1/verifications", {"phone": f"+{after}"})
    assert status == 201
    ended = await call_ended(gateway, again["id"])
    assert ended["call"]["outcome"] == "delivered"
    assert far_end.calls_to(after)
    # Nothing of the refused create was stored, and the first is whole.
    phones = {
        row[0] for row in await raw_query(postgres_database, "SELECT phone FROM verifications")
    }
    assert phones == {f"+{before}", f"+{after}"}
    assert not far_end.calls_to(refused)
    status, read = await gateway.get(f"/v1/verifications/{created['id']}")
    assert (status, read["id"]) == (200, created["id"])
