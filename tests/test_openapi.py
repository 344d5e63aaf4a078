"""The OpenAPI document: valid OpenAPI 3.1, and in step with the app's routes."""

from __future__ import annotations

import json

from openapi_spec_validator import validate

from gateway.api import handlers, operator, shapes
from gateway.api.handlers import routes
from gateway.api.openapi import document
from gateway.config import MAX_RING_SECONDS
from gateway.numbers import DEFAULT_PAGE, LISTED_HEALTH, MAX_LOOKUP, MAX_PAGE
from gateway.outcomes import Health, Outcome
from gateway.store import CallStatus, VerificationStatus, WebhookStatus
from gateway.verifications import MAX_CALLBACK_URL_LENGTH, MAX_REFERENCE_LENGTH


def app_operations() -> set[tuple[str, str]]:
    found = set()
    for table in (routes, operator.routes):
        for route in table:
            method = getattr(route, "method", "")
            # The docs page's own two files are not part of the API.
            path: str = getattr(route, "path", "")
            if method and method != "HEAD" and not path.startswith("/docs/assets/"):
                found.add((method.lower(), path))
    return found


def documented_operations() -> set[tuple[str, str]]:
    return {
        (method, path) for path, operations in document()["paths"].items() for method in operations
    }


def test_document_is_valid_openapi_3_1() -> None:
    validate(document())


def test_every_route_is_documented_and_nothing_else() -> None:
    assert app_operations() == documented_operations()


def test_admin_routes_and_only_they_answer_403() -> None:
    paths = document()["paths"]
    with_403 = {
        (method, path)
        for path, operations in paths.items()
        for method, operation in operations.items()
        if "403" in operation["responses"]
    }
    assert with_403 == {
        ("get", "/v1/numbers"),
        ("delete", "/v1/numbers/{phone}/health"),
        ("delete", "/v1/numbers/{phone}/failed-checks"),
        ("get", "/v1/stats"),
        ("get", "/v1/pools"),
        ("get", "/v1/alerts"),
        ("delete", "/v1/alerts/{alert_id}"),
    }
    assert all("scope admin" in paths[path][method]["description"] for method, path in with_403)


def test_request_bodies_are_the_declarations_the_api_decodes_with() -> None:
    schemas = document()["components"]["schemas"]
    for shape in shapes.REQUESTS:
        schema = schemas[shape.__name__]
        assert tuple(schema["properties"]) == shape.__struct_fields__, shape
        # The members without a default come first (msgspec), and only they are required.
        required = shape.__struct_fields__[: -len(shape.__struct_defaults__) or None]
        assert schema.get("required", []) == list(required), shape
        assert schema["additionalProperties"] is False

    create = schemas["VerificationCreate"]["properties"]
    assert create["reference"]["anyOf"][0]["maxLength"] == MAX_REFERENCE_LENGTH
    assert create["callback_url"]["anyOf"][0]["maxLength"] == MAX_CALLBACK_URL_LENGTH
    ring_seconds, _ = create["ring_seconds"]["anyOf"]
    assert (ring_seconds["minimum"], ring_seconds["maximum"]) == (1, MAX_RING_SECONDS)
    # null reads as absent
    assert [kind["type"] for kind in create["region"]["anyOf"]] == ["string", "null"]
    phones = schemas["Lookup"]["properties"]["phones"]
    assert (phones["items"], phones["minItems"], phones["maxItems"]) == (
        {"type": "string"},
        1,
        MAX_LOOKUP,
    )


def test_limits_are_the_codes() -> None:
    paths = document()["paths"]
    (key,) = paths["/v1/verifications"]["post"]["parameters"]
    assert key["schema"]["maxLength"] == handlers.MAX_IDEMPOTENCY_KEY
    limit = next(p for p in paths["/v1/numbers"]["get"]["parameters"] if p["name"] == "limit")
    assert (limit["schema"]["maximum"], limit["schema"]["default"]) == (MAX_PAGE, DEFAULT_PAGE)


def test_enums_are_the_codes() -> None:
    schemas = document()["components"]["schemas"]
    for name, values in (
        ("VerificationStatus", VerificationStatus),
        ("CallStatus", CallStatus),
        ("WebhookStatus", WebhookStatus),
        ("Outcome", Outcome),
        ("Health", Health),
        ("ListedHealth", LISTED_HEALTH),
    ):
        assert sorted(schemas[name]["enum"]) == sorted(str(v) for v in values), name


def test_open_routes_say_so_and_v1_routes_need_a_key() -> None:
    doc = document()
    assert [server["url"] for server in doc["servers"]] == ["/"]  # where it was read from
    for path, operations in doc["paths"].items():
        for operation in operations.values():
            expected = [{"bearer": []}] if path.startswith("/v1/") else []
            assert operation["security"] == expected, path


def test_every_component_is_used() -> None:
    doc = document()
    text = json.dumps(doc)
    for kind, components in doc["components"].items():
        if kind != "securitySchemes":
            for name in components:
                assert f'"#/components/{kind}/{name}"' in text, (kind, name)
