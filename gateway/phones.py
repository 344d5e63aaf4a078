"""Parse, normalise and classify phone numbers (phonenumbers); dial and caller-ID formats."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType, ValidationResult, carrier

from gateway.config import NumbersConfig
from gateway.errors import DestinationBlocked, InvalidPhone, PhoneTypeNotAllowed, RegionNotAllowed

# The longest typed form worth parsing: "+62 (0812) 3456-7890 ext" is far below this.
MAX_INPUT_LENGTH = 40
# Typing forms people use around digits: spaces, dots, dashes, brackets, slashes.
# Only these: \s would also swallow CR, LF and other line breaks, which must be refused.
_SEPARATORS = re.compile(r"[ .\-()/]")
# E.164 allows at most 15 digits, whatever a country's metadata says.
E164_MAX_DIGITS = 15
_TYPED = re.compile(r"\+?[0-9]+")

TYPE_NAMES = {
    PhoneNumberType.FIXED_LINE: "fixed_line",
    PhoneNumberType.MOBILE: "mobile",
    PhoneNumberType.FIXED_LINE_OR_MOBILE: "fixed_line_or_mobile",
    PhoneNumberType.TOLL_FREE: "toll_free",
    PhoneNumberType.PREMIUM_RATE: "premium_rate",
    PhoneNumberType.SHARED_COST: "shared_cost",
    PhoneNumberType.VOIP: "voip",
    PhoneNumberType.PERSONAL_NUMBER: "personal_number",
    PhoneNumberType.PAGER: "pager",
    PhoneNumberType.UAN: "uan",
    PhoneNumberType.VOICEMAIL: "voicemail",
    PhoneNumberType.UNKNOWN: "unknown",
}
_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "invalid_country_code",
    NumberParseException.TOO_SHORT_NSN: "too_short",
    NumberParseException.TOO_SHORT_AFTER_IDD: "too_short",
    NumberParseException.TOO_LONG: "too_long",
}
_REASONS = {
    ValidationResult.TOO_SHORT: "too_short",
    ValidationResult.TOO_LONG: "too_long",
    ValidationResult.INVALID_COUNTRY_CODE: "invalid_country_code",
    ValidationResult.INVALID_LENGTH: "invalid_length",
}


@dataclass(frozen=True, slots=True)
class Phone:
    """A parsed, valid number."""

    e164: str
    region: str
    type: str
    number: phonenumbers.PhoneNumber

    @property
    def carrier(self) -> str | None:
        """The original carrier's name where phonenumbers knows it (number may be ported).

        What carrier.name_for_number does, without working out the type once more."""
        if self.type not in _CARRIER_TYPES:
            return None
        return carrier.name_for_valid_number(self.number, "en") or None


# The types phonenumbers keeps carriers for (carrier.name_for_number).
_CARRIER_TYPES = frozenset({"mobile", "fixed_line_or_mobile", "pager"})


def parse(raw: str, default_region: str) -> Phone:
    """Normalise `raw` (E.164 or national digits) or raise InvalidPhone with a reason."""
    if not isinstance(raw, str) or len(raw) > MAX_INPUT_LENGTH:
        raise InvalidPhone("phone is not a phone number", reason="not_a_number")
    compact = _SEPARATORS.sub("", raw)
    if not _TYPED.fullmatch(compact):
        raise InvalidPhone(
            "phone may hold only digits, a leading +, spaces, dashes, dots and brackets",
            reason="not_a_number",
        )
    try:
        number = phonenumbers.parse(compact, default_region)
        # A number is valid when it has a type: is_valid_number is number_type's work
        # (its region, then its patterns) done once more.
        number_type = phonenumbers.number_type(number)
        if number_type == PhoneNumberType.UNKNOWN and number.national_number:
            number, number_type = _without_trunk_zero(compact, number)
    except NumberParseException as exc:
        reason = _PARSE_REASONS.get(exc.error_type, "not_a_number")
        raise InvalidPhone(f"phone is not a valid number ({reason})", reason=reason) from None
    if number_type == PhoneNumberType.UNKNOWN:
        possible = phonenumbers.is_possible_number_with_reason(number)
        reason = _REASONS.get(possible, "invalid_for_region")
        raise InvalidPhone(f"phone is not a valid number ({reason})", reason=reason)
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    if len(e164) - 1 > E164_MAX_DIGITS:
        raise InvalidPhone("phone is not a valid number (too_long)", reason="too_long")
    region = phonenumbers.region_code_for_number(number) or "ZZ"
    return Phone(e164=e164, region=region, type=TYPE_NAMES[number_type], number=number)


def cli_candidates(raw: str, default_region: str) -> list[str]:
    """E.164 readings of a caller ID as a phone's call log shows it, valid or not.

    A pool's numbers need not be in phonenumbers' metadata, so nothing is refused for
    validity: "+622150001234", "622150001234" and "0215000 1234" all read as E.164.
    """
    if not isinstance(raw, str) or len(raw) > MAX_INPUT_LENGTH:
        return []
    compact = _SEPARATORS.sub("", raw)
    if not _TYPED.fullmatch(compact):
        return []
    readings = [compact if compact.startswith("+") else "+" + compact]
    try:
        number = phonenumbers.parse(compact, default_region)
    except NumberParseException:
        return readings
    national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return readings if national in readings else [*readings, national]


def _without_trunk_zero(
    compact: str, number: phonenumbers.PhoneNumber
) -> tuple[phonenumbers.PhoneNumber, int]:
    """Read "+62 0812..." (country code, then the national trunk prefix 0) as "+62 812...",
    with its type.

    Only when that gives a valid number: Italy, for one, keeps its leading 0.
    """
    country = str(number.country_code)
    if compact.startswith(f"+{country}0"):
        retry = phonenumbers.parse(f"+{country}{compact[len(country) + 2 :]}")
        retry_type = phonenumbers.number_type(retry)
        if retry_type != PhoneNumberType.UNKNOWN:
            return retry, retry_type
    return number, PhoneNumberType.UNKNOWN


def describe(raw: str, default_region: str, policy: NumbersConfig) -> dict[str, Any]:
    """Everything known about `raw` without calling it: validity, type, region, carrier, policy."""
    try:
        phone = parse(raw, default_region)
    except InvalidPhone as exc:
        reason = exc.extra.get("reason")
        return {
            "input": raw,
            "e164": None,
            "valid": False,
            # Right length for its country, but no such number range exists.
            "possible": reason == "invalid_for_region",
            "reason": reason,
            "type": None,
            "region": None,
            "carrier": None,
            "callable": False,
            "refused_by": exc.code,
        }
    refused_by = None
    try:
        check_allowed(phone, policy)
    except (RegionNotAllowed, PhoneTypeNotAllowed, DestinationBlocked) as exc:
        refused_by = exc.code
    return {
        "input": raw,
        "e164": phone.e164,
        "valid": True,
        "possible": True,
        "reason": None,
        "type": phone.type,
        "region": phone.region,
        "carrier": phone.carrier,
        "callable": refused_by is None,
        "refused_by": refused_by,
    }


# Numbers a flash call cannot reach (no app reads a landline's caller ID) but a voice
# call can: allowed whatever numbers.allowed_types says, when a voice step may call them.
VOICE_ONLY_TYPES = frozenset({"fixed_line"})


def check_allowed(phone: Phone, policy: NumbersConfig, voice: bool = False) -> None:
    """Raise when the gateway must not call `phone` under `policy`; with `voice`, by a
    voice call (a landline too)."""
    if phone.region not in policy.allowed_regions:
        raise RegionNotAllowed(
            f"calls to region {phone.region} are not allowed", region=phone.region
        )
    if any(phone.e164.startswith(prefix) for prefix in policy.blocked_prefixes):
        raise DestinationBlocked("calls to this destination are blocked")
    if phone.type not in policy.allowed_types and not (voice and phone.type in VOICE_ONLY_TYPES):
        raise PhoneTypeNotAllowed(
            f"calls to {phone.type} numbers are not allowed", phone_type=phone.type
        )


def masked(e164: str) -> str:
    """A number for a log line: at most its first five digits (country and operator) and
    its last two, with at least six starred; enough to tell numbers apart, not to call."""
    digits = e164.lstrip("+")
    if len(digits) < 8:
        return "+" + "*" * len(digits)
    head = min(5, len(digits) - 8)
    return f"+{digits[:head]}{'*' * (len(digits) - head - 2)}{digits[-2:]}"


def format_for_trunk(e164: str, style: str) -> str:
    """`e164` as digits for a dial string or caller ID: e164, e164_no_plus or national."""
    if style == "e164":
        return e164
    if style == "e164_no_plus":
        return e164[1:]
    if style == "national":
        number = phonenumbers.parse(e164)
        national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
        return re.sub(r"[^0-9]", "", national)
    raise ValueError(f"unknown number format {style!r}")
