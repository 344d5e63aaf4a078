"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json.

Kept beside the routes; tests/test_openapi.py fails when a route is not documented, and
tests/test_openapi_clients.py lints the document (Redocly CLI, Spectral) and drives a
client generated from it (openapi-python-client) against the app.

The schemas are generated from the declarations of gateway.api.shapes, the ones the
API decodes its requests with and encodes its responses from; the paths are written
here. For generated clients every enum is a named component, and a nullable one is
`anyOf: [{$ref}, {type: null}]`, so a generator makes one class of it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import msgspec

from gateway import __version__
from gateway.api import shapes
from gateway.api.bodies import MAX_BODY_BYTES
from gateway.numbers import DEFAULT_PAGE, LISTED_HEALTH, MAX_LOOKUP, MAX_PAGE

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


@functools.cache  # generated once: /openapi.json is asked for again and again
def _components() -> dict[str, Schema]:
    """The schemas of every body, generated from gateway.api.shapes, and the enum of
    the healths GET /v1/numbers lists (a query parameter)."""
    _, components = msgspec.json.schema_components(
        (*shapes.REQUESTS, *shapes.RESPONSES), ref_template="#/components/schemas/{name}"
    )
    components["ListedHealth"] = {
        "type": "string",
        "enum": list(LISTED_HEALTH),
        "description": "a health that GET /v1/numbers lists",
    }
    folded: dict[str, Schema] = _one_line_descriptions(components)
    return folded


def _one_line_descriptions(schema: Any) -> Any:
    """Docstrings as descriptions, their line breaks and indentation folded."""
    if isinstance(schema, dict):
        return {
            key: " ".join(value.split())
            if key == "description" and isinstance(value, str)
            else _one_line_descriptions(value)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_one_line_descriptions(item) for item in schema]
    return schema


RETRY_AFTER = {
    "description": "seconds to wait before retrying",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}

_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "insufficient_scope: the route needs an API key of scope admin",
    404: "not_found",
    409: "verification_not_pending (see verification_status)",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_phone",
    429: "rate_limited",
    503: "overloaded",
}
# Every /v1 operation can answer these.
_V1_ERRORS = (401, 429, 503)
_BODY_ERRORS = (400, 413, 415)
# Routes about every key's calls: a verify key gets 403 insufficient_scope.
ADMIN_ONLY = "Needs an API key of scope admin; a verify key gets 403 insufficient_scope."


def _problems(*statuses: int, reasons: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Error responses: problem+json, with Retry-After where it applies; `reasons`
    overrides a status's description where the operation answers other codes."""
    out: dict[str, Any] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": (reasons or {}).get(status, _REASONS[status]),
            "content": {"application/problem+json": {"schema": _ref("Problem")}},
        }
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"$ref": "#/components/headers/Retry-After"}}
        out[str(status)] = response
    return out


VERIFICATIONS = "verifications"
NUMBERS = "numbers"
OPERATIONS = "operations"
TAGS = [
    {"name": VERIFICATIONS, "description": "Missed-call verifications: create, read, check"},
    {"name": NUMBERS, "description": "What the gateway knows about numbers; statistics"},
    {"name": OPERATIONS, "description": "Health, metrics and documentation; no API key"},
]
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _json(schema: Schema, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: Schema) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _op(
    operation_id: str, tag: str, summary: str, responses: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """An operation; one without `security` is open: it needs no API key."""
    extra.setdefault("security", [])
    return {
        "operationId": operation_id,
        "tags": [tag],
        "summary": summary,
        "responses": responses,
        **extra,
    }


def _page(operation_id: str, summary: str, description: str) -> dict[str, Any]:
    return _op(
        operation_id,
        OPERATIONS,
        summary,
        {
            "200": {
                "description": description,
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    )


ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
PHONE = {"name": "phone", "in": "path", "required": True, "schema": {"type": "string"}}
REGION = {
    "name": "region",
    "in": "query",
    "description": "ISO 3166 alpha-2 region for a national number (numbers.default_region)",
    "schema": {"type": "string"},
}


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    # The handlers serve this document: imported once it is asked for, not with this module.
    from gateway.api import handlers

    verification = _json(_ref("Verification"), "the verification")
    check_result = _json(_ref("CheckResult"), "the check's result")
    not_pending = {409: "verification_not_pending: see the problem's verification_status"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "otp-gateway",
            "version": __version__,
            "description": "Missed-call OTP: the code is the trailing digits of the caller ID. "
            f"Request bodies are JSON, at most {MAX_BODY_BYTES} bytes.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [
            {
                "url": "/",
                "description": "this gateway (/metrics and /dashboard: its operator listener, "
                "http.operator_port)",
            }
        ],
        "tags": TAGS,
        "components": {
            "schemas": _components(),
            "headers": {"Retry-After": RETRY_AFTER},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key (otpk_...). Scope verify: its own "
                    "verifications and number lookups. Scope admin: also number health "
                    "lists and resets, wrong-check resets and stats.",
                }
            },
        },
        "paths": {
            "/v1/verifications": {
                "post": _op(
                    "createVerification",
                    VERIFICATIONS,
                    "Start a verification: validate the number and queue the call",
                    {
                        "201": {
                            **verification,
                            "headers": {
                                "Location": {
                                    "description": "the verification's URL",
                                    "required": True,
                                    "schema": {"type": "string"},
                                },
                                "Idempotent-Replayed": {
                                    "description": "true on a retry with the same "
                                    "Idempotency-Key and body: the first response again, "
                                    "and no new call; absent otherwise",
                                    "schema": {"type": "boolean"},
                                },
                            },
                        },
                        **_problems(
                            *_BODY_ERRORS,
                            409,
                            422,
                            *_V1_ERRORS,
                            reasons={
                                409: "idempotency_conflict: this Idempotency-Key was used "
                                "with another body",
                                422: "invalid_phone, phone_type_not_allowed, "
                                "region_not_allowed, destination_blocked, "
                                "number_known_invalid, invalid_callback_url, "
                                "unknown_channel, unknown_locale, channel_unavailable",
                                429: "rate_limited: a limit on calls (or on voice calls) "
                                "is reached; or destination_suspended: the conversion watch "
                                "suspended the destination's block, carrier or country",
                                503: "overloaded or pbx_unavailable",
                            },
                        ),
                    },
                    parameters=[
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "description": "a retry with the same key and body within 24 h "
                            "gets the first response again, and places no second call",
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": handlers.MAX_IDEMPOTENCY_KEY,
                                "pattern": "^[ -~]+$",
                            },
                        }
                    ],
                    requestBody=_body(_ref("VerificationCreate")),
                    security=BEARER,
                )
            },
            "/v1/verifications/{id}": {
                "get": _op(
                    "readVerification",
                    VERIFICATIONS,
                    "Read a verification and its call",
                    {"200": verification, **_problems(404, *_V1_ERRORS)},
                    parameters=[ID],
                    security=BEARER,
                )
            },
            "/v1/verifications/{id}/check": {
                "post": _op(
                    "checkVerification",
                    VERIFICATIONS,
                    "Check a code or a full caller ID",
                    {
                        "200": check_result,
                        **_problems(*_BODY_ERRORS, 404, 409, *_V1_ERRORS, reasons=not_pending),
                    },
                    parameters=[ID],
                    requestBody=_body(_ref("Check")),
                    security=BEARER,
                )
            },
            "/v1/verifications/check": {
                "post": _op(
                    "checkByPhone",
                    VERIFICATIONS,
                    "Check against the newest pending verification of a phone made with "
                    "this API key",
                    {
                        "200": check_result,
                        **_problems(*_BODY_ERRORS, 404, 409, 422, *_V1_ERRORS, reasons=not_pending),
                    },
                    requestBody=_body(_ref("CheckByPhone")),
                    security=BEARER,
                )
            },
            "/v1/verifications/{id}/next": {
                "post": _op(
                    "nextChannel",
                    VERIFICATIONS,
                    'Start the next channel now ("call me instead")',
                    {
                        "200": verification,
                        **_problems(
                            404,
                            409,
                            *_V1_ERRORS,
                            reasons={
                                409: "verification_not_pending, or no_next_channel: every "
                                "channel has been tried",
                                429: "rate_limited: asked again within "
                                "voice.next_min_gap_seconds, or a voice limit is reached",
                            },
                        ),
                    },
                    description="The verification's current call, if it still rings, is "
                    "hung up; the next channel's call is queued at once. Its code is the "
                    "same: a voice call speaks the digits the flash call showed.",
                    parameters=[ID],
                    security=BEARER,
                )
            },
            "/v1/verifications/{id}/cancel": {
                "post": _op(
                    "cancelVerification",
                    VERIFICATIONS,
                    "Cancel a verification; hang up a call still ringing",
                    {"200": verification, **_problems(404, 409, *_V1_ERRORS, reasons=not_pending)},
                    parameters=[ID],
                    security=BEARER,
                )
            },
            "/v1/numbers": {
                "get": _op(
                    "listNumbers",
                    NUMBERS,
                    "Numbers by health, paged",
                    {
                        "200": _json(_ref("NumberPage"), "a page of numbers"),
                        **_problems(400, 403, *_V1_ERRORS),
                    },
                    description=ADMIN_ONLY,
                    parameters=[
                        {
                            "name": "health",
                            "in": "query",
                            "required": True,
                            "schema": _ref("ListedHealth"),
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {
                                "type": "integer",
                                "minimum": 1,
                                "maximum": MAX_PAGE,
                                "default": DEFAULT_PAGE,
                            },
                        },
                        {
                            "name": "cursor",
                            "in": "query",
                            "description": "the previous page's next_cursor",
                            "schema": {"type": "string"},
                        },
                    ],
                    security=BEARER,
                )
            },
            "/v1/numbers/lookup": {
                "post": _op(
                    "lookupNumbers",
                    NUMBERS,
                    f"Validate up to {MAX_LOOKUP:,} numbers without calling them",
                    {
                        "200": _json(_ref("LookupResults"), "one result per number, in order"),
                        **_problems(*_BODY_ERRORS, *_V1_ERRORS),
                    },
                    requestBody=_body(_ref("Lookup")),
                    security=BEARER,
                )
            },
            "/v1/numbers/{phone}": {
                "get": _op(
                    "readNumber",
                    NUMBERS,
                    "Validity, type, carrier, policy and health of a number",
                    {
                        "200": _json(_ref("Number"), "what is known of the number"),
                        **_problems(400, *_V1_ERRORS),
                    },
                    parameters=[PHONE, REGION],
                    security=BEARER,
                )
            },
            "/v1/numbers/{phone}/health": {
                "delete": _op(
                    "resetNumberHealth",
                    NUMBERS,
                    "Forget what calls taught about a number",
                    {"204": {"description": "forgotten"}, **_problems(403, 422, *_V1_ERRORS)},
                    description=ADMIN_ONLY,
                    parameters=[PHONE],
                    security=BEARER,
                )
            },
            "/v1/numbers/{phone}/failed-checks": {
                "delete": _op(
                    "resetFailedChecks",
                    NUMBERS,
                    "Forget the wrong codes tried against a number, every key's: its checks "
                    "are no longer refused by the wrong-check limits",
                    {"204": {"description": "forgotten"}, **_problems(403, 422, *_V1_ERRORS)},
                    description=ADMIN_ONLY,
                    parameters=[PHONE],
                    security=BEARER,
                )
            },
            "/v1/stats": {
                "get": _op(
                    "readStats",
                    NUMBERS,
                    "Delivery statistics over a window, by carrier and outcome",
                    {
                        "200": _json(_ref("Stats"), "the statistics"),
                        **_problems(400, 403, *_V1_ERRORS),
                    },
                    description=ADMIN_ONLY,
                    parameters=[
                        {
                            "name": "window",
                            "in": "query",
                            "description": "a number and a unit (90s, 15m, 24h, 7d) ending at "
                            "until; 24h by default",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "since",
                            "in": "query",
                            "description": "RFC 3339 with a time zone; instead of window",
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "until",
                            "in": "query",
                            "description": "RFC 3339 with a time zone; now by default",
                            "schema": {"type": "string"},
                        },
                    ],
                    security=BEARER,
                )
            },
            "/v1/pools": {
                "get": _op(
                    "listPools",
                    NUMBERS,
                    "Each caller-ID pool and its health for each carrier its calls reached",
                    {"200": _json(_ref("Pools"), "the pools"), **_problems(403, *_V1_ERRORS)},
                    description=ADMIN_ONLY,
                    security=BEARER,
                )
            },
            "/v1/alerts": {
                "get": _op(
                    "listAlerts",
                    NUMBERS,
                    "The conversion watch's alerts, newest first",
                    {
                        "200": _json(_ref("AlertList"), "the alerts"),
                        **_problems(400, 403, *_V1_ERRORS),
                    },
                    description=ADMIN_ONLY,
                    parameters=[
                        {
                            "name": "state",
                            "in": "query",
                            "description": "open (the default): those not cleared; all: every "
                            "alert still kept",
                            "schema": {"type": "string", "enum": ["open", "all"]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "description": "at most this many (default 100)",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                    ],
                    security=BEARER,
                )
            },
            "/v1/alerts/{alert_id}": {
                "delete": _op(
                    "liftAlert",
                    NUMBERS,
                    "Lift an open alert: its target takes verifications again and its "
                    "conversion is counted afresh",
                    {
                        "204": {"description": "lifted"},
                        **_problems(
                            403,
                            404,
                            *_V1_ERRORS,
                            reasons={404: "not_found: no open alert with this id"},
                        ),
                    },
                    description=ADMIN_ONLY,
                    parameters=[
                        {
                            "name": "alert_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    security=BEARER,
                )
            },
            "/healthz": {
                "get": _op(
                    "healthz",
                    OPERATIONS,
                    "The process is alive",
                    {"200": _json(_ref("Liveness"), "alive")},
                )
            },
            "/readyz": {
                "get": _op(
                    "readyz",
                    OPERATIONS,
                    "Database usable and AMI of at least one node logged in; each node listed",
                    {
                        "200": _json(_ref("Readiness"), "ready"),
                        "503": _json(_ref("Readiness"), "not ready"),
                    },
                )
            },
            "/metrics": {
                "get": _op(
                    "metrics",
                    OPERATIONS,
                    "Prometheus metrics; on the operator listener (http.operator_port) only",
                    {
                        "200": {
                            "description": "text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                )
            },
            "/openapi.json": {
                "get": _op(
                    "openapi",
                    OPERATIONS,
                    "This document",
                    {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                )
            },
            "/docs": {
                "get": _page(
                    "docs",
                    "This document rendered by Swagger UI (assets served by the gateway)",
                    "the page",
                )
            },
            "/dashboard": {
                "get": _page(
                    "dashboard",
                    "Live dashboard page (HTML); on the operator listener only, like /metrics",
                    "the page; it polls /dashboard/data every 2 s",
                )
            },
            "/dashboard/data": {
                "get": _op(
                    "dashboardData",
                    OPERATIONS,
                    "The dashboard's figures: aggregates only; on the operator listener only",
                    {"200": _json(_ref("Dashboard"), "the figures")},
                )
            },
        },
    }
