"""The operator's routes, served on their own listener (http.operator_port), never on the
API's: /metrics names API keys and which limit fired, which the API tells no client; the
dashboard, a static page at /dashboard that polls /dashboard/data. Neither needs an API
key."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
from aiohttp import web

from gateway.api import shapes, views
from gateway.api.typedefs import CONFIG, DIALER, GATEWAY, METRICS, NODES, NUMBERS, STORE
from gateway.dashboard import Live, dashboard_data
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "static" / "dashboard"

# The page loads only its own files and talks only to its own origin.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    gateway = request.app[GATEWAY]
    body = await gateway[METRICS].render(gateway[STORE])
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


@routes.get("/dashboard")
async def dashboard_page(request: web.Request) -> web.FileResponse:
    """The page; its script polls /dashboard/data."""
    return web.FileResponse(DASHBOARD_DIR / "index.html", headers=PAGE_HEADERS)


@routes.get("/dashboard/data")
async def dashboard_figures(request: web.Request) -> web.Response:
    """The dashboard's figures: counts only, so it may go without an API key."""
    app = request.app[GATEWAY]  # the API app, whose resources these are
    dialer, pbx_nodes = app[DIALER], app[NODES]
    live = Live(
        pbx_nodes.connected,
        dialer.in_flight,
        dialer.queued,
        dialer.owner,
        [views.node(node, *dialer.on_node(node)) for node in pbx_nodes.all],
    )
    config = app[CONFIG]
    figures = await dashboard_data(
        app[STORE],
        app[NUMBERS],
        live,
        time.time(),
        pools=config.pools,
        channel=config.asterisk.channel,
    )
    body = views.encode(msgspec.convert(figures, shapes.Dashboard))
    return web.Response(
        body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
    )


routes.static("/dashboard/assets", DASHBOARD_DIR / "assets")
