"""The app factory: builds the aiohttp app and wires its parts through cleanup_ctx."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web, web_response

from gateway.alerts import Alerts
from gateway.api import operator, views
from gateway.api.bodies import MAX_BODY_BYTES
from gateway.api.handlers import routes
from gateway.api.middlewares import (
    auth_middleware,
    draining_middleware,
    metrics_middleware,
    problems_middleware,
    timeout_middleware,
)
from gateway.api.ratelimit import RequestRate
from gateway.api.typedefs import (
    ALERTS,
    CONFIG,
    DIALER,
    GATEWAY,
    MEMBERSHIP,
    METRICS,
    NODES,
    NUMBERS,
    REQUEST_RATE,
    STORE,
    VERIFICATIONS,
)
from gateway.config import SHUTDOWN_GRACE_S, Config, database_url, instance_name, nodes
from gateway.dialer import Dialer
from gateway.instances import Membership
from gateway.metrics import Metrics
from gateway.nodes import Node, Nodes
from gateway.numbers import Numbers
from gateway.pbx import AmiPbx, AmiSettings, Pbx
from gateway.pool import Pool
from gateway.retention import Retention
from gateway.store import Snapshot, WebhookRecord, open_store
from gateway.verifications import Verifications
from gateway.webhooks import WebhookSender

log = logging.getLogger(__name__)

# aiohttp puts its name and version in every response's Server header, its own answers
# to malformed requests included (those never reach an app's signals): the gateway
# names nothing a scanner could match against a list of vulnerable versions. The
# module global is the only hook; tests/test_http_hardening.py checks it still works.
SERVER_HEADER = "otp-gateway"
web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]


def create_app(
    config: Config, pbx: Pbx | None = None, pbxs: dict[str, Pbx] | None = None
) -> web.Application:
    """The gateway's API as an aiohttp app; `pbx` replaces the AMI connection in unit
    tests (`pbxs`: each node's, by name). Its operator routes are another app:
    create_operator_app."""
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
        (only,) = nodes(config)  # one fake cannot stand for several nodes
        pbxs = {only.name: pbx}
    if pbxs is not None:
        app[NODES] = _nodes(config, pbxs)
    app.cleanup_ctx.extend([_store_ctx, _pbx_ctx, _calls_ctx, _webhooks_ctx, _retention_ctx])
    app.add_routes(routes)
    return app


def create_operator_app(gateway: web.Application) -> web.Application:
    """/metrics and the dashboard, for a listener of their own (http.operator_port):
    they read the resources of `gateway` (create_app's), so start it after that one."""
    app = web.Application(middlewares=[problems_middleware])
    app[GATEWAY] = gateway
    app.add_routes(operator.routes)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    database = app[CONFIG].database
    store = await open_store(database_url(database), database.pool_size)
    app[STORE] = store
    yield
    await store.close()


def _nodes(config: Config, pbxs: dict[str, Pbx]) -> Nodes:
    return Nodes(
        [
            Node(node.name, pbxs[node.name], node.max_concurrent, node.max_per_second)
            for node in nodes(config)
        ]
    )


async def _pbx_ctx(app: web.Application) -> AsyncIterator[None]:
    """An AMI connection to every node, each supervised on its own."""
    if NODES in app:  # supplied by the caller, who owns their lifetime
        yield
        return
    config = app[CONFIG]
    amis = {
        node.name: AmiPbx(
            AmiSettings(
                node.host,
                node.port,
                node.username,
                node.secret,
                node.channel,
                node.settle_seconds,
                name=node.name,
            )
        )
        for node in nodes(config)
    }
    for ami in amis.values():
        await ami.start()
    app[NODES] = _nodes(config, dict(amis))
    yield
    for ami in amis.values():
        await ami.close()


async def _calls_ctx(app: web.Application) -> AsyncIterator[None]:
    config, store, pbx_nodes = app[CONFIG], app[STORE], app[NODES]
    pools = [Pool(p) for p in config.pools]
    by_name = {p.name: p for p in pools}

    def release_cli(pool: str, cli: str) -> None:
        if pool in by_name:
            by_name[pool].release(cli)

    metrics = app[METRICS]
    name = instance_name(config)
    dialer = Dialer(pbx_nodes, store, config.calls, release_cli, metrics=metrics, owner=name)
    metrics.watch(
        store, lambda: dialer.queued, lambda: dialer.in_flight, lambda: pbx_nodes.connected
    )
    for node in pbx_nodes.all:
        metrics.watch_node(
            node.name,
            lambda node=node: node.pbx.connected,  # type: ignore[misc]
            lambda node=node: dialer.on_node(node)[1],  # type: ignore[misc]
        )
    verifications = Verifications(config, store, pools, dialer)
    dialer.on_ended = verifications.call_ended
    alerts = Alerts(config, store, metrics)
    verifications.alerts = alerts
    dialer.on_pool_change = alerts.pool_changed
    app[ALERTS] = alerts
    app[DIALER] = dialer
    app[VERIFICATIONS] = verifications
    app[NUMBERS] = Numbers(config, store)
    app[REQUEST_RATE] = RequestRate(config.limits.key_requests_per_minute)
    membership = Membership(store, dialer, verifications, name, config.instance.lease_seconds)
    app[MEMBERSHIP] = membership
    dialer.start()
    await membership.join()
    verifications.start()
    alerts.start()
    yield
    await alerts.stop()
    # Shutdown: the listener is already closed. Calls still queued go to the other
    # gateways sharing the database (or to the next start); calls ringing now are let
    # finish (bounded by the longest ring), then the lease ends.
    await membership.close(drain_seconds(config, dialer))


def drain_seconds(config: Config, dialer: Dialer) -> float:
    """How long shutdown lets the calls ringing end: the longest a call can last (a
    voice call talks on once answered)."""
    voice = dialer.cap_seconds(config.voice.ring_seconds) + config.voice.max_seconds
    return max(dialer.cap_seconds(config.calls.max_ring_seconds), voice) + SHUTDOWN_GRACE_S


async def _webhooks_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]

    async def render(event: WebhookRecord) -> dict[str, Any]:
        """The verification as it was when the event happened."""
        if event.snapshot is not None:
            then = Snapshot.decode(event.snapshot)
            data: dict[str, Any] = msgspec.to_builtins(
                views.verification(
                    then.verification, then.call, then.events, steps=then.steps or None
                )
            )
            return data
        # A row from before snapshots were kept: as it is now, the best left to say.
        found = await store.verification(event.verification_id)
        assert found is not None, "an outbox row always has its verification"
        now: dict[str, Any] = msgspec.to_builtins(
            views.verification(*found, await store.call_events(found[1].id))
        )
        return now

    sender = WebhookSender(app[CONFIG].webhooks, store, render)
    sender.start()
    yield
    await sender.stop()


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    retention = Retention(app[STORE], app[CONFIG].database.retention_days)
    retention.start()
    yield
    await retention.stop()
