"""The OpenAPI document: valid OpenAPI 3.1, and in step with the app's routes."""

from __future__ import annotations

from openapi_spec_validator import validate

from gateway import dashboard
from gateway.api.handlers import routes
from gateway.api.openapi import document


def app_operations() -> set[tuple[str, str]]:
    found = set()
    for table in (routes, dashboard.routes):
        for route in table:
            method = getattr(route, "method", "")
            if method and method != "HEAD":
                found.add((method.lower(), route.path))  # type: ignore[attr-defined]
    return found


def documented_operations() -> set[tuple[str, str]]:
    return {
        (method, path) for path, operations in document()["paths"].items() for method in operations
    }


def test_document_is_valid_openapi_3_1() -> None:
    validate(document())


def test_every_route_is_documented_and_nothing_else() -> None:
    assert app_operations() == documented_operations()
