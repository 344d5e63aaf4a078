"""Strict JSON request bodies: JSON only, known fields only, each of the right type."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

from aiohttp import web

from gateway.errors import (
    InvalidCallbackUrl,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)

# The biggest legitimate body (a create with a long callback URL) is under 3 KiB.
MAX_BODY_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Field:
    """One allowed member of a JSON object."""

    kind: type
    required: bool = False
    max_length: int | None = None  # for strings
    minimum: int | None = None  # for integers
    maximum: int | None = None


async def read_object(request: web.Request, schema: dict[str, Field]) -> dict[str, Any]:
    """The request's JSON object, checked against `schema`, or an InvalidRequest."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes") from None
    try:
        body = json.loads(raw, parse_constant=_non_finite, parse_float=_finite)
    except (ValueError, RecursionError):
        raise InvalidRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}", fields=unknown)
    for name, spec in schema.items():
        value = body.get(name)
        if value is None:
            if spec.required:
                raise InvalidRequest(f"{name} is required", field=name)
            body[name] = None
            continue
        _check(name, value, spec)
    return body


def _non_finite(constant: str) -> NoReturn:
    """NaN and Infinity are not JSON (RFC 8259); Python's parser takes them, and an
    answer echoing one would not be JSON either."""
    raise InvalidRequest(f"the body holds {constant}, which is not a JSON number")


def _finite(text: str) -> float:
    """A JSON number as a float, refused when too big for one (1e999 is infinity)."""
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest(f"the body holds {text[:20]}, a number too big for the gateway")
    return value


def _check(name: str, value: Any, spec: Field) -> None:
    if spec.kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequest(f"{name} must be an integer", field=name)
        if spec.minimum is not None and value < spec.minimum:
            raise InvalidRequest(f"{name} must be at least {spec.minimum}", field=name)
        if spec.maximum is not None and value > spec.maximum:
            raise InvalidRequest(f"{name} must be at most {spec.maximum}", field=name)
        return
    if spec.kind is str:
        if not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string", field=name)
        if spec.max_length is not None and len(value) > spec.max_length:
            raise InvalidRequest(f"{name} must be at most {spec.max_length} characters", field=name)
        if not value.isprintable():
            raise InvalidRequest(f"{name} must not hold control characters", field=name)
        return
    if spec.kind is list:
        if not isinstance(value, list):
            raise InvalidRequest(f"{name} must be a list", field=name)
        return
    raise TypeError(spec.kind)


def check_callback_url(url: str | None) -> str | None:
    """An absolute http(s) URL without credentials, or an InvalidRequest (malformed) or
    InvalidCallbackUrl (credentials). Where its host may be is the domain's to check."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # "http://[::1/x": an unclosed IPv6 literal
        host = None
    if host is None or parts.scheme not in ("http", "https"):
        raise InvalidRequest(
            "callback_url must be an absolute http or https URL", field="callback_url"
        )
    if "@" in parts.netloc:
        # aiohttp would send them as Basic auth to whatever the host is; a receiver that
        # needs authenticating checks the webhook's signature instead.
        raise InvalidCallbackUrl(
            "callback_url must not hold a user name or password", field="callback_url"
        )
    return url
