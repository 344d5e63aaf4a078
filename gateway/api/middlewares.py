"""Every middleware of the API, outermost first as create_app lists them: count, turn
errors into problem+json, refuse while draining, bound the time, authenticate."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import apikeys, errors
from gateway.api.problems import (
    HTTP_CODES,
    STATUS,
    STORE_RETRY_AFTER_S,
    allow_header,
    problem,
)
from gateway.api.typedefs import API_KEY, CONFIG, DIALER, METRICS, REQUEST_RATE, STORE
from gateway.store import StoreUnavailable

log = logging.getLogger(__name__)


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each answer by route template (never the raw path: ids would explode it)."""
    started = time.perf_counter()
    response = await handler(request)
    request.app[METRICS].request(
        request.method, route_of(request), response.status, time.perf_counter() - started
    )
    return response


@web.middleware
async def problems_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error as problem+json; nothing escapes as an HTML page or a bare 500."""
    try:
        return await handler(request)
    except errors.GatewayError as exc:
        headers = {}
        if isinstance(exc, errors.RateLimited):
            request.app[METRICS].rate_limited.labels(limit=exc.limit).inc()
        if isinstance(exc, errors.Retryable):
            headers["Retry-After"] = str(exc.retry_after)
        return problem(STATUS.get(exc.code, 400), exc.code, exc.detail, exc.extra, headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_CODES.get(exc.status, "http_error")
        return problem(exc.status, code, exc.reason, headers=allow_header(exc))
    except StoreUnavailable as exc:  # nothing was written; the pool connects again
        log.warning("database unavailable on %s %s: %s", request.method, route_of(request), exc)
        return problem(
            503,
            "overloaded",
            "the gateway cannot reach its database; retry",
            headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, route_of(request))
        return problem(500, "internal_error", "the gateway failed to handle this request")


@web.middleware
async def draining_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """While the gateway shuts down, the API answers 503 (health checks still answer)."""
    if request.path.startswith("/v1/") and request.app[DIALER].draining:
        raise errors.Overloaded("the gateway is shutting down; retry", retry_after=5)
    return await handler(request)


@web.middleware
async def timeout_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A request that takes longer than http.request_timeout_seconds is answered 503."""
    limit = request.app[CONFIG].http.request_timeout_seconds
    try:
        async with asyncio.timeout(limit):
            return await handler(request)
    except TimeoutError:
        log.warning("%s %s took over %ss", request.method, route_of(request), limit)
        raise errors.Overloaded(f"the request took over {limit:g}s", retry_after=1) from None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every /v1 route needs `Authorization: Bearer <api key>`."""
    if request.path.startswith("/v1/"):
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        record = None
        if scheme.lower() == "bearer" and key:
            record = await apikeys.authenticate(request.app[STORE], key.strip())
        if record is None:
            raise errors.Unauthorized("a valid API key is needed: Authorization: Bearer <key>")
        if not apikeys.allowed_from(record, request.remote):
            raise errors.Unauthorized("this API key may not be used from this address")
        request.app[REQUEST_RATE].hit(record.id)
        request[API_KEY] = record
    return await handler(request)


def route_of(request: web.Request) -> str:
    """The route template (`/v1/numbers/{phone}`): never a raw path, which can hold a
    phone number or an id."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"
