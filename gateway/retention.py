"""Retention: finished verifications, with their calls, call events and webhooks, are
deleted database.retention_days after they were created, a few hundred at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.store import Store
from gateway.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DAY_S = 86400
# Retention is counted in days: a sweep an hour keeps it within the hour.
SWEEP_INTERVAL_S = 3600.0
# Verifications deleted per transaction. The API shares the one database connection:
# a batch holds it for a few milliseconds, then the API's queued work runs.
BATCH = 500
# Between two batches the sweep steps aside this long, so a backlog (the first sweep
# after an upgrade) never holds the database for long.
BATCH_PAUSE_S = 0.05


async def forget_old(store: Store, before: float, batch: int = BATCH) -> int:
    """Delete the finished verifications created before `before` (and their calls,
    events and webhooks), `batch` per transaction; return how many."""
    forgotten = 0
    after: int | None = 0
    while after is not None:
        deleted, after = await store.forget_verifications(before, after, batch)
        forgotten += deleted
        if after is not None:
            await asyncio.sleep(BATCH_PAUSE_S)
    return forgotten


class Retention:
    """Runs forget_old for what is older than `days`, at start and every `interval`."""

    def __init__(
        self,
        store: Store,
        days: int,
        clock: Callable[[], float] = time.time,
        interval: float = SWEEP_INTERVAL_S,
    ) -> None:
        self._store = store
        self._days = days
        self._clock = clock
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sweeping; with 0 days (keep for ever), do nothing."""
        if self._days:
            self._task = asyncio.create_task(self._sweeps(), name="retention")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _sweeps(self) -> None:
        while True:
            try:
                forgotten = await forget_old(self._store, self._clock() - self._days * DAY_S)
            except Exception:
                log.exception("retention sweep failed")
            else:
                if forgotten:
                    log.info(
                        "retention: deleted %d verifications older than %d days",
                        forgotten,
                        self._days,
                    )
            await asyncio.sleep(self._interval)
