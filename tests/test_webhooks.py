"""The webhook sender against real receivers on loopback: which addresses it reaches, how
much of an answer it reads, what it tells the client and the logs, and how a receiver
that never answers is contained."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.api.bodies import check_callback_url
from gateway.config import WebhooksConfig
from gateway.errors import InvalidCallbackUrl, InvalidRequest
from gateway.store import WebhookRecord
from gateway.webhooks import MAX_IN_FLIGHT, RenderVerification, WebhookSender, origin

SECRET = "whsec_" + base64.b64encode(b"unit-test-webhook-secret-0123456").decode()
# What the tests' receivers listen on; the gateway's default reaches none of it.
LOOPBACK = ("127.0.0.0/8", "::1/128")
WAIT_S = 5.0  # a delivery on loopback takes milliseconds; a test gives up after this
# An answer far bigger than anything the sender should hold (the issue saw 300 MB).
HUGE_BODY = 64 * 1024 * 1024
# What may sit in the two sockets' kernel buffers and aiohttp's read buffer once the
# sender stops reading: loopback buffers grow to a few MiB.
BUFFERED_AT_MOST = 16 * 1024 * 1024


class Outbox:
    """The store's webhook outbox in memory: the four methods the sender uses."""

    def __init__(self) -> None:
        self.rows: dict[str, WebhookRecord] = {}

    def add(self, url: str) -> str:
        now = time.time()
        row = WebhookRecord(
            id=f"msg_{len(self.rows)}",
            verification_id="vrf_1",
            url=url,
            type="verification.delivered",
            payload=None,
            created_at=now,
            next_attempt_at=now,
            attempts=0,
            last_status=None,
            last_error=None,
            delivered_at=None,
            given_up_at=None,
        )
        self.rows[row.id] = row
        return row.id

    async def claim_webhooks(self, now: float, limit: int, hold: float) -> list[WebhookRecord]:
        due = [r for r in self._open() if r.next_attempt_at <= now]
        claimed = sorted(due, key=lambda r: r.next_attempt_at)[:limit]
        for row in claimed:
            self.rows[row.id] = dataclasses.replace(row, next_attempt_at=now + hold)
        return [self.rows[row.id] for row in claimed]

    async def next_webhook_at(self) -> float | None:
        return min((r.next_attempt_at for r in self._open()), default=None)

    async def fix_webhook_payload(self, webhook_id: str, payload: str) -> str:
        row = self.rows[webhook_id]
        if row.payload is None:
            row = self.rows[webhook_id] = replace(row, payload=payload)
        assert row.payload is not None
        return row.payload

    async def webhook_attempted(
        self,
        webhook_id: str,
        *,
        at: float,
        status: int | None,
        error: str | None,
        delivered: bool,
        next_attempt_at: float | None,
    ) -> None:
        row = self.rows[webhook_id]
        self.rows[webhook_id] = replace(
            row,
            attempts=row.attempts + 1,
            last_status=status,
            last_error=error,
            delivered_at=at if delivered else None,
            next_attempt_at=next_attempt_at or row.next_attempt_at,
            given_up_at=None if delivered or next_attempt_at is not None else at,
        )

    def _open(self) -> list[WebhookRecord]:
        return [r for r in self.rows.values() if r.delivered_at is None and r.given_up_at is None]

    async def attempted(self, webhook_id: str, timeout: float = WAIT_S) -> WebhookRecord:
        """The row once its first attempt is recorded."""
        async with asyncio.timeout(timeout):
            while self.rows[webhook_id].attempts == 0:
                await asyncio.sleep(0.01)
        return self.rows[webhook_id]


async def render(event: WebhookRecord) -> dict[str, Any]:
    return {"id": event.verification_id, "status": "pending"}


SenderFactory = Callable[..., Outbox]


@pytest.fixture
async def start_sender() -> AsyncIterator[SenderFactory]:
    """Start senders on in-memory outboxes (WebhooksConfig fields as keywords)."""
    senders: list[WebhookSender] = []

    def start(render_with: RenderVerification = render, **settings: Any) -> Outbox:
        outbox = Outbox()
        sender = WebhookSender(WebhooksConfig(secret=SECRET, **settings), outbox, render_with)
        sender.start()
        senders.append(sender)
        return outbox

    yield start
    for sender in senders:
        await sender.stop()


@dataclass
class Receiver:
    """A webhook endpoint on loopback; `paths` lists what each request asked for."""

    port: int
    paths: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)  # ends hung answers

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


Answer = Callable[[web.Request, Receiver], Awaitable[web.StreamResponse]]
ReceiverFactory = Callable[..., Awaitable[Receiver]]


async def accept(request: web.Request, receiver: Receiver) -> web.StreamResponse:
    return web.Response(status=204)


async def never_answer(request: web.Request, receiver: Receiver) -> web.StreamResponse:
    await receiver.release.wait()
    return web.Response(status=204)


@pytest.fixture
async def serve() -> AsyncIterator[ReceiverFactory]:
    """Start receivers on 127.0.0.1 and ::1 (the same port); all stop after the test."""
    servers: list[TestServer] = []
    receivers: list[Receiver] = []

    async def start(answer: Answer = accept) -> Receiver:
        receiver = Receiver(port=free_port())

        async def handle(request: web.Request) -> web.StreamResponse:
            receiver.paths.append(request.path)
            return await answer(request, receiver)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        for host in ("127.0.0.1", "::1"):
            server = TestServer(app, host=host, port=receiver.port)
            await server.start_server()
            servers.append(server)
        receivers.append(receiver)
        return receiver

    yield start
    for receiver in receivers:
        receiver.release.set()
    for server in servers:
        await server.close()


def free_port() -> int:
    """A TCP port free on both loopback addresses, at least for now: one free on ::1 may
    be taken on 127.0.0.1 (other processes' connections); then another is tried."""
    while True:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port: int = probe.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


# -- 1. what a delivery may reach --------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "localhost", "0.0.0.0", "[::1]", "[::ffff:127.0.0.1]"],  # noqa: S104
)
async def test_a_receiver_on_this_host_is_refused_at_connect_time(
    start_sender: SenderFactory, serve: ReceiverFactory, host: str
) -> None:
    receiver = await serve()
    outbox = start_sender(timeout_seconds=2)
    row = await outbox.attempted(outbox.add(receiver.url(host=host)))
    assert receiver.paths == []
    assert (row.last_error, row.last_status, row.delivered_at) == ("refused_address", None, None)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # a cloud's instance metadata
        "http://10.0.0.1:5038/",  # an AMI port on the LAN
        "http://192.168.1.1/",
        "http://100.64.0.1/",  # carrier-grade NAT
        "http://[fd00::1]/",  # IPv6 unique local
        "http://[fe80::1]/",  # IPv6 link-local
        "http://[::]/",
        "http://[64:ff9b::a00:1]/",  # NAT64 of 10.0.0.1
        "http://[2002:a00:1::]/",  # 6to4 of 10.0.0.1
    ],
)
async def test_inside_addresses_are_refused(start_sender: SenderFactory, url: str) -> None:
    outbox = start_sender(timeout_seconds=0.5)
    row = await outbox.attempted(outbox.add(url))
    assert (row.last_error, row.delivered_at) == ("refused_address", None)


async def test_allowed_networks_let_a_receiver_inside_through(
    start_sender: SenderFactory, serve: ReceiverFactory
) -> None:
    receiver = await serve()
    outbox = start_sender(allowed_networks=LOOPBACK)
    v4, v6, name = (outbox.add(receiver.url(host=h)) for h in ("127.0.0.1", "[::1]", "localhost"))
    for row_id in (v4, v6, name):
        row = await outbox.attempted(row_id)
        assert (row.last_status, row.last_error) == (204, None)
        assert row.delivered_at is not None
    assert receiver.paths == ["/hook"] * 3


async def test_an_allowed_network_opens_only_itself(
    start_sender: SenderFactory, serve: ReceiverFactory
) -> None:
    receiver = await serve()
    outbox = start_sender(allowed_networks=("::1/128",))
    row = await outbox.attempted(outbox.add(receiver.url(host="127.0.0.1")))
    assert row.last_error == "refused_address"
    assert receiver.paths == []


async def test_a_redirect_is_a_failed_delivery_and_is_not_followed(
    start_sender: SenderFactory, serve: ReceiverFactory
) -> None:
    async def redirect(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        if request.path == "/hook":
            raise web.HTTPTemporaryRedirect("/inside")
        return web.Response(status=204)

    receiver = await serve(redirect)
    outbox = start_sender(allowed_networks=LOOPBACK)
    row = await outbox.attempted(outbox.add(receiver.url()))
    await asyncio.sleep(0.2)  # time for a followed redirect to arrive
    assert receiver.paths == ["/hook"]
    assert (row.last_status, row.last_error, row.delivered_at) == (307, "http_status", None)
    assert row.next_attempt_at > row.created_at  # retried later, like any failure


# -- 2. what the client is told ----------------------------------------------


async def test_last_error_is_a_class_without_detail(
    start_sender: SenderFactory, serve: ReceiverFactory
) -> None:
    async def fail(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        return web.Response(status=500, text="Traceback: internal details")

    failing = await serve(fail)
    hanging = await serve(never_answer)
    outbox = start_sender(allowed_networks=LOOPBACK, timeout_seconds=0.5)
    refused = outbox.add(f"http://127.0.0.1:{free_port()}/hook")  # nothing listens there
    status = outbox.add(failing.url())
    slow = outbox.add(hanging.url())
    found = {row_id: await outbox.attempted(row_id) for row_id in (refused, status, slow)}
    assert (found[refused].last_error, found[refused].last_status) == ("connect_failed", None)
    assert (found[status].last_error, found[status].last_status) == ("http_status", 500)
    assert (found[slow].last_error, found[slow].last_status) == ("timeout", None)


# -- 3. how much of an answer is read ----------------------------------------


class Firehose:
    """A raw HTTP receiver that answers 200 with a huge body; counts the bytes it got out."""

    def __init__(self) -> None:
        self.sent = 0
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE_BODY)
            chunk = b"x" * 65536
            while self.sent < HUGE_BODY:
                writer.write(chunk)
                await writer.drain()
                self.sent += len(chunk)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the sender hung up: what this test wants
        finally:
            writer.close()
            self.done.set()


async def test_a_huge_answer_is_not_read(start_sender: SenderFactory) -> None:
    firehose = Firehose()
    server = await asyncio.start_server(firehose.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        outbox = start_sender(allowed_networks=LOOPBACK, timeout_seconds=10)
        started = time.monotonic()
        row = await outbox.attempted(outbox.add(f"http://127.0.0.1:{port}/hook"))
        async with asyncio.timeout(WAIT_S):
            await firehose.done.wait()  # the sender closed the connection
    finally:
        server.close()
        await server.wait_closed()
    assert (row.last_status, row.last_error) == (200, None)
    assert row.delivered_at is not None
    assert firehose.sent <= BUFFERED_AT_MOST, f"the sender took {firehose.sent} bytes"
    assert time.monotonic() - started < WAIT_S


# -- 4. a receiver that never answers ----------------------------------------


async def wait_until(condition: Callable[[], bool], timeout: float = WAIT_S) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_receiver_that_never_answers_delays_no_one_else(
    start_sender: SenderFactory, serve: ReceiverFactory
) -> None:
    hanging = await serve(never_answer)
    good = await serve()
    outbox = start_sender(allowed_networks=LOOPBACK, timeout_seconds=10)
    for _ in range(3):
        outbox.add(hanging.url())
    await wait_until(lambda: len(hanging.paths) == 3)  # all three are stuck in flight
    asked = time.monotonic()
    row = await outbox.attempted(outbox.add(good.url()))
    # Picked up at the sender's next look (at most a second), not after the others' timeout.
    assert time.monotonic() - asked < 2.0
    assert (row.last_status, row.last_error) == (204, None)
    assert good.paths == ["/hook"]


async def test_deliveries_in_flight_are_capped(
    start_sender: SenderFactory, serve: ReceiverFactory
) -> None:
    hanging = await serve(never_answer)
    outbox = start_sender(allowed_networks=LOOPBACK, timeout_seconds=10)
    for _ in range(MAX_IN_FLIGHT + 5):
        outbox.add(hanging.url())
    await wait_until(lambda: len(hanging.paths) >= MAX_IN_FLIGHT)
    await asyncio.sleep(0.5)  # time for any delivery beyond the cap to arrive
    assert len(hanging.paths) == MAX_IN_FLIGHT
    hanging.release.set()  # the stuck ones finish; the rest go out in the freed slots
    await wait_until(lambda: len(hanging.paths) == MAX_IN_FLIGHT + 5)
    await wait_until(lambda: all(r.delivered_at is not None for r in outbox.rows.values()))


async def test_a_row_that_cannot_be_attempted_waits_for_the_next_regular_look(
    start_sender: SenderFactory, serve: ReceiverFactory, caplog: pytest.LogCaptureFixture
) -> None:
    renders = 0

    async def broken(event: WebhookRecord) -> dict[str, Any]:
        nonlocal renders
        renders += 1
        raise RuntimeError("the verification cannot be rendered")

    receiver = await serve()
    outbox = start_sender(render_with=broken, allowed_networks=LOOPBACK)
    outbox.add(receiver.url())
    await asyncio.sleep(1.5)
    assert 1 <= renders <= 3  # about one a second, never a tight loop
    assert "could not be attempted" in caplog.text
    assert receiver.paths == []


# -- 5. what the logs show ----------------------------------------------------


@pytest.mark.parametrize("answer", ["refused", "status", "timeout"])
async def test_a_failed_delivery_logs_scheme_host_and_port_only(
    start_sender: SenderFactory,
    serve: ReceiverFactory,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    async def fail(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        return web.Response(status=503)

    port = free_port()
    if answer == "status":
        port = (await serve(fail)).port
    elif answer == "timeout":
        port = (await serve(never_answer)).port
    outbox = start_sender(allowed_networks=LOOPBACK, timeout_seconds=0.5)
    caplog.set_level(logging.INFO, logger="gateway.webhooks")
    url = f"http://alice:pa55word@127.0.0.1:{port}/hooks/otp?token=s3cret-token"
    await outbox.attempted(outbox.add(url))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"http://127.0.0.1:{port}" in logged
    for secret in ("alice", "pa55word", "/hooks", "token", "s3cret"):
        assert secret not in logged


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:p@Example.COM/a?b=c#d", "https://example.com:443"),
        ("http://[::1]:8080/x", "http://[::1]:8080"),
        ("http://example.com:99999/", "(unparsable URL)"),
    ],
)
def test_origin_keeps_scheme_host_and_port(url: str, shown: str) -> None:
    assert origin(url) == shown


# -- create-time checks of a callback_url --------------------------------------


@pytest.mark.parametrize(
    "url", ["https://user:pw@example.com/hook", "https://user@example.com/hook", "http://:x@a.b/"]
)
def test_a_callback_url_with_credentials_is_refused(url: str) -> None:
    with pytest.raises(InvalidCallbackUrl) as info:
        check_callback_url(url)
    assert info.value.extra == {"field": "callback_url"}


@pytest.mark.parametrize("url", ["ftp://example.com/", "/relative", "http://[::1/x"])
def test_a_callback_url_that_is_no_http_url_stays_an_invalid_request(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_callback_url(url)
    assert info.value.code == "invalid_request"


def test_a_public_callback_url_passes() -> None:
    url = "https://hooks.example.com:8443/otp?tenant=7"
    assert check_callback_url(url) == url


async def test_stop_cancels_deliveries_in_flight(serve: ReceiverFactory) -> None:
    hanging = await serve(never_answer)
    outbox = Outbox()
    config = WebhooksConfig(secret=SECRET, allowed_networks=LOOPBACK, timeout_seconds=30)
    sender = WebhookSender(config, outbox, render)
    sender.start()
    row_id = outbox.add(hanging.url())
    await wait_until(lambda: len(hanging.paths) == 1)
    async with asyncio.timeout(2):
        await sender.stop()
    # Not recorded as attempted: it goes out again at the next start (at least once).
    assert outbox.rows[row_id].attempts == 0
