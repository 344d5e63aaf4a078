"""The webhook sender against real receivers on loopback: which addresses it reaches, how
much of an answer it reads, what it tells the client and the logs, how a receiver that
never answers is contained; and, on the SQLite store's outbox, how deliveries are
signed, retried, given up and claimed."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks import Webhook

from gateway.api.bodies import check_callback_url
from gateway.config import WebhooksConfig
from gateway.errors import InvalidCallbackUrl, InvalidRequest
from gateway.store import CallStatus, Store, WebhookRecord, open_store
from gateway.webhooks import MAX_IN_FLIGHT, RenderVerification, WebhookSender, origin
from tests.conftest import make_call, make_verification

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


# -- 6. on the SQLite store: signing, retries, giving up, claims -----------------

_events = itertools.count(1)
RETRY_BASE_S = 0.1  # retry_base_seconds of the retry test: its retries take under a second


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """The SQLite store, whose webhook_outbox the sender delivers."""
    opened = await open_store(tmp_path / "gateway.sqlite3")
    yield opened
    await opened.close()


async def add_event(store: Store, url: str, at: float) -> WebhookRecord:
    """A verification with the callback URL `url` whose call failed (busy) at `at`: its
    one outbox row, verification.failed, due from `at`."""
    n = next(_events)
    vid, cid, phone = f"vrf_{n}", f"call_{n}", f"+62812{n:08d}"
    await store.create_verification(
        make_verification(vid, phone=phone, created_at=at - 10, callback_url=url),
        make_call(cid, vid, phone=phone, queued_at=at - 10),
    )
    await store.end_call(
        cid,
        call_status=CallStatus.FAILED,
        outcome="busy",
        cause=17,
        sip_code=486,
        reason=None,
        at=at,
        fail_verification=True,
    )
    [row] = await store.webhooks_of(vid)
    assert (row.type, row.url, row.next_attempt_at, row.attempts) == (
        "verification.failed",
        url,
        at,
        0,
    )
    return row


async def row_when(
    store: Store, row: WebhookRecord, done: Callable[[WebhookRecord], bool]
) -> WebhookRecord:
    """`row` as stored, once `done` holds for it."""
    async with asyncio.timeout(WAIT_S):
        while True:
            [stored] = [r for r in await store.webhooks_of(row.verification_id) if r.id == row.id]
            if done(stored):
                return stored
            await asyncio.sleep(0.02)


@dataclass(frozen=True)
class Attempt:
    """One attempt, as the sender recorded it in the store."""

    webhook_id: str
    at: float
    status: int | None
    error: str | None
    delivered: bool
    next_attempt_at: float | None


class RecordedOutbox:
    """The store as the sender's outbox, noting each attempt the sender records."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.attempts: list[Attempt] = []

    async def claim_webhooks(self, now: float, limit: int, hold: float) -> list[WebhookRecord]:
        return await self.store.claim_webhooks(now, limit, hold)

    async def next_webhook_at(self) -> float | None:
        return await self.store.next_webhook_at()

    async def fix_webhook_payload(self, webhook_id: str, payload: str) -> str:
        return await self.store.fix_webhook_payload(webhook_id, payload)

    async def webhook_attempted(self, webhook_id: str, **attempt: Any) -> None:
        self.attempts.append(Attempt(webhook_id, **attempt))
        await self.store.webhook_attempted(webhook_id, **attempt)


StoreSenderFactory = Callable[..., WebhookSender]


@pytest.fixture
async def start_store_sender(store: Store) -> AsyncIterator[StoreSenderFactory]:
    """Start senders on the store (or on a RecordedOutbox in front of it), receivers on
    loopback allowed; other WebhooksConfig fields as keywords."""
    senders: list[WebhookSender] = []

    def start(outbox: RecordedOutbox | None = None, **settings: Any) -> WebhookSender:
        config = WebhooksConfig(secret=SECRET, allowed_networks=LOOPBACK, **settings)
        sender = WebhookSender(config, outbox or store, render)
        sender.start()
        senders.append(sender)
        return sender

    yield start
    for sender in senders:
        await sender.stop()


@dataclass(frozen=True)
class Delivery:
    """A request a receiver got: when (wall clock), its headers (names in lower case)
    and its body."""

    arrived: float
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


def recording(into: list[Delivery], statuses: tuple[int, ...] = (), pause: float = 0.0) -> Answer:
    """An answer that notes each request in `into`, waits `pause`, then answers with
    `statuses` in turn, and 204 after them."""
    answers = iter(statuses)

    async def answer(request: web.Request, receiver: Receiver) -> web.StreamResponse:
        headers = {name.lower(): value for name, value in request.headers.items()}
        into.append(Delivery(time.time(), headers, await request.read()))
        await asyncio.sleep(pause)
        return web.Response(status=next(answers, 204))

    return answer


async def test_a_delivery_is_signed_the_standard_webhooks_way(
    store: Store, start_store_sender: StoreSenderFactory, serve: ReceiverFactory
) -> None:
    got: list[Delivery] = []
    receiver = await serve(recording(got))
    at = float(int(time.time()) - 2)  # a whole second, so its RFC 3339 form is plain
    row = await add_event(store, receiver.url(), at)
    start_store_sender()
    done = await row_when(store, row, lambda r: r.delivered_at is not None)

    [delivery] = got
    headers = delivery.headers
    assert (headers["webhook-id"], headers["content-type"]) == (row.id, "application/json")
    signed_at = int(headers["webhook-timestamp"])
    assert delivery.arrived - 5 <= signed_at <= delivery.arrived
    # v1: HMAC-SHA256 over "id.timestamp.body", keyed by the base64 after whsec_.
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{row.id}.{signed_at}.".encode() + delivery.body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == f"v1,{signature}"
    # What a receiver does with the library: the headers verify, the event is inside.
    event = Webhook(SECRET).verify(delivery.body, headers)
    assert event == {
        "id": row.id,
        "type": "verification.failed",
        "created_at": datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "data": {"id": row.verification_id, "status": "pending"},
    }
    assert done.payload is not None and json.loads(done.payload) == event  # kept for retries
    assert (done.attempts, done.last_status, done.last_error) == (1, 204, None)
    assert done.given_up_at is None


async def test_a_failed_delivery_is_retried_with_a_doubling_backoff(
    store: Store, start_store_sender: StoreSenderFactory, serve: ReceiverFactory
) -> None:
    got: list[Delivery] = []
    receiver = await serve(recording(got, statuses=(500, 503, 500)))
    row = await add_event(store, receiver.url(), time.time())
    outbox = RecordedOutbox(store)
    start_store_sender(outbox, retry_base_seconds=RETRY_BASE_S)
    done = await row_when(store, row, lambda r: r.delivered_at is not None)

    assert [(a.status, a.error, a.delivered) for a in outbox.attempts] == [
        (500, "http_status", False),
        (503, "http_status", False),
        (500, "http_status", False),
        (204, None, True),
    ]
    failed = outbox.attempts[:3]
    for before, attempt in enumerate(failed):
        assert attempt.next_attempt_at is not None
        delay = attempt.next_attempt_at - attempt.at
        # retry_base_seconds, doubled for each attempt before; jitter takes up to half.
        ceiling = RETRY_BASE_S * 2**before
        assert ceiling / 2 - 1e-6 <= delay <= ceiling + 1e-6, (before, delay)
    assert [d.webhook_id for d in got] == [row.id] * 4
    for attempt, retry in zip(failed, got[1:], strict=True):
        assert attempt.next_attempt_at is not None
        assert retry.arrived >= attempt.next_attempt_at  # sent once due, not before
    assert len({d.body for d in got}) == 1  # the same event every time
    assert (done.attempts, done.last_status, done.last_error) == (4, 204, None)
    assert done.given_up_at is None


async def test_a_delivery_is_given_up_when_its_next_retry_would_come_too_late(
    store: Store, start_store_sender: StoreSenderFactory, serve: ReceiverFactory
) -> None:
    got: list[Delivery] = []
    receiver = await serve(recording(got, statuses=(500, 500)))
    now = time.time()
    # With retry_base_seconds 10 the first retry comes 5 to 10 s after the failure:
    # past the give-up time (60 s after the event) of an event 57 s old, within that of
    # one 40 s old.
    late = await add_event(store, receiver.url(), now - 57)
    young = await add_event(store, receiver.url(), now - 40)
    start_store_sender(retry_base_seconds=10, give_up_seconds=60)
    given_up = await row_when(store, late, lambda r: r.attempts > 0)
    retried = await row_when(store, young, lambda r: r.attempts > 0)

    assert (given_up.last_status, given_up.last_error, given_up.delivered_at) == (
        500,
        "http_status",
        None,
    )
    assert given_up.given_up_at is not None
    assert retried.given_up_at is None
    assert now + 5 <= retried.next_attempt_at <= time.time() + 10
    assert sorted(d.webhook_id for d in got) == sorted([late.id, young.id])
    assert await store.pending_webhooks() == 1  # the young one, to retry


async def test_two_senders_on_one_outbox_deliver_each_row_once(
    store: Store, start_store_sender: StoreSenderFactory, serve: ReceiverFactory
) -> None:
    got: list[Delivery] = []
    # Answers take a while: the rows are still in flight when the other sender looks.
    receiver = await serve(recording(got, pause=0.3))
    rows = [await add_event(store, receiver.url(), time.time()) for _ in range(12)]
    start_store_sender()
    start_store_sender()
    delivered = [await row_when(store, r, lambda r: r.delivered_at is not None) for r in rows]
    await asyncio.sleep(1.2)  # both senders look again (at least once a second)

    assert sorted(d.webhook_id for d in got) == sorted(r.id for r in rows)
    assert [r.attempts for r in delivered] == [1] * len(rows)
