"""The app factory: builds the aiohttp app and wires its parts through cleanup_ctx."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web, web_response

from gateway import dashboard
from gateway.api import operator, views
from gateway.api.bodies import MAX_BODY_BYTES
from gateway.api.handlers import auth_middleware, routes
from gateway.api.problems import (
    draining_middleware,
    metrics_middleware,
    problems_middleware,
    timeout_middleware,
)
from gateway.api.ratelimit import RequestRate
from gateway.api.typedefs import (
    CONFIG,
    DIALER,
    GATEWAY,
    METRICS,
    NUMBERS,
    PBX,
    REQUEST_RATE,
    STORE,
    VERIFICATIONS,
)
from gateway.config import SHUTDOWN_GRACE_S, Config, database_url
from gateway.dialer import CallJob, Dialer
from gateway.logs import call_ids
from gateway.metrics import Metrics
from gateway.numbers import Numbers
from gateway.pbx import AmiPbx, AmiSettings, Pbx
from gateway.pool import Pool
from gateway.retention import Retention
from gateway.store import Store, open_store
from gateway.verifications import Verifications
from gateway.webhooks import WebhookSender

log = logging.getLogger(__name__)

# aiohttp puts its name and version in every response's Server header, its own answers
# to malformed requests included (those never reach an app's signals): the gateway
# names nothing a scanner could match against a list of vulnerable versions. The
# module global is the only hook; tests/test_http_hardening.py checks it still works.
SERVER_HEADER = "otp-gateway"
web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]


def create_app(config: Config, pbx: Pbx | None = None) -> web.Application:
    """The gateway's API as an aiohttp app; `pbx` replaces the AMI connection in unit
    tests. Its operator routes are another app: create_operator_app."""
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[
            metrics_middleware,  # outermost: it sees the status problems_middleware chose
            problems_middleware,
            draining_middleware,
            timeout_middleware,
            auth_middleware,
        ],
    )
    app[CONFIG] = config
    app[METRICS] = Metrics(config.limits.key_daily_calls)
    if pbx is not None:
        app[PBX] = pbx
    app.cleanup_ctx.extend([_store_ctx, _pbx_ctx, _calls_ctx, _webhooks_ctx, _retention_ctx])
    app.add_routes(routes)
    return app


def create_operator_app(gateway: web.Application) -> web.Application:
    """/metrics and the dashboard, for a listener of their own (http.operator_port):
    they read the resources of `gateway` (create_app's), so start it after that one."""
    app = web.Application(middlewares=[problems_middleware])
    app[GATEWAY] = gateway
    app.add_routes(operator.routes)
    app.add_routes(dashboard.routes)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    database = app[CONFIG].database
    store = await open_store(database_url(database), database.pool_size)
    app[STORE] = store
    yield
    await store.close()


async def _pbx_ctx(app: web.Application) -> AsyncIterator[None]:
    if PBX in app:  # supplied by the caller, who owns its lifetime
        yield
        return
    ami = app[CONFIG].asterisk
    pbx = AmiPbx(
        AmiSettings(ami.host, ami.port, ami.username, ami.secret, ami.channel, ami.settle_seconds)
    )
    await pbx.start()
    app[PBX] = pbx
    yield
    await pbx.close()


async def _calls_ctx(app: web.Application) -> AsyncIterator[None]:
    config, store, pbx = app[CONFIG], app[STORE], app[PBX]
    pools = [Pool(p) for p in config.pools]
    by_name = {p.name: p for p in pools}

    def release_cli(pool: str, cli: str) -> None:
        if pool in by_name:
            by_name[pool].release(cli)

    metrics = app[METRICS]
    dialer = Dialer(app[PBX], store, config.calls, release_cli, metrics=metrics)
    metrics.watch(store, lambda: dialer.queued, lambda: dialer.in_flight, lambda: pbx.connected)
    verifications = Verifications(config, store, pools, dialer)
    app[DIALER] = dialer
    app[VERIFICATIONS] = verifications
    app[NUMBERS] = Numbers(config, store)
    app[REQUEST_RATE] = RequestRate(config.limits.key_requests_per_minute)
    dialer.start()
    await _restore_calls_of_previous_run(store, dialer, verifications)
    verifications.start()
    yield
    # Shutdown: the listener is already closed. Calls ringing now are let finish
    # (bounded by the longest ring); calls still queued stay queued for the next start.
    await dialer.drain(dialer.cap_seconds(config.calls.max_ring_seconds) + SHUTDOWN_GRACE_S)
    await verifications.stop()
    await dialer.stop()


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]

    async def render(verification_id: str) -> dict[str, Any]:
        found = await store.verification(verification_id)
        assert found is not None, "an outbox row always has its verification"
        return views.verification(*found, await store.call_events(found[1].id))

    sender = WebhookSender(app[CONFIG].webhooks, store, render)
    sender.start()
    yield
    await sender.stop()


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    retention = Retention(app[STORE], app[CONFIG].database.retention_days)
    retention.start()
    yield
    await retention.stop()


async def _restore_calls_of_previous_run(
    store: Store, dialer: Dialer, verifications: Verifications
) -> None:
    """Calls a previous process left live: queued ones are resumed, placed ones are
    followed to their end (or closed as lost); none is dialed a second time."""
    for call in await store.live_calls():
        found = await store.verification(call.verification_id)
        assert found is not None, "a call always has its verification"
        verification = found[0]
        if call.status != "queued":
            log.warning(
                "call %s was %s when the gateway stopped; following it",
                call.id,
                call.status,
                extra=call_ids(verification.id, call.id),
            )
            job = CallJob(
                call.id,
                verification.id,
                call.dial_number,
                cli="",
                cli_dial="",
                pool=verification.pool,
                ring_seconds=call.ring_seconds,
                queued_at=call.queued_at,
                early_media_is_alerting=verifications.early_media_is_alerting(verification),
            )
            # A 183 sets ringing_at too: only a "ringing" event on its timeline was a 180.
            rang = any(e.kind == "ringing" for e in await store.call_events(call.id))
            await dialer.adopt(job, call.dialed_at or call.queued_at, call.ringing_at, rang)
        elif await verifications.resume(verification, call):
            log.info(
                "call %s resumed after a restart", call.id, extra=call_ids(verification.id, call.id)
            )
        else:
            await store.end_call(
                call.id,
                call_status="failed",
                outcome="error",
                cause=None,
                sip_code=None,
                reason="gateway_restart",
                at=time.time(),
                fail_verification=True,
            )
