"""Schemathesis against /openapi.json: every operation, over 1,000 generated requests,
no 5xx and no response outside the document."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.farend import FarEnd
from tests.integration.conftest import GatewayProcess, wait_for

pytestmark = pytest.mark.integration

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)
EXAMPLES_PER_OPERATION = 100
# /metrics and the dashboard answer only on the operator listener, never on the API port.
OPERATOR_ROUTES = "^/(metrics|dashboard)"


async def test_generated_requests_stay_within_the_document(
    gateway_process: GatewayProcess, far_end: FarEnd, tmp_path: Path
) -> None:
    gateway_process.start()
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            try:
                async with http.get(gateway_process.url + "/readyz") as response:
                    return response.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, 15, "gateway ready")
    result = await asyncio.to_thread(
        subprocess.run,
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            gateway_process.url + "/openapi.json",
            "--header",
            f"Authorization: Bearer {gateway_process.key}",
            "--checks",
            CHECKS,
            "--max-examples",
            str(EXAMPLES_PER_OPERATION),
            "--generation-deterministic",
            # Served on the operator listener (http.operator_port), not on this port.
            "--exclude-path-regex",
            OPERATOR_ROUTES,
            "--report",
            "ndjson",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated is not None, output[-3000:]
    print(f"\nschemathesis: {generated.group(1)} test cases, {CHECKS}")
    assert int(generated.group(1)) >= 1000
