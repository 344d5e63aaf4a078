"""The webhook sender: delivers the outbox, signed the Standard Webhooks way, with retries.

A callback URL is the client's to choose, so every connection is checked against the
address it really goes to (after DNS): only globally routable addresses, or those in
`webhooks.allowed_networks`, are reached.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from standardwebhooks import Webhook

from gateway.config import WebhooksConfig
from gateway.logs import call_ids
from gateway.store import Outbox, WebhookRecord
from gateway.tasks import cancel_and_wait
from gateway.times import timestamp

log = logging.getLogger(__name__)

MAX_SLEEP_S = 1.0  # a new row is picked up within this
MAX_BACKOFF_S = 3600.0  # retries are at least this frequent, until the give-up time
# Deliveries in flight at once. Each holds a socket for up to timeout_seconds, so a
# receiver that never answers ties up only the slots of its own rows; 20 also stays
# far below the file descriptors the API and AMI need.
MAX_IN_FLIGHT = 20
# A row taken for delivery is held by this sender (no other gateway sharing the
# database takes it) for the attempt's timeout and this much more to record it; if the
# sender dies holding it, the row falls due again after that.
CLAIM_MARGIN_S = 30.0

# What the client sees in a delivery's last_error: a class, never the detail (the
# detail of a connection error tells which inside ports are open). The logs have it.
CONNECT_FAILED = "connect_failed"
TIMEOUT = "timeout"
HTTP_STATUS = "http_status"
REFUSED_ADDRESS = "refused_address"

DEFAULT_PORTS = {"http": 80, "https": 443}

# Renders an event's verification as the API shows it (the payload's `data`).
RenderVerification = Callable[[WebhookRecord], Awaitable[dict[str, Any]]]


class RefusedAddress(OSError):
    """A delivery would connect to an address outside what webhooks may reach."""

    def __init__(self) -> None:
        # One text for every address: aiohappyeyeballs keeps the type of an error only
        # when all the addresses of a name failed with the same text.
        super().__init__("not a globally routable address, nor in webhooks.allowed_networks")


class WebhookSender:
    """Delivers due outbox rows; at least once, receivers dedupe by webhook-id."""

    def __init__(self, config: WebhooksConfig, store: Outbox, render: RenderVerification) -> None:
        self._config = config
        self._store = store
        self._render = render
        self._signer = Webhook(config.secret) if config.secret else None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[str, asyncio.Task[bool]] = {}  # by webhook id
        self._slot_freed = asyncio.Event()

    def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_seconds)
        # Every address aiohttp connects to, a name's or a literal's, passes the check.
        connector = aiohttp.TCPConnector(limit=MAX_IN_FLIGHT, socket_factory=self._socket_for)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        """Stop sending; deliveries in flight are dropped and go out again at the next start."""
        await cancel_and_wait(self._task)
        self._task = None
        deliveries = list(self._in_flight.values())
        for task in deliveries:
            task.cancel()
        await asyncio.gather(*deliveries, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _socket_for(self, addr_info: tuple[Any, ...]) -> socket.socket:
        """A socket for aiohttp to connect to `addr_info`, if webhooks may reach it."""
        family, kind, proto, _, address = addr_info
        try:
            allowed = self._config.reaches(ipaddress.ip_address(address[0]))
        except ValueError:
            allowed = False
        if not allowed:
            log.info("webhook: refused to connect to %s (not globally routable)", address[0])
            raise RefusedAddress()
        return socket.socket(family=family, type=kind, proto=proto)

    async def _run(self) -> None:
        while True:
            # Cleared before the look: a slot freed during it wakes the wait below.
            self._slot_freed.clear()
            try:
                wait = await self._start_due()
            except Exception:
                log.exception("webhook pass failed")
                wait = MAX_SLEEP_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), min(max(wait, 0.01), MAX_SLEEP_S))

    async def _start_due(self) -> float:
        """Start a delivery per due row while slots are free; the seconds until the next look."""
        free = MAX_IN_FLIGHT - len(self._in_flight)
        if free <= 0:
            return MAX_SLEEP_S  # a delivery that ends wakes the loop sooner
        now = time.time()
        hold = self._config.timeout_seconds + CLAIM_MARGIN_S
        for row in await self._store.claim_webhooks(now, free, hold):
            task = asyncio.create_task(self._deliver(row), name=f"webhook {row.id}")
            self._in_flight[row.id] = task
            task.add_done_callback(functools.partial(self._finished, row.id))
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            return MAX_SLEEP_S
        upcoming = await self._store.next_webhook_at()
        if upcoming is None or upcoming <= now:  # none, or one in flight
            return MAX_SLEEP_S
        return upcoming - now

    def _finished(self, row_id: str, task: asyncio.Task[bool]) -> None:
        del self._in_flight[row_id]
        # After a failure of our own the row waits for the next regular look, not for
        # the loop to start it again at once, and fail again, in a tight loop.
        if not task.cancelled() and task.result():
            self._slot_freed.set()

    async def _deliver(self, row: WebhookRecord) -> bool:
        """Attempt one row; False when the attempt could not even be made and recorded."""
        try:
            await self._attempt(row)
        except Exception:
            log.exception(
                "webhook %s (%s) could not be attempted", row.id, row.type,
                extra=call_ids(row.verification_id),
            )  # fmt: skip
            return False
        return True

    async def _attempt(self, row: WebhookRecord) -> None:
        assert self._session is not None
        payload = row.payload or await self._store.fix_webhook_payload(
            row.id, json.dumps(await self._event(row))
        )
        now = datetime.now(UTC)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": row.id,
            "webhook-timestamp": str(int(now.timestamp())),
        }
        if self._signer is not None:
            headers["webhook-signature"] = self._signer.sign(row.id, now, payload)
        status: int | None = None
        error: str | None = None
        detail = ""
        try:
            # A redirect is the receiver's answer, not a place to post the signed body to.
            # The body is never read: a receiver answering 300 MB costs nothing but the
            # buffers the connection holds until it is closed on leaving the block.
            async with self._session.post(
                row.url, data=payload, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            error, detail = _classify(exc)
        delivered = status is not None and 200 <= status < 300
        if status is not None and not delivered:
            error, detail = HTTP_STATUS, str(status)
        at = time.time()
        next_at = None
        if not delivered:
            give_up_at = row.created_at + self._config.give_up_seconds
            delay = min(MAX_BACKOFF_S, self._config.retry_base_seconds * 2**row.attempts)
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
            if at + delay < give_up_at:
                next_at = at + delay
            log.warning(
                "webhook %s (%s) to %s failed: %s (%s); %s",
                row.id,
                row.type,
                origin(row.url),
                error,
                detail,
                f"retry in {delay:.1f}s" if next_at else "giving up",
                extra=call_ids(row.verification_id),
            )
        await self._store.webhook_attempted(
            row.id,
            at=at,
            status=status,
            error=error,
            delivered=delivered,
            next_attempt_at=next_at,
        )

    async def _event(self, row: WebhookRecord) -> dict[str, Any]:
        return {
            "id": row.id,
            "type": row.type,
            "created_at": timestamp(row.created_at),
            "data": await self._render(row),
        }


def _classify(exc: Exception) -> tuple[str, str]:
    """The client's class of a failed attempt, and the detail for the log.

    The detail is the exception's name, with its text only where that text holds no
    more than a host and port (aiohttp's connection timeout names the whole URL)."""
    name = type(exc).__name__
    if isinstance(exc, TimeoutError):  # aiohttp's timeouts too
        return TIMEOUT, name
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, RefusedAddress):
            return REFUSED_ADDRESS, name
        return CONNECT_FAILED, f"{name}: {exc}"
    if isinstance(exc, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError):
        return CONNECT_FAILED, f"{name}: {exc}"
    return CONNECT_FAILED, name


def origin(url: str) -> str:
    """`scheme://host:port` of a URL: what a log may show of it (no path, query or user)."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "(unparsable URL)"
    if host is None:
        return "(unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{port or DEFAULT_PORTS.get(parts.scheme, '')}"
