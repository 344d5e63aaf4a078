"""The OpenAPI document: valid OpenAPI 3.1, and in step with the app's routes."""

from __future__ import annotations

from openapi_spec_validator import validate

from gateway import dashboard
from gateway.api import operator
from gateway.api.handlers import routes
from gateway.api.openapi import document


def app_operations() -> set[tuple[str, str]]:
    found = set()
    for table in (routes, operator.routes, dashboard.routes):
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
    }
    assert all("scope admin" in paths[path][method]["description"] for method, path in with_403)
