"""The Python client example of the API docs (docs/api/examples/client.py), run as a
client developer would run it, against a gateway on the real PBX: the code it is given
is the one the far end saw in the caller ID."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tests.conftest import phone_number, wire_record
from tests.farend import FarEnd
from tests.integration.conftest import Gateway
from tests.integration.test_verifications_api import code_of

pytestmark = pytest.mark.integration

CLIENT = Path(__file__).resolve().parents[2] / "docs" / "api" / "examples" / "client.py"
TIMEOUT_S = 30


async def run_client(
    gateway: Gateway, far_end: FarEnd, behaviour: int, wrong: bool
) -> tuple[int, str]:
    """Run the example for a far-end number; type the code it was called with (or a
    wrong one) on its stdin once the far end has seen the INVITE."""
    number = phone_number(behaviour)
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CLIENT),
        f"+{number}",
        "--url",
        gateway.url,
        "--api-key",
        gateway.key,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert client.stdin is not None
    try:
        code = code_of(await wire_record(far_end, number))
        if wrong:
            code = f"{(int(code) + 1) % 10_000:04d}"
        client.stdin.write(f"{code}\n".encode())
        await client.stdin.drain()
        client.stdin.close()
        output, _ = await asyncio.wait_for(client.communicate(), TIMEOUT_S)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
    assert client.returncode is not None
    return client.returncode, output.decode()


async def test_the_client_example_verifies_with_the_code_the_phone_saw(
    gateway: Gateway, far_end: FarEnd
) -> None:
    status, output = await run_client(gateway, far_end, 0, wrong=False)
    assert status == 0, output
    assert "valid, status approved" in output
    # Approved: the cancel that ends the example is refused as not pending, and said so.
    assert "not pending (approved)" in output


async def test_the_client_example_reports_a_wrong_code_and_cancels(
    gateway: Gateway, far_end: FarEnd
) -> None:
    status, output = await run_client(gateway, far_end, 0, wrong=True)
    assert status == 1, output
    assert "wrong code, status pending" in output
    [created] = [line for line in output.splitlines() if line.startswith("created ")]
    verification_id = created.split()[1].rstrip(":")
    answer, shown = await gateway.get(f"/v1/verifications/{verification_id}")
    assert (answer, shown["status"]) == (200, "canceled")
