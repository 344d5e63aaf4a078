"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json.

Kept beside the routes; tests/test_openapi.py fails when a route is not documented.
"""

from __future__ import annotations

from typing import Any

from gateway import __version__
from gateway.api.bodies import MAX_BODY_BYTES
from gateway.config import MAX_RING_SECONDS
from gateway.outcomes import Outcome

Schema = dict[str, Any]


def _nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


TIME = _nullable("string", format="date-time")
STATUSES = ["pending", "approved", "canceled", "expired", "failed", "max_attempts_reached"]
OUTCOMES = [outcome.value for outcome in Outcome]
HEALTH = ["unknown", "reachable", "unreachable", "invalid"]

SCHEMAS: dict[str, Schema] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details with a stable machine-readable code.",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "code": {"type": "string"},
            "detail": {"type": "string"},
        },
        "required": ["type", "title", "status", "code", "detail"],
        "additionalProperties": True,
    },
    "VerificationCreate": {
        "type": "object",
        "properties": {
            "phone": {
                "type": "string",
                "maxLength": 64,
                "description": "E.164, or national digits read with region",
            },
            "region": _nullable("string", maxLength=2),
            "reference": _nullable("string", maxLength=128),
            "callback_url": _nullable("string", maxLength=2048, format="uri"),
            "ring_seconds": _nullable(
                "integer",
                minimum=1,
                maximum=MAX_RING_SECONDS,
                description="at most the gateway's calls.max_ring_seconds (15 by default)",
            ),
        },
        "required": ["phone"],
        "additionalProperties": False,
    },
    "Check": {
        "type": "object",
        "description": "Exactly one of code (the trailing digits) or cli (the full number).",
        "properties": {
            "code": _nullable("string", maxLength=16),
            "cli": _nullable("string", maxLength=64),
        },
        "additionalProperties": False,
    },
    "CheckByPhone": {
        "type": "object",
        "properties": {
            "phone": {"type": "string", "maxLength": 64},
            "region": _nullable("string", maxLength=2),
            "code": _nullable("string", maxLength=16),
            "cli": _nullable("string", maxLength=64),
        },
        "required": ["phone"],
        "additionalProperties": False,
    },
    "CheckResult": _obj(
        {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": STATUSES},
            "valid": {"type": "boolean"},
            "attempts_remaining": {"type": "integer"},
        }
    ),
    "CallEvent": _obj(
        {
            "at": TIME,
            "kind": {"type": "string"},
            "cause": _nullable("integer"),
            "sip_code": _nullable("integer"),
        }
    ),
    "Webhook": _obj(
        {
            "id": {"type": "string"},
            "type": {"type": "string"},
            "status": {"type": "string", "enum": ["pending", "delivered", "failed"]},
            "attempts": {"type": "integer"},
            "last_status": _nullable("integer"),
            "last_error": _nullable(
                "string",
                description="why the last attempt failed: connect_failed, timeout, "
                "http_status (see last_status) or refused_address",
            ),
            "delivered_at": TIME,
            "next_attempt_at": TIME,
        }
    ),
    "Verification": _obj(
        {
            "id": {"type": "string", "pattern": "^vrf_[0-9a-f]{32}$"},
            "status": {"type": "string", "enum": STATUSES},
            "phone": {"type": "string"},
            "reference": _nullable("string"),
            "callback_url": _nullable("string"),
            "sandbox": {
                "type": "boolean",
                "description": "A configured test number: never called, its code is fixed",
            },
            "cli": _obj(
                {
                    "prefix": {"type": "string"},
                    "length": {"type": "integer"},
                    "pattern": {"type": "string"},
                }
            ),
            "call": _obj(
                {
                    "status": {
                        "type": "string",
                        "enum": ["queued", "dialing", "ringing", "completed", "failed"],
                    },
                    "outcome": {"type": ["string", "null"], "enum": [*OUTCOMES, None]},
                    "hangup_cause": _nullable("integer"),
                    "sip_code": _nullable("integer"),
                    "reason": _nullable(
                        "string",
                        description="why the gateway ended the call itself: ring_timeout "
                        "(its ring time ran out after a 180 or a lone 183), "
                        "post_dial_timeout (nothing alerted in "
                        "time), canceled; or what failed (originate_refused, pbx_lost, ...). "
                        "null when the network ended it: see hangup_cause and sip_code",
                    ),
                    "ring_seconds": {"type": "integer"},
                    "node": _nullable(
                        "string",
                        description="the Asterisk node the call was placed on (asterisk.nodes, "
                        "or asterisk.name); null until it is placed",
                    ),
                    "dialed_at": TIME,
                    "ringing_at": TIME,
                    "ended_at": TIME,
                    "events": {"type": "array", "items": _ref("CallEvent")},
                }
            ),
            "webhooks": {"type": "array", "items": _ref("Webhook")},
            "attempts_remaining": {"type": "integer"},
            "expires_at": TIME,
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "Health": _obj(
        {
            "status": {"type": ["string", "null"], "enum": [*HEALTH, None]},
            "calls": {"type": "integer"},
            "delivered": {"type": "integer"},
            "last_outcome": _nullable("string"),
            "last_cause": _nullable("integer"),
            "last_sip_code": _nullable("integer"),
            "last_call_at": TIME,
            "last_delivered_at": TIME,
        }
    ),
    "Number": _obj(
        {
            "input": {"type": ["string", "number", "null"]},
            "e164": _nullable("string"),
            "valid": {"type": "boolean"},
            "possible": {"type": "boolean"},
            "reason": _nullable("string"),
            "type": _nullable("string"),
            "region": _nullable("string"),
            "carrier": _nullable("string"),
            "callable": {"type": "boolean"},
            "refused_by": _nullable("string"),
            "health": _ref("Health"),
        }
    ),
    "Totals": _obj(
        {
            "calls": {"type": "integer"},
            "delivered": {"type": "integer"},
            "uncertain": {
                "type": "integer",
                "description": "calls that only ever showed early media (progress_only)",
            },
            "failed": {"type": "integer"},
            "delivery_rate": _nullable("number"),
        }
    ),
}
BY_OUTCOME = {"type": "object", "additionalProperties": {"type": "integer"}}
SCHEMAS["Stats"] = _obj(
    {
        "since": TIME,
        "until": TIME,
        **SCHEMAS["Totals"]["properties"],
        "by_outcome": BY_OUTCOME,
        "by_carrier": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "carrier": {"type": "string"},
                    **SCHEMAS["Totals"]["properties"],
                    "by_outcome": BY_OUTCOME,
                },
                "required": [
                    "carrier",
                    "calls",
                    "delivered",
                    "uncertain",
                    "failed",
                    "delivery_rate",
                    "by_outcome",
                ],
                "additionalProperties": False,
            },
        },
    }
)


# GET /dashboard/data: counts only, never a phone number, code or caller ID.
SCHEMAS["Dashboard"] = _obj(
    {
        "generated_at": TIME,
        "pbx_connected": {"type": "boolean"},
        "in_flight": {"type": "integer", "description": "calls placed and not yet ended"},
        "queued": {"type": "integer", "description": "calls waiting to be placed"},
        "calls_last_minute": {"type": "integer", "description": "calls dialed in the last 60 s"},
        "calls_per_minute": {
            "type": "array",
            "description": "calls dialed in each of the last 60 clock minutes, oldest first",
            "items": _obj({"minute": TIME, "calls": {"type": "integer"}}),
        },
        "window": {
            "type": "object",
            "description": "dialed calls that ended in the last hour",
            "properties": {
                "seconds": {"type": "integer"},
                **SCHEMAS["Stats"]["properties"],
                "by_cause": {
                    "type": "array",
                    "items": _obj(
                        {
                            "outcome": {"type": "string", "enum": OUTCOMES},
                            "hangup_cause": _nullable("integer"),
                            "cause_name": _nullable("string"),
                            "calls": {"type": "integer"},
                        }
                    ),
                },
            },
            "required": ["seconds", *SCHEMAS["Stats"]["required"], "by_cause"],
            "additionalProperties": False,
        },
    }
)


def _problems(*statuses: int) -> dict[str, Any]:
    """Error responses: problem+json, with Retry-After where it applies."""
    out: dict[str, Any] = {}
    for status in statuses:
        response: dict[str, Any] = {
            "description": _REASONS[status],
            "content": {"application/problem+json": {"schema": _ref("Problem")}},
        }
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
        out[str(status)] = response
    return out


_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "insufficient_scope: the route needs an API key of scope admin",
    404: "not_found",
    405: "method_not_allowed",
    409: "verification_not_pending or idempotency_conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_phone, phone_type_not_allowed, region_not_allowed, destination_blocked, "
    "number_known_invalid, invalid_callback_url",
    429: "rate_limited",
    503: "overloaded or pbx_unavailable",
}
# Every /v1 operation can answer these.
_V1_ERRORS = (401, 429, 503)
_BODY_ERRORS = (400, 413, 415)
# Routes about every key's calls: a verify key gets 403 insufficient_scope.
ADMIN_ONLY = "Needs an API key of scope admin; a verify key gets 403 insufficient_scope."


def _json(schema: Schema, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: Schema) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _op(operation_id: str, summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"operationId": operation_id, "summary": summary, "responses": responses, **extra}


ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
PHONE = {"name": "phone", "in": "path", "required": True, "schema": {"type": "string"}}
REGION = {"name": "region", "in": "query", "schema": {"type": "string"}}


def document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    verification = _json(_ref("Verification"), "the verification")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "otp-gateway",
            "version": __version__,
            "description": "Missed-call OTP: the code is the trailing digits of the caller ID. "
            f"Request bodies are JSON, at most {MAX_BODY_BYTES} bytes.",
        },
        "components": {
            "schemas": SCHEMAS,
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
                    "Start a verification: validate the number and queue the call",
                    {"201": verification, **_problems(*_BODY_ERRORS, 409, 422, *_V1_ERRORS)},
                    parameters=[
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "schema": {"type": "string", "maxLength": 255},
                        }
                    ],
                    requestBody=_body(_ref("VerificationCreate")),
                    security=[{"bearer": []}],
                )
            },
            "/v1/verifications/{id}": {
                "get": _op(
                    "readVerification",
                    "Read a verification and its call",
                    {"200": verification, **_problems(404, *_V1_ERRORS)},
                    parameters=[ID],
                    security=[{"bearer": []}],
                )
            },
            "/v1/verifications/{id}/check": {
                "post": _op(
                    "checkVerification",
                    "Check a code or a full caller ID",
                    {
                        "200": _json(_ref("CheckResult"), "the check's result"),
                        **_problems(*_BODY_ERRORS, 404, 409, *_V1_ERRORS),
                    },
                    parameters=[ID],
                    requestBody=_body(_ref("Check")),
                    security=[{"bearer": []}],
                )
            },
            "/v1/verifications/check": {
                "post": _op(
                    "checkByPhone",
                    "Check against the newest pending verification of a phone made with "
                    "this API key",
                    {
                        "200": _json(_ref("CheckResult"), "the check's result"),
                        **_problems(*_BODY_ERRORS, 404, 409, 422, *_V1_ERRORS),
                    },
                    requestBody=_body(_ref("CheckByPhone")),
                    security=[{"bearer": []}],
                )
            },
            "/v1/verifications/{id}/cancel": {
                "post": _op(
                    "cancelVerification",
                    "Cancel a verification; hang up a call still ringing",
                    {"200": verification, **_problems(404, 409, *_V1_ERRORS)},
                    parameters=[ID],
                    security=[{"bearer": []}],
                )
            },
            "/v1/numbers": {
                "get": _op(
                    "listNumbers",
                    "Numbers by health, paged",
                    {
                        "200": _json(
                            _obj(
                                {
                                    "numbers": {
                                        "type": "array",
                                        "items": _obj(
                                            {"phone": {"type": "string"}, "health": _ref("Health")}
                                        ),
                                    },
                                    "next_cursor": _nullable("string"),
                                }
                            ),
                            "a page of numbers",
                        ),
                        **_problems(400, 403, *_V1_ERRORS),
                    },
                    description=ADMIN_ONLY,
                    parameters=[
                        {
                            "name": "health",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "enum": HEALTH[1:]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    ],
                    security=[{"bearer": []}],
                )
            },
            "/v1/numbers/lookup": {
                "post": _op(
                    "lookupNumbers",
                    "Validate up to 1,000 numbers without calling them",
                    {
                        "200": _json(
                            _obj({"results": {"type": "array", "items": _ref("Number")}}),
                            "one result per number, in order",
                        ),
                        **_problems(*_BODY_ERRORS, *_V1_ERRORS),
                    },
                    requestBody=_body(
                        {
                            "type": "object",
                            "properties": {
                                "phones": {"type": "array", "maxItems": 1000},
                                "region": _nullable("string", maxLength=2),
                            },
                            "required": ["phones"],
                            "additionalProperties": False,
                        }
                    ),
                    security=[{"bearer": []}],
                )
            },
            "/v1/numbers/{phone}": {
                "get": _op(
                    "readNumber",
                    "Validity, type, carrier, policy and health of a number",
                    {
                        "200": _json(_ref("Number"), "what is known of the number"),
                        **_problems(400, *_V1_ERRORS),
                    },
                    parameters=[PHONE, REGION],
                    security=[{"bearer": []}],
                )
            },
            "/v1/numbers/{phone}/health": {
                "delete": _op(
                    "resetNumberHealth",
                    "Forget what calls taught about a number",
                    {"204": {"description": "forgotten"}, **_problems(403, 422, *_V1_ERRORS)},
                    description=ADMIN_ONLY,
                    parameters=[PHONE],
                    security=[{"bearer": []}],
                )
            },
            "/v1/numbers/{phone}/failed-checks": {
                "delete": _op(
                    "resetFailedChecks",
                    "Forget the wrong codes tried against a number, every key's: its checks "
                    "are no longer refused by the wrong-check limits",
                    {"204": {"description": "forgotten"}, **_problems(403, 422, *_V1_ERRORS)},
                    description=ADMIN_ONLY,
                    parameters=[PHONE],
                    security=[{"bearer": []}],
                )
            },
            "/v1/stats": {
                "get": _op(
                    "readStats",
                    "Delivery statistics over a window, by carrier and outcome",
                    {
                        "200": _json(SCHEMAS["Stats"], "the statistics"),
                        **_problems(400, 403, *_V1_ERRORS),
                    },
                    description=ADMIN_ONLY,
                    parameters=[
                        {"name": "window", "in": "query", "schema": {"type": "string"}},
                        {"name": "since", "in": "query", "schema": {"type": "string"}},
                        {"name": "until", "in": "query", "schema": {"type": "string"}},
                    ],
                    security=[{"bearer": []}],
                )
            },
            "/healthz": {
                "get": _op(
                    "healthz", "The process is alive", {"200": _json({"type": "object"}, "alive")}
                )
            },
            "/readyz": {
                "get": _op(
                    "readyz",
                    "Database usable and AMI of at least one node logged in; each node listed",
                    {
                        "200": _json({"type": "object"}, "ready"),
                        "503": _json({"type": "object"}, "not ready"),
                    },
                )
            },
            "/metrics": {
                "get": _op(
                    "metrics",
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
                    "openapi", "This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")}
                )
            },
            "/docs": {
                "get": _op(
                    "docs",
                    "This document rendered by Swagger UI (assets served by the gateway)",
                    {
                        "200": {
                            "description": "the page",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                )
            },
            "/dashboard": {
                "get": _op(
                    "dashboard",
                    "Live dashboard page (HTML); on the operator listener only, like /metrics",
                    {
                        "200": {
                            "description": "the page; it polls /dashboard/data every 2 s",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                )
            },
            "/dashboard/data": {
                "get": _op(
                    "dashboardData",
                    "The dashboard's figures: aggregates only; on the operator listener only",
                    {"200": _json(SCHEMAS["Dashboard"], "the figures")},
                )
            },
        },
    }
