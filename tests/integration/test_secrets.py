"""Code safety at rest and in logs: after real calls, no code, caller ID or secret leaks."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway import apikeys
from gateway.pbx import AmiSettings
from gateway.store import open_store
from tests.conftest import dump, phone_number, stored_bytes, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway
from tests.integration.test_verifications_api import call_ended, code_of

pytestmark = pytest.mark.integration


async def test_database_and_logs_hold_no_code_caller_id_or_secret(
    gateway: Gateway, far_end: FarEnd, dev_pbx: AmiSettings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clis, codes, numbers = [], [], []
    for behaviour in (0, 0, 2, 3, 1):
        number = phone_number(behaviour)
        numbers.append(number)
        _, created = await gateway.post("/v1/verifications", {"phone": f"+{number}"})
        record = await wire_record(far_end, number)
        clis.append(record.from_user)
        codes.append(code_of(record))
        await call_ended(gateway, created["id"])
        if behaviour == 0 and len(codes) == 1:  # approve one, fail checks on another
            await gateway.post(f"/v1/verifications/{created['id']}/check", {"code": codes[-1]})
        else:
            wrong = f"{(int(codes[-1]) + 1) % 10000:04d}"
            await gateway.post(f"/v1/verifications/{created['id']}/check", {"code": wrong})
    await asyncio.sleep(0.2)

    stored = await stored_bytes(gateway.database)
    for cli in clis:
        assert cli.encode() not in stored, "a full caller ID is in the database"
    for table, (columns, rows) in (await dump(gateway.database)).items():
        assert not {"code", "cli", "caller_id"} & set(columns), (table, columns)
        for row in rows:
            for value in row:
                assert value not in codes, f"a code is stored in {table}"

    logged = "\n".join(r.getMessage() for r in caplog.records)
    for secret in (dev_pbx.secret, "integration-test-code-secret", gateway.key):
        assert secret not in logged
    for cli in clis:
        assert cli not in logged, "a full caller ID was logged"
    for number in numbers:
        assert number not in logged, "a full phone number was logged"


async def test_key_limited_to_networks_refuses_other_addresses(gateway: Gateway) -> None:
    store = await open_store(gateway.database)
    try:
        _, elsewhere = await apikeys.create_key(store, "office", ("10.0.0.0/8",))
        _, local = await apikeys.create_key(store, "local", ("127.0.0.0/8", "::1/128"))
    finally:
        await store.close()
    response = await gateway.request("GET", "/v1/numbers/+6281234567890", key=elsewhere)
    assert response.status == 401
    response = await gateway.request("GET", "/v1/numbers/+6281234567890", key=local)
    assert response.status == 200
