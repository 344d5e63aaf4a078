"""The HTTP server against hostile clients: idle and slow sockets, too many connections,
unauthenticated routes, the Server header, non-finite JSON numbers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from gateway import apikeys, listener
from gateway.api.handlers import SWAGGER_UI_DIR
from gateway.app import create_app, create_operator_app
from gateway.config import HttpConfig
from gateway.store import open_store
from tests.conftest import NewDatabase, make_config
from tests.fakes import FakePbx

MOBILE = "+6281234567890"
OPERATOR_PATHS = (
    "/metrics",
    "/dashboard",
    "/dashboard/data",
    "/dashboard/assets/dashboard.js",
    "/dashboard/assets/dashboard.css",
)


@dataclasses.dataclass
class Served:
    """The API and operator apps, on the gateway's own listeners."""

    app: web.Application
    port: int
    operator_port: int


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(new_database: NewDatabase) -> AsyncIterator[ServeFactory]:
    """Start the gateway as `python -m gateway run` does (http settings as keywords)."""
    runners: list[web.AppRunner] = []
    servers: list[asyncio.Server] = []
    pbxs: list[FakePbx] = []

    async def start(**http: Any) -> Served:
        config = make_config(new_database(), http=HttpConfig(**http))
        pbxs.append(FakePbx())
        app = create_app(config, pbx=pbxs[-1])
        api = listener.runner(app, config.http)
        operator = listener.runner(create_operator_app(app), config.http)
        for runner in (api, operator):
            await runner.setup()
            runners.insert(0, runner)  # cleaned up in reverse: the operator's first
        cap = config.http.max_connections
        servers.append(await listener.listen(api, "127.0.0.1", 0, cap))
        servers.append(await listener.listen(operator, "127.0.0.1", 0, cap))
        return Served(app, listener.port_of(servers[-2]), listener.port_of(servers[-1]))

    yield start
    for server in servers:
        server.close()
    for runner in runners:
        await runner.cleanup()
    for fake in pbxs:
        await fake.close()


async def raw_request(port: int, request: bytes) -> bytes:
    """Everything the server sends on one connection for `request`, until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def closed_after(reader: asyncio.StreamReader, within: float) -> float:
    """Seconds until the server closes the connection; fails after `within`."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


# -- idle and slow connections ---------------------------------------------------


async def test_an_idle_connection_is_closed_within_the_keepalive_timeout(
    serve: ServeFactory,
) -> None:
    served = await serve(keepalive_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        # Connected, and never a byte sent.
        assert 0.4 <= await closed_after(reader, within=2.0) <= 1.5
    finally:
        writer.close()


async def test_a_kept_alive_connection_is_closed_within_the_keepalive_timeout(
    serve: ServeFactory,
) -> None:
    served = await serve(keepalive_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"Connection: close" not in head  # kept alive, then idle
        assert 0.4 <= await closed_after(reader, within=2.0) <= 1.5
    finally:
        writer.close()


async def test_headers_sent_a_byte_at_a_time_are_cut_off(serve: ServeFactory) -> None:
    served = await serve(keepalive_seconds=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    started = time.monotonic()
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        async with asyncio.timeout(3):
            while not reader.at_eof():  # a header byte every 0.1 s, never its end
                with contextlib.suppress(ConnectionError):
                    writer.write(b"x")
                    await writer.drain()
                await asyncio.sleep(0.1)
    finally:
        writer.close()
    assert time.monotonic() - started < 1.5


# -- the connection cap ------------------------------------------------------------


async def test_connections_over_the_cap_are_answered_503_and_closed(
    serve: ServeFactory,
) -> None:
    served = await serve(max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(2)]
    await asyncio.sleep(0.05)  # both accepted

    answer = await raw_request(served.port, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert b"Retry-After: 1" in head
    assert json.loads(body)["code"] == "overloaded"

    # One closes: the next connection is served again.
    held[0][1].close()
    await held[0][1].wait_closed()
    async with asyncio.timeout(5):
        while True:
            answer = await raw_request(
                served.port, b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"
            )
            if answer.startswith(b"HTTP/1.1 200 "):
                break
            await asyncio.sleep(0.02)
    held[1][1].close()


def test_the_open_files_limit_is_raised_for_the_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    limits = {"soft": 256, "hard": 4096}

    def setrlimit(kind: int, values: tuple[int, int]) -> None:
        limits["soft"], limits["hard"] = values

    monkeypatch.setattr(
        listener.resource, "getrlimit", lambda kind: (limits["soft"], limits["hard"])
    )
    monkeypatch.setattr(listener.resource, "setrlimit", setrlimit)
    listener.ensure_open_files(1288)
    assert limits == {"soft": 1288, "hard": 4096}
    listener.ensure_open_files(9000)  # as far as the hard limit allows
    assert limits == {"soft": 4096, "hard": 4096}


# -- what the listeners serve --------------------------------------------------------


async def test_operator_routes_are_served_on_the_operator_listener_only(
    serve: ServeFactory,
) -> None:
    served = await serve()
    async with ClientSession() as http:
        for path in OPERATOR_PATHS:
            async with http.get(f"http://127.0.0.1:{served.port}{path}") as response:
                assert response.status == 404, path
            async with http.get(f"http://127.0.0.1:{served.operator_port}{path}") as response:
                assert response.status == 200, path
        # And the API is not on the operator's listener.
        async with http.get(f"http://127.0.0.1:{served.operator_port}/openapi.json") as response:
            assert response.status == 404


async def test_docs_assets_are_only_the_two_files_the_page_uses(
    serve: ServeFactory,
) -> None:
    served = await serve()
    base = f"http://127.0.0.1:{served.port}/docs/assets/"
    async with ClientSession() as http:
        for name in ("swagger-ui.css", "swagger-ui-bundle.js"):
            async with http.get(base + name) as response:
                assert response.status == 200, name
        # Files the package has and the page does not use (25 MB of them, source maps).
        for name in (
            "swagger-editor-bundle.js.map",
            "swagger-editor-bundle.js",
            "swagger-ui.js",
            "oauth2-redirect.html",
            "LICENSE",
        ):
            assert (SWAGGER_UI_DIR / name).is_file(), name
            async with http.get(base + name) as response:
                assert response.status == 404, name
        for name in ("", "../index.html", "swagger-ui.css/"):
            async with http.get(base + name) as response:
                assert response.status == 404, name


async def test_the_server_header_names_no_software_version(serve: ServeFactory) -> None:
    served = await serve()
    async with ClientSession() as http:
        for url in (
            f"http://127.0.0.1:{served.port}/healthz",
            f"http://127.0.0.1:{served.port}/no-such-route",
            f"http://127.0.0.1:{served.operator_port}/metrics",
        ):
            async with http.get(url) as response:
                assert response.headers["Server"] == "otp-gateway", url
    # A request aiohttp's parser refuses never reaches the app: its answer too.
    answer = await raw_request(served.port, b"GET /healthz HTTP/9.9 junk\r\n\r\n")
    assert answer.split(b" ", 2)[1] == b"400", answer
    assert b"\r\nServer: otp-gateway\r\n" in answer
    assert b"aiohttp" not in answer and b"Python" not in answer


# -- JSON bodies ---------------------------------------------------------------------


@pytest.fixture
async def api(database: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """The API's URL and the headers of a request with a valid key."""
    store = await open_store(database)
    try:
        _, key = await apikeys.create_key(store, "test")
    finally:
        await store.close()
    pbx = FakePbx()
    async with TestServer(create_app(make_config(database), pbx=pbx), host="127.0.0.1") as server:
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        yield str(server.make_url("")).rstrip("/"), headers
    await pbx.close()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/numbers/lookup", '{"phones": [NaN, -Infinity]}'),
        ("/v1/numbers/lookup", '{"phones": [Infinity]}'),
        ("/v1/numbers/lookup", '{"phones": [1e999]}'),
        ("/v1/numbers/lookup", '{"phones": ["+6281234567890"], "region": NaN}'),
        ("/v1/verifications", '{"phone": "+6281234567890", "ring_seconds": -Infinity}'),
        ("/v1/verifications", '{"phone": "+6281234567890", "reference": NaN}'),
        ("/v1/verifications/check", '{"phone": "+6281234567890", "code": NaN}'),
    ],
)
async def test_non_finite_numbers_are_refused_400(
    api: tuple[str, dict[str, str]], path: str, body: str
) -> None:
    url, headers = api
    async with (
        ClientSession() as http,
        http.post(url + path, data=body, headers=headers) as response,
    ):
        text = await response.text()
        assert response.status == 400, text
        answer = json.loads(text)  # valid JSON, whatever was sent
        assert answer["code"] == "invalid_request"


async def test_finite_numbers_still_read(api: tuple[str, dict[str, str]]) -> None:
    url, headers = api
    body = json.dumps({"phones": [MOBILE, 6281234567890, 1.5e3]})
    async with (
        ClientSession() as http,
        http.post(url + "/v1/numbers/lookup", data=body, headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        results = (await response.json())["results"]
    assert [r["input"] for r in results] == [MOBILE, 6281234567890, 1500.0]
