"""The OpenAPI 3.1 document of the HTTP API, served at /openapi.json.

Kept beside the routes; tests/test_openapi.py fails when a route is not documented, and
tests/test_openapi_clients.py lints the document (Redocly CLI, Spectral) and drives a
client generated from it (openapi-python-client) against the app.

For generated clients: every enum is a named component, and a nullable one is
`anyOf: [{$ref}, {type: null}]`, so a generator makes one class of it; request bodies
are read from the handlers' own Field tables, so their limits are the ones enforced.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from gateway import __version__, apikeys
from gateway.api.bodies import MAX_BODY_BYTES, Field
from gateway.config import CallsConfig
from gateway.numbers import DEFAULT_PAGE, LISTED_HEALTH, MAX_LOOKUP, MAX_PAGE
from gateway.outcomes import Health, Outcome
from gateway.store import CallStatus, VerificationStatus, WebhookStatus

Schema = dict[str, Any]


def _nullable(kind: str, **extra: Any) -> Schema:
    return {"type": [kind, "null"], **extra}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable_ref(name: str) -> Schema:
    """A named schema or null: one class in a generated client (an enum written as
    `type: [string, null]` with null among its values makes three)."""
    return {"anyOf": [_ref(name), {"type": "null"}]}


def _enum(values: Any, description: str) -> Schema:
    return {"type": "string", "enum": [str(value) for value in values], "description": description}


def _obj(properties: dict[str, Schema], required: list[str] | None = None) -> Schema:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


def _array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


TIME = _nullable("string", format="date-time")

_TOTALS: dict[str, Schema] = {
    "calls": {"type": "integer"},
    "delivered": {"type": "integer"},
    "uncertain": {
        "type": "integer",
        "description": "calls that only ever showed early media (progress_only)",
    },
    "failed": {"type": "integer"},
    "delivery_rate": _nullable("number"),
}
_STATS: dict[str, Schema] = {
    "since": TIME,
    "until": TIME,
    **_TOTALS,
    "by_outcome": _ref("ByOutcome"),
    "by_carrier": _array(_ref("CarrierStats")),
}

SCHEMAS: dict[str, Schema] = {
    "Problem": {
        "type": "object",
        "description": "RFC 9457 problem details with a stable machine-readable code. The "
        "members after detail are sent with the codes named in their descriptions.",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "code": {
                "type": "string",
                "description": "stable and machine-readable: invalid_request, unauthorized, "
                "insufficient_scope, not_found, verification_not_pending, "
                "idempotency_conflict, payload_too_large, unsupported_media_type, "
                "invalid_phone, phone_type_not_allowed, region_not_allowed, "
                "destination_blocked, number_known_invalid, invalid_callback_url, "
                "rate_limited, overloaded, pbx_unavailable",
            },
            "detail": {"type": "string"},
            "field": {
                "type": "string",
                "description": "invalid_request, invalid_callback_url: the request member "
                "or query parameter at fault",
            },
            "fields": _array(
                {"type": "string"},
                description="invalid_request: the unknown members of the request body",
            ),
            "reason": {
                "type": "string",
                "description": "invalid_phone: why the number is not valid (not_a_number, "
                "too_short, too_long, invalid_length, invalid_country_code, "
                "invalid_for_region)",
            },
            "region": {
                "type": "string",
                "description": "region_not_allowed: the number's ISO 3166 alpha-2 region",
            },
            "phone_type": {
                "type": "string",
                "description": "phone_type_not_allowed: the number's type (fixed_line, "
                "toll_free, premium_rate, ...)",
            },
            "last_outcome": _nullable(
                "string", description="number_known_invalid: the outcome of its last call"
            ),
            "last_cause": _nullable(
                "integer", description="number_known_invalid: the Q.850 cause of its last call"
            ),
            "verification_status": _ref("VerificationStatus"),
            "required_scope": {
                "type": "string",
                "description": "insufficient_scope: the scope the route needs "
                f"({', '.join(apikeys.SCOPES)})",
            },
        },
        "required": ["type", "title", "status", "code", "detail"],
        "additionalProperties": True,
    },
    "VerificationStatus": _enum(
        VerificationStatus,
        "pending until one of the five ends; verification_not_pending's verification_status",
    ),
    "CallStatus": _enum(CallStatus, "where the call stands"),
    "Outcome": _enum(Outcome, "how the call ended (README: Call outcomes and number health)"),
    "WebhookStatus": _enum(WebhookStatus, "where the webhook's delivery stands"),
    "HealthStatus": _enum(Health, "what calls taught about the number"),
    "ListedHealth": _enum(LISTED_HEALTH, "a health that GET /v1/numbers lists"),
    "CheckResult": _obj(
        {
            "id": {"type": "string"},
            "status": _ref("VerificationStatus"),
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
            "status": _ref("WebhookStatus"),
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
            "status": _ref("VerificationStatus"),
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
                    "status": _ref("CallStatus"),
                    "outcome": _nullable_ref("Outcome"),
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
                    "events": _array(_ref("CallEvent")),
                }
            ),
            "webhooks": _array(_ref("Webhook")),
            "attempts_remaining": {"type": "integer"},
            "expires_at": TIME,
            "created_at": TIME,
            "updated_at": TIME,
        }
    ),
    "Health": _obj(
        {
            "status": _nullable_ref("HealthStatus"),
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
    "ListedNumber": _obj({"phone": {"type": "string"}, "health": _ref("Health")}),
    "NumberPage": _obj(
        {
            "numbers": _array(_ref("ListedNumber")),
            "next_cursor": _nullable("string", description="null on the last page"),
        }
    ),
    "LookupResults": _obj(
        {"results": _array(_ref("Number"), description="one per number asked, in order")}
    ),
    "ByOutcome": {
        "type": "object",
        "description": "calls by outcome",
        "additionalProperties": {"type": "integer"},
    },
    "CarrierStats": _obj(
        {"carrier": {"type": "string"}, **_TOTALS, "by_outcome": _ref("ByOutcome")}
    ),
    "Stats": _obj(_STATS),
    "Node": _obj(
        {
            "name": {"type": "string"},
            "connected": {"type": "boolean"},
            "down_seconds": {"type": "number"},
            "calls_live": {"type": "integer"},
            "calls_ringing": {"type": "integer"},
            "max_concurrent": {"type": "integer"},
            "max_per_second": {"type": "number"},
            "calls_placed": {"type": "integer"},
        }
    ),
    "Readiness": _obj(
        {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "checks": {
                "type": "object",
                "properties": {
                    "database": {"type": "boolean"},
                    "pbx": {"type": "boolean"},
                    "accepting": {"type": "boolean"},
                },
                "required": ["database", "pbx", "accepting"],
                "additionalProperties": {"type": "boolean"},
            },
            "nodes": _array(_ref("Node")),
        }
    ),
    # GET /dashboard/data: counts only, never a phone number, code or caller ID.
    "Dashboard": _obj(
        {
            "generated_at": TIME,
            "pbx_connected": {"type": "boolean"},
            "in_flight": {"type": "integer", "description": "calls placed and not yet ended"},
            "queued": {"type": "integer", "description": "calls waiting to be placed"},
            "calls_last_minute": {
                "type": "integer",
                "description": "calls dialed in the last 60 s",
            },
            "nodes": _array(_ref("Node"), description="the Asterisk nodes as this gateway sees"),
            "instances": _array(
                _obj(
                    {
                        "name": {"type": "string"},
                        "this": {"type": "boolean"},
                        "state": {"type": "string", "enum": ["running", "stopped", "lost"]},
                        "started_at": TIME,
                        "lease_until": TIME,
                        "live_calls": {"type": "integer"},
                    }
                ),
                description="the gateways sharing the database, this one among them",
            ),
            "calls_per_minute": _array(
                _obj({"minute": TIME, "calls": {"type": "integer"}}),
                description="calls dialed in each of the last 60 clock minutes, oldest first",
            ),
            "window": {
                **_obj(
                    {
                        "seconds": {"type": "integer"},
                        **_STATS,
                        "by_cause": _array(
                            _obj(
                                {
                                    "outcome": _ref("Outcome"),
                                    "hangup_cause": _nullable("integer"),
                                    "cause_name": _nullable("string"),
                                    "calls": {"type": "integer"},
                                }
                            )
                        ),
                    }
                ),
                "description": "dialed calls that ended in the last hour",
            },
        }
    ),
}

_JSON_TYPES = {str: "string", int: "integer", list: "array"}


def _member(spec: Field) -> Schema:
    """A request body member as gateway.api.bodies reads it: a member that is not
    required may also be null, which reads as absent."""
    kind = _JSON_TYPES[spec.kind]
    schema: Schema = {"type": kind if spec.required else [kind, "null"]}
    if spec.max_length is not None:
        schema["maxLength"] = spec.max_length
    if spec.minimum is not None:
        schema["minimum"] = spec.minimum
    if spec.maximum is not None:
        schema["maximum"] = spec.maximum
    return schema


def _request(
    fields: Mapping[str, Field], description: str | None = None, **members: Schema
) -> Schema:
    """A request body: exactly the members of a handler's Field table, each with its
    limits; `members` adds to their schemas (descriptions, array items)."""
    schema: Schema = {"type": "object"}
    if description is not None:
        schema["description"] = description
    schema["properties"] = {
        name: {**_member(spec), **members.get(name, {})} for name, spec in fields.items()
    }
    required = [name for name, spec in fields.items() if spec.required]
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False
    return schema


def _request_schemas(handlers: ModuleType) -> dict[str, Schema]:
    """The request bodies, from the Field tables gateway.api.handlers reads them with."""
    region = {"description": "ISO 3166 alpha-2 region for national input (numbers.default_region)"}
    default_max_ring = CallsConfig().max_ring_seconds
    return {
        "VerificationCreate": _request(
            handlers.CREATE,
            phone={"description": "E.164, or national digits read with region"},
            region=region,
            reference={"description": "your own string, echoed back"},
            callback_url={"format": "uri", "description": "absolute http(s) URL for webhooks"},
            ring_seconds={
                "description": "at most the gateway's calls.max_ring_seconds "
                f"({default_max_ring} by default)"
            },
        ),
        "Check": _request(
            handlers.CHECK,
            "Exactly one of code (the trailing digits) or cli (the full number).",
        ),
        "CheckByPhone": _request(
            handlers.CHECK_BY_PHONE,
            "The phone, and exactly one of code (the trailing digits) or cli (the full number).",
            region=region,
        ),
        "Lookup": _request(
            handlers.LOOKUP,
            phones={
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": MAX_LOOKUP,
                "description": "the numbers, E.164 or national; an entry that is not a string "
                "is answered as not a number",
            },
            region=region,
        ),
    }


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
            "schemas": {**_request_schemas(handlers), **SCHEMAS},
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
                                "number_known_invalid, invalid_callback_url",
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
            "/healthz": {
                "get": _op(
                    "healthz",
                    OPERATIONS,
                    "The process is alive",
                    {"200": _json(_obj({"status": {"type": "string"}}), "alive")},
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
