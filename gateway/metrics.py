"""Prometheus metrics, one registry per app (tests run several apps in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from gateway.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DAY = 86400.0


class Metrics:
    """The gateway's metrics; figures kept in the database are read at scrape time."""

    def __init__(self, key_daily_calls: int) -> None:
        self.registry = CollectorRegistry()
        self.key_calls = Gauge(
            "otp_api_key_calls_24h",
            "Calls requested by each API key in the last 24 hours (the daily budget's use)",
            ["api_key", "name"],
            registry=self.registry,
        )
        self.key_budget = Gauge(
            "otp_api_key_daily_call_budget",
            "Calls each API key may request in a rolling day (limits.key_daily_calls)",
            registry=self.registry,
        )
        self.key_budget.set(key_daily_calls)

    async def render(self, store: Store) -> bytes:
        """The text exposition, after refreshing the figures read from the store."""
        names = {k.id: k.name for k in await store.api_keys()}
        self.key_calls.clear()
        for key_id, calls in (await store.calls_by_key(time.time() - DAY)).items():
            self.key_calls.labels(api_key=key_id, name=names.get(key_id, "")).set(calls)
        return generate_latest(self.registry)
