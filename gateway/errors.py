"""The domain's exceptions. Each carries a stable `code`; only the HTTP edge maps it to a status."""

from __future__ import annotations

import math


class GatewayError(Exception):
    """Base of every error a client may see; `code` is stable and machine-readable."""

    code = "error"

    def __init__(self, detail: str, **extra: object) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidRequest(GatewayError):
    code = "invalid_request"


class Unauthorized(GatewayError):
    code = "unauthorized"


class InsufficientScope(GatewayError):
    """The API key is valid but its scope does not cover the route (`required_scope`)."""

    code = "insufficient_scope"


class NotFound(GatewayError):
    code = "not_found"


class VerificationNotPending(GatewayError):
    code = "verification_not_pending"


class InvalidPhone(GatewayError):
    code = "invalid_phone"


class PhoneTypeNotAllowed(GatewayError):
    code = "phone_type_not_allowed"


class RegionNotAllowed(GatewayError):
    code = "region_not_allowed"


class DestinationBlocked(GatewayError):
    code = "destination_blocked"


class NumberKnownInvalid(GatewayError):
    code = "number_known_invalid"


class UnknownChannel(GatewayError):
    """A channel the gateway does not know (channels: flashcall, voice)."""

    code = "unknown_channel"


class UnknownLocale(GatewayError):
    """A locale whose prompts the operator has not installed (voice.locales)."""

    code = "unknown_locale"


class ChannelUnavailable(GatewayError):
    """A known channel this gateway is not set up for (voice without voice.caller_id)."""

    code = "channel_unavailable"


class NoNextChannel(GatewayError):
    """`next` on a verification whose last channel has been tried."""

    code = "no_next_channel"


class InvalidCallbackUrl(GatewayError):
    """A well-formed callback_url the gateway will not post to: credentials in it, or a
    host that is an address inside (not globally routable, not allowed by the operator)."""

    code = "invalid_callback_url"


class Retryable(GatewayError):
    """An error worth retrying after `retry_after` seconds (the Retry-After header)."""

    def __init__(self, detail: str, retry_after: int, **extra: object) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class PbxUnavailable(Retryable):
    code = "pbx_unavailable"


class RateLimited(Retryable):
    """Too many requests. The message never says which limit fired."""

    code = "rate_limited"

    def __init__(self, retry_after: float, limit: str) -> None:
        super().__init__("too many requests; retry later", max(1, math.ceil(retry_after)))
        self.limit = limit  # for the operator's metrics, never in the answer


class IdempotencyConflict(GatewayError):
    code = "idempotency_conflict"


class DestinationSuspended(Retryable):
    """The conversion watch suspended the destination's block, carrier or country
    (conversion.mode block) until an admin lifts the alert or block_seconds pass."""

    code = "destination_suspended"


class Overloaded(Retryable):
    code = "overloaded"


class UnsupportedMediaType(GatewayError):
    code = "unsupported_media_type"


class PayloadTooLarge(GatewayError):
    code = "payload_too_large"
