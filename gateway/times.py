"""Instants as text: RFC 3339 in UTC with milliseconds, the one format the gateway
writes (API bodies, webhook events, messages, the command line)."""

from __future__ import annotations

import functools
import math
from datetime import UTC, datetime
from typing import overload


@overload
def timestamp(at: float) -> str: ...
@overload
def timestamp(at: float | None) -> str | None: ...
def timestamp(at: float | None) -> str | None:
    """`at` (seconds since the epoch) as `2026-12-06T15:21:22.123Z`; None stays None.

    A response holds up to a dozen of these; datetime's isoformat made them a tenth of
    its cost, so the seconds are cached and the milliseconds added here."""
    if at is None:
        return None
    frac, whole = math.modf(at)
    micros = round(frac * 1_000_000)  # datetime.fromtimestamp rounds to microseconds
    if micros < 0:
        whole, micros = whole - 1, micros + 1_000_000
    elif micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    return f"{_second(int(whole))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4096)
def _second(whole: int) -> str:
    return datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
