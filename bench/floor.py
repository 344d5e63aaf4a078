"""The API's floor: a bare aiohttp server answering the create with no work behind it.

    python -m bench.floor PORT

Same framework, event loop and request shape as the gateway (a JSON body in, a JSON
verification out, 201 with a Location) but no validation, storage or call. Measured with
the same load generator in the same run, it is what HTTP alone costs on this machine: the
part of the gateway's time per request that no change to the gateway's own code removes.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from bench.gateway import ServerProcess


async def create(request: web.Request) -> web.Response:
    body = await request.json()
    verification_id = "vrf_" + secrets.token_hex(16)
    return web.Response(
        text=json.dumps({"id": verification_id, "phone": body["phone"], "status": "pending"}),
        status=201,
        content_type="application/json",
        headers={"Location": f"/v1/verifications/{verification_id}"},
    )


async def ready(request: web.Request) -> web.Response:
    return web.json_response({"status": "ready"})


async def serve(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/verifications", create)
    app.router.add_get("/readyz", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until SIGTERM ends the process


class FloorProcess(ServerProcess):
    """This module's server, run as `python -m bench.floor PORT`."""

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(workdir, port)
        self._port = port

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.floor", str(self._port)]


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
