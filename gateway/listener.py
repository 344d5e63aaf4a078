"""The HTTP listeners: aiohttp's server with idle connections closed early, bounded
request heads, and a cap on open connections."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import typing

from aiohttp import web

from gateway.app import SERVER_HEADER
from gateway.config import HttpConfig

log = logging.getLogger(__name__)

# The longest request line of the API (a route, an id, a cursor) is under 300 bytes.
MAX_REQUEST_LINE_BYTES = 4096
# One header: a bearer key is about 50 bytes; a browser's cookies on the dashboard fit.
MAX_HEADER_FIELD_BYTES = 8190
MAX_HEADERS = 64
# Prometheus and a few dashboards.
OPERATOR_MAX_CONNECTIONS = 32
# Open files the process needs beside its HTTP connections: the database, its -wal and
# -shm (on two connections), AMI, webhook deliveries, logs, the interpreter's own.
RESERVED_FILES = 256

_PROBLEM = json.dumps(
    {
        "type": "https://otp-gateway.invalid/problems/overloaded",
        "title": "Overloaded",
        "status": 503,
        "code": "overloaded",
        "detail": "too many open connections; retry",
    }
).encode()
# The answer to a connection over the cap, written without reading its request.
OVER_CAPACITY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    + f"Server: {SERVER_HEADER}\r\n".encode()
    + b"Content-Type: application/problem+json\r\n"
    + b"Retry-After: 1\r\n"
    + b"Connection: close\r\n"
    + f"Content-Length: {len(_PROBLEM)}\r\n\r\n".encode()
    + _PROBLEM
)


def runner(app: web.Application, http: HttpConfig) -> web.AppRunner:
    """A runner for `app` whose connections close after http.keepalive_seconds without a
    request: idle after a response, or from the connect until the headers are in (a
    client that trickles them too). The body is bounded by the request timeout."""
    return web.AppRunner(
        app,
        handle_signals=False,
        keepalive_timeout=http.keepalive_seconds,
        max_line_size=MAX_REQUEST_LINE_BYTES,
        max_field_size=MAX_HEADER_FIELD_BYTES,
        max_headers=MAX_HEADERS,
    )


async def listen(
    runner: web.AppRunner, host: str, port: int, max_connections: int
) -> asyncio.Server:
    """Serve `runner`'s app (set up) on host:port. With `max_connections` open, a new
    connection is answered 503 and closed. Close the server before runner.cleanup()."""
    server = runner.server
    assert server is not None, "runner.setup() comes first"
    full = False

    def connection() -> asyncio.BaseProtocol:
        nonlocal full
        if len(server.connections) >= max_connections:
            if not full:
                log.warning(
                    "%d connections open on %s:%s: new ones get 503 until some close",
                    max_connections,
                    host,
                    port,
                )
            full = True
            return _OverCapacity()
        full = False
        return server()

    loop = asyncio.get_running_loop()
    return await loop.create_server(connection, host, port, reuse_address=True)


def port_of(server: asyncio.Server) -> int:
    """The port `server` listens on (the one chosen for port 0)."""
    return int(server.sockets[0].getsockname()[1])


def ensure_open_files(needed: int) -> None:
    """Raise the soft limit on open files to `needed`, as far as the hard limit allows;
    warn when it does not allow that much (systemd: LimitNOFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning(
            "open files are limited to %d, and http.max_connections needs %d: "
            "lower it or raise the limit (systemd LimitNOFILE, ulimit -n)",
            target,
            needed,
        )


class _OverCapacity(asyncio.Protocol):
    """A connection over the cap: told 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = typing.cast(asyncio.Transport, transport)
        writer.write(OVER_CAPACITY)
        writer.close()
