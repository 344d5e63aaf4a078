"""Requests per minute per API key, counted in memory at the HTTP edge."""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.errors import RateLimited

MINUTE = 60.0
# Windows older than this many minutes are dropped when the table is swept, so a
# gateway serving many keys does not grow without bound.
_SWEEP_EVERY = 1024


class RequestRate:
    """A fixed one-minute window per key.

    In memory on purpose: it guards the HTTP edge against a runaway client, costs no
    write per request, and starts afresh after a restart (at most one minute's count
    is lost). The limits that protect phones and the bill are counted in the database.
    """

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        self._hits = 0

    def hit(self, key_id: str) -> None:
        """Count one request by `key_id`, or raise RateLimited."""
        now = self._clock()
        start, count = self._windows.get(key_id, (now, 0))
        if now - start >= MINUTE:
            start, count = now, 0
        if count >= self._per_minute:
            raise RateLimited(start + MINUTE - now, "key_requests_per_minute")
        self._windows[key_id] = (start, count + 1)
        self._hits += 1
        if self._hits % _SWEEP_EVERY == 0:
            self._windows = {k: w for k, w in self._windows.items() if now - w[0] < MINUTE}
