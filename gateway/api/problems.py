"""RFC 9457 problem+json: the one place domain errors become HTTP responses."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import errors
from gateway.api.typedefs import CONFIG, DIALER, METRICS
from gateway.store import StoreUnavailable

log = logging.getLogger(__name__)

PROBLEM_TYPE = "application/problem+json"
# A lost database is usually back (reconnected, failed over) within seconds.
STORE_RETRY_AFTER_S = 2

STATUS = {
    errors.InvalidRequest.code: 400,
    errors.Unauthorized.code: 401,
    errors.InsufficientScope.code: 403,
    errors.NotFound.code: 404,
    errors.VerificationNotPending.code: 409,
    errors.IdempotencyConflict.code: 409,
    errors.PayloadTooLarge.code: 413,
    errors.UnsupportedMediaType.code: 415,
    errors.InvalidPhone.code: 422,
    errors.PhoneTypeNotAllowed.code: 422,
    errors.RegionNotAllowed.code: 422,
    errors.DestinationBlocked.code: 422,
    errors.NumberKnownInvalid.code: 422,
    errors.InvalidCallbackUrl.code: 422,
    errors.RateLimited.code: 429,
    errors.PbxUnavailable.code: 503,
    errors.Overloaded.code: 503,
}
# Errors aiohttp raises itself (no route, wrong method, body over the limit).
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def problem(
    status: int,
    code: str,
    detail: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A problem+json response with a stable `code` member."""
    body: dict[str, Any] = {
        "type": f"https://otp-gateway.invalid/problems/{code}",
        "title": code.replace("_", " ").capitalize(),
        "status": status,
        "code": code,
        "detail": detail,
    }
    # Extra members never replace RFC 9457's own (status, type, title, detail).
    body.update({k: v for k, v in (extra or {}).items() if k not in body})
    return web.Response(
        status=status,
        text=json.dumps(body),
        content_type=PROBLEM_TYPE,
        headers=headers,
    )


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
        code = _HTTP_CODES.get(exc.status, "http_error")
        return problem(exc.status, code, exc.reason, headers=_allow(exc))
    except StoreUnavailable as exc:  # nothing was written; the pool connects again
        log.warning("database unavailable on %s %s: %s", request.method, _route(request), exc)
        return problem(
            503,
            "overloaded",
            "the gateway cannot reach its database; retry",
            headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
        )
    except Exception:
        log.exception("unhandled error on %s %s", request.method, _route(request))
        return problem(500, "internal_error", "the gateway failed to handle this request")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each answer by route template (never the raw path: ids would explode it)."""
    started = time.perf_counter()
    response = await handler(request)
    request.app[METRICS].request(
        request.method, _route(request), response.status, time.perf_counter() - started
    )
    return response


def _route(request: web.Request) -> str:
    """The route template (`/v1/numbers/{phone}`): never a raw path, which can hold a
    phone number or an id."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


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
        log.warning("%s %s took over %ss", request.method, _route(request), limit)
        raise errors.Overloaded(f"the request took over {limit:g}s", retry_after=1) from None


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
