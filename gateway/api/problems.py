"""RFC 9457 problem+json: how a domain error or an HTTP error is answered (the
middleware that answers them is in gateway.api.middlewares)."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from aiohttp import web

from gateway import errors
from gateway.api import shapes

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
    errors.NoNextChannel.code: 409,
    errors.PayloadTooLarge.code: 413,
    errors.UnsupportedMediaType.code: 415,
    errors.InvalidPhone.code: 422,
    errors.PhoneTypeNotAllowed.code: 422,
    errors.RegionNotAllowed.code: 422,
    errors.DestinationBlocked.code: 422,
    errors.NumberKnownInvalid.code: 422,
    errors.InvalidCallbackUrl.code: 422,
    errors.UnknownChannel.code: 422,
    errors.UnknownLocale.code: 422,
    errors.ChannelUnavailable.code: 422,
    errors.RateLimited.code: 429,
    errors.DestinationSuspended.code: 429,
    errors.PbxUnavailable.code: 503,
    errors.Overloaded.code: 503,
}
# Errors aiohttp raises itself (no route, wrong method, body over the limit).
HTTP_CODES = {
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
    # Extra members never replace RFC 9457's own (status, type, title, detail); each is
    # declared (shapes.Problem), and one that is not is left out, never a 500 instead.
    members = {k: v for k, v in (extra or {}).items() if k in _EXTRA_MEMBERS}
    if len(members) != len(extra or {}):
        log.error(
            "problem %s: undeclared members %s left out",
            code,
            sorted(set(extra or {}) - set(members)),
        )
    body = shapes.Problem(
        type=f"https://otp-gateway.invalid/problems/{code}",
        title=code.replace("_", " ").capitalize(),
        status=status,
        code=code,
        detail=detail,
        **members,
    )
    return web.Response(
        status=status,
        body=_ENCODER.encode(body),
        content_type=PROBLEM_TYPE,
        headers=headers,
    )


_ENCODER = msgspec.json.Encoder()
_EXTRA_MEMBERS = frozenset(shapes.Problem.__struct_fields__) - {
    "type",
    "title",
    "status",
    "code",
    "detail",
}


def allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
