"""Strict JSON request bodies: JSON only, known members only, each of its type and
within its limits, as gateway.api.shapes declares them."""

from __future__ import annotations

import functools
import json
import re
from typing import TypeVar
from urllib.parse import urlsplit

import msgspec
from aiohttp import web

from gateway.api.shapes import ControlCharacters, Request
from gateway.errors import (
    InvalidCallbackUrl,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)

# The biggest legitimate body (a create with a long callback URL) is under 3 KiB.
MAX_BODY_BYTES = 16 * 1024


R = TypeVar("R", bound=Request)

# Where a msgspec error points: `$.phone`, `$.phones[3]` -> the member, phone(s).
_AT = re.compile(r" - at `\$\.([A-Za-z_]+)[^`]*`$")
_UNKNOWN = "Object contains unknown field"
_MISSING = re.compile(r"^Object missing required field `([A-Za-z_]+)`")


async def read_body(request: web.Request, shape: type[R]) -> R:
    """The request's JSON object as `shape` (gateway.api.shapes), or an InvalidRequest
    naming the member at fault."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the body is over {MAX_BODY_BYTES} bytes") from None
    try:
        decoder: msgspec.json.Decoder[R] = _decoder(shape)
        return decoder.decode(raw)
    except msgspec.ValidationError as exc:  # a DecodeError too: first
        raise _invalid(str(exc), raw, shape) from None
    except msgspec.DecodeError:
        # Not JSON, and NaN or Infinity (RFC 8259 has neither) among the rest.
        raise InvalidRequest("the body is not valid JSON") from None
    except ControlCharacters as exc:
        raise InvalidRequest(str(exc), field=exc.member) from None


@functools.cache
def _decoder(shape: type[R]) -> msgspec.json.Decoder[R]:
    return msgspec.json.Decoder(shape)


def _invalid(message: str, raw: bytes, shape: type[Request]) -> InvalidRequest:
    """msgspec's account of a body that does not fit `shape`, as the API words it."""
    if message.startswith(_UNKNOWN):
        # msgspec stops at the first; the client is told every one (an error path: the
        # body is parsed again), unless the rest is not JSON either: then that is said.
        try:
            members = set(json.loads(raw))
        except (ValueError, RecursionError):
            return InvalidRequest("the body is not valid JSON")
        unknown = sorted(members - set(shape.__struct_fields__))
        return InvalidRequest(f"unknown field(s): {', '.join(unknown)}", fields=unknown)
    missing = _MISSING.match(message)
    if missing:
        return InvalidRequest(f"{missing[1]} is required", field=missing[1])
    at = _AT.search(message)
    if at is None:  # about the body itself: an array, a string, ...
        if message.startswith("Expected `object`"):
            return InvalidRequest("the body must be a JSON object")
        return InvalidRequest(f"the body is not valid: {message}")
    reason = message[: at.start()]
    if reason == "Number out of range":
        reason = "holds a number too big for the gateway"
    return InvalidRequest(f"{at[1]}: {reason[:1].lower()}{reason[1:]}", field=at[1])


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
