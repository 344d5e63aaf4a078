"""The live dashboard's figures (served by gateway.api.operator at /dashboard/data):
counts alone, never a phone number, a code or a caller ID."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.alerts import MAX_OPEN
from gateway.api import views
from gateway.api.shapes import AlertMode
from gateway.config import PoolConfig
from gateway.numbers import Numbers
from gateway.outcomes import CAUSE_NAMES
from gateway.store import AlertKind, InstanceRecord, Store
from gateway.times import timestamp

MINUTE_S = 60
# One bar per clock minute, the current (partial) minute last.
CHART_MINUTES = 60
# Delivery and outcomes: an hour is enough calls to mean something at low volume,
# and short enough that a trunk going bad shows within minutes.
WINDOW_S = 3600


@dataclass(frozen=True, slots=True)
class Live:
    """What the running gateway is doing now, as opposed to what the store recorded."""

    pbx_connected: bool
    in_flight: int
    queued: int
    instance: str = ""  # this gateway's name (instance.name)
    nodes: list[Any] = field(default_factory=list)  # each node, as views.node shows it


async def dashboard_data(
    store: Store,
    numbers: Numbers,
    live: Live,
    now: float,
    *,
    pools: Sequence[PoolConfig] = (),
    channel: str = "",
) -> dict[str, Any]:
    """Every figure the dashboard shows, as of `now`; aggregates only. `pools` are the
    configured pools, in order, and `channel` the default channel template
    (asterisk.channel) of those that name none, as GET /v1/pools shows them."""
    minute = now // MINUTE_S * MINUTE_S
    chart_since = minute - (CHART_MINUTES - 1) * MINUTE_S
    # To the end of the current minute: exactly CHART_MINUTES bars, even on a boundary.
    per_minute = await store.calls_dialed(chart_since, minute + MINUTE_S, MINUTE_S)
    last_minute = sum(await store.calls_dialed(now - MINUTE_S, now, MINUTE_S))
    since = now - WINDOW_S
    stats = await numbers.stats(since, now)
    causes = await store.ended_by_cause(since, now)
    owned = await store.live_calls_by_owner()
    health = views.pools(pools, channel, await store.pool_health())
    return {
        "generated_at": timestamp(now),
        "pbx_connected": live.pbx_connected,
        "in_flight": live.in_flight,
        "queued": live.queued,
        "calls_last_minute": last_minute,
        # The Asterisk nodes as this gateway sees them.
        "nodes": live.nodes,
        # The gateways sharing the database, this one among them.
        "instances": [
            {
                "name": record.name,
                "this": record.name == live.instance,
                "state": _state(record, now),
                "started_at": timestamp(record.started_at),
                "lease_until": timestamp(record.lease_until),
                "live_calls": owned.get(record.name, 0),
            }
            for record in await store.instances()
        ],
        "calls_per_minute": [
            {"minute": timestamp(chart_since + i * MINUTE_S), "calls": calls}
            for i, calls in enumerate(per_minute)
        ],
        "window": {
            "seconds": WINDOW_S,
            "since": timestamp(since),
            "until": timestamp(now),
            **stats,
            "by_cause": [
                {
                    "outcome": outcome,
                    "hangup_cause": cause,
                    "cause_name": CAUSE_NAMES.get(cause) if cause is not None else None,
                    "calls": calls,
                }
                for outcome, cause, calls in causes
            ],
        },
        # Each configured pool and its health for each carrier its calls reached.
        "pools": msgspec.to_builtins(health),
        "open_alerts": await _open_alerts(store),
    }


async def _open_alerts(store: Store) -> list[dict[str, Any]]:
    """The conversion alerts not cleared, counted by kind and mode, every pair present:
    never their targets (a block is a number's prefix)."""
    counts = dict.fromkeys(itertools.product(AlertKind, AlertMode), 0)
    for alert in await store.alerts(True, MAX_OPEN):
        key = (alert.kind, alert.mode)
        if key in counts:  # always: conversion.mode is one of AlertMode
            counts[key] += 1
    return [
        {"kind": kind.value, "mode": mode.value, "count": count}
        for (kind, mode), count in counts.items()
    ]


def _state(record: InstanceRecord, now: float) -> str:
    """running (its lease runs), stopped (it ended its lease) or lost (its lease lapsed:
    its calls go to the others)."""
    if record.lease_until > now:
        return "running"
    return "stopped" if record.stopped_at is not None else "lost"
