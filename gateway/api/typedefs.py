"""Typed keys for what the app and its requests carry."""

from __future__ import annotations

from aiohttp import web

from gateway.alerts import Alerts
from gateway.api.ratelimit import RequestRate
from gateway.config import Config
from gateway.dialer import Dialer
from gateway.instances import Membership
from gateway.metrics import Metrics
from gateway.nodes import Nodes
from gateway.numbers import Numbers
from gateway.store import ApiKeyRecord, Store
from gateway.verifications import Verifications

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
NODES = web.AppKey("nodes", Nodes)
DIALER = web.AppKey("dialer", Dialer)
MEMBERSHIP = web.AppKey("membership", Membership)
VERIFICATIONS = web.AppKey("verifications", Verifications)
NUMBERS = web.AppKey("numbers", Numbers)
REQUEST_RATE = web.AppKey("request_rate", RequestRate)
METRICS = web.AppKey("metrics", Metrics)
ALERTS = web.AppKey("alerts", Alerts)
# On the operator app: the API app, whose resources the operator routes read.
GATEWAY = web.AppKey("gateway", web.Application)
# Set by the auth middleware on every /v1 request.
API_KEY = web.RequestKey("api_key", ApiKeyRecord)


def api_key(request: web.Request) -> ApiKeyRecord:
    """The authenticated key of a /v1 request."""
    return request[API_KEY]
