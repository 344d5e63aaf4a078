"""The webhook sender: delivers the outbox, signed the Standard Webhooks way, with retries."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from standardwebhooks import Webhook

from gateway.config import WebhooksConfig
from gateway.logs import call_ids
from gateway.store import Store, WebhookRecord

log = logging.getLogger(__name__)

BATCH = 50  # outbox rows taken per pass
MAX_SLEEP_S = 1.0  # a new row is picked up within this
MAX_BACKOFF_S = 3600.0  # retries are at least this frequent, until the give-up time

# Renders a verification as the API shows it (the payload's `data`).
RenderVerification = Callable[[str], Any]


class WebhookSender:
    """Delivers due outbox rows; at least once, receivers dedupe by webhook-id."""

    def __init__(self, config: WebhooksConfig, store: Store, render: RenderVerification) -> None:
        self._config = config
        self._store = store
        self._render = render
        self._signer = Webhook(config.secret) if config.secret else None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._config.timeout_seconds)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = asyncio.create_task(self._run(), name="webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                due = await self._store.due_webhooks(time.time(), BATCH)
                if due:
                    await asyncio.gather(*(self._deliver(row) for row in due))
                    continue
                upcoming = await self._store.next_webhook_at()
            except Exception:
                log.exception("webhook pass failed")
                upcoming = None
            wait = MAX_SLEEP_S if upcoming is None else upcoming - time.time()
            await asyncio.sleep(min(max(wait, 0.01), MAX_SLEEP_S))

    async def _deliver(self, row: WebhookRecord) -> None:
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
        try:
            async with self._session.post(row.url, data=payload, headers=headers) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        delivered = status is not None and 200 <= status < 300
        at = time.time()
        next_at = None
        if not delivered:
            give_up_at = row.created_at + self._config.give_up_seconds
            delay = min(MAX_BACKOFF_S, self._config.retry_base_seconds * 2**row.attempts)
            delay *= random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
            if at + delay < give_up_at:
                next_at = at + delay
            log.warning(
                "webhook %s (%s) to %s failed: %s; %s",
                row.id,
                row.type,
                row.url,
                status or error,
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
            "created_at": datetime.fromtimestamp(row.created_at, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "data": await self._render(row.verification_id),
        }
