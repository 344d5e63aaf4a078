"""The operator's routes, served on their own listener (http.operator_port), never on the
API's: /metrics names API keys and which limit fired, which the API tells no client."""

from __future__ import annotations

from aiohttp import web

from gateway.api.typedefs import GATEWAY, METRICS, STORE
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

routes = web.RouteTableDef()


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    gateway = request.app[GATEWAY]
    body = await gateway[METRICS].render(gateway[STORE])
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})
