"""Phone numbers: parsing typed forms, refusal reasons, call policy and trunk formats."""

from __future__ import annotations

import re

import phonenumbers
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from gateway import phones
from gateway.config import NumbersConfig
from gateway.errors import InvalidPhone, PhoneTypeNotAllowed, RegionNotAllowed

MOBILE = "+6281234567890"  # Telkomsel, Indonesia
JAKARTA_LANDLINE = "+62215551234"
ROME = "+390669821234"  # +39 06 6982 1234: Italy keeps the 0 after the country code
E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
POLICY = NumbersConfig()


def reason_of(raw: str, region: str = "ID") -> object:
    with pytest.raises(InvalidPhone) as info:
        phones.parse(raw, region)
    assert info.value.code == "invalid_phone"
    return info.value.extra.get("reason")


# -- parse -------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "+6281234567890",
        "6281234567890",
        "081234567890",
        "81234567890",
        "0812 3456 7890",
        "0812-3456-7890",
        "0812.3456.7890",
        "(0812) 3456-7890",
        "0812 - 3456 - 7890",
        "+62 812 3456 7890",
        "+62-812-3456-7890",
        "+62 (812) 3456 7890",
        "+62 0812 3456 7890",
        "+62 (0)812-3456-7890",
        "+620812-3456-7890",
        " 0812 3456 7890 ",
    ],
)
def test_typed_forms_of_one_mobile_normalise_to_e164(raw: str) -> None:
    phone = phones.parse(raw, "ID")
    assert phone.e164 == MOBILE
    assert phone.region == "ID"
    assert phone.type == "mobile"


def test_e164_input_ignores_the_default_region() -> None:
    phone = phones.parse("+44 7911 123456", "ID")
    assert phone.e164 == "+447911123456"
    assert phone.type == "mobile"


def test_national_input_is_read_with_the_given_region() -> None:
    assert phones.parse("012 345 6789", "MY").e164 == "+60123456789"
    assert phones.parse("(202) 555-0123", "US").e164 == "+12025550123"
    assert phones.parse("07911 123456", "GB").e164 == "+447911123456"


@pytest.mark.parametrize("raw", ["+39 06 6982 1234", "+39 (06) 6982-1234", "06 6982 1234"])
def test_italian_numbers_keep_their_leading_zero(raw: str) -> None:
    phone = phones.parse(raw, "IT")
    assert phone.e164 == ROME
    assert phone.type == "fixed_line"


def test_leading_zero_is_dropped_only_where_it_is_a_trunk_prefix() -> None:
    # Indonesia: the 0 after +62 is the national trunk prefix; Italy: part of the number.
    assert phones.parse("+62 021 555 1234", "ID").e164 == JAKARTA_LANDLINE
    assert phones.parse("+39 06 6982 1234", "ID").e164 == ROME


def test_phone_type_and_carrier() -> None:
    mobile = phones.parse(MOBILE, "ID")
    assert mobile.carrier == "Telkomsel"
    landline = phones.parse(JAKARTA_LANDLINE, "ID")
    assert landline.type == "fixed_line"
    assert landline.carrier is None
    assert phones.parse("+1 800 555 0100", "ID").type == "toll_free"
    assert phones.parse("+1 202 555 0123", "ID").type == "fixed_line_or_mobile"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("0812", "too_short"),
        ("+62812", "too_short"),
        ("+62 8", "too_short"),
        ("+1 202 555 01234", "too_long"),
        ("0812345678901234567890", "too_long"),
        ("+999 1234567", "invalid_country_code"),
        ("+0812345678", "invalid_country_code"),
        ("+62 1234 5678", "invalid_for_region"),
        ("+628123456789012345", "invalid_for_region"),
        ("+6831234", "invalid_for_region"),
        ("", "not_a_number"),
        ("+", "not_a_number"),
        ("abc", "not_a_number"),
        ("++6281234567890", "not_a_number"),
        ("0812 3456 7890 ext 12", "not_a_number"),
        ("0812_3456_7890", "not_a_number"),
        ("+62812345678\uff190", "not_a_number"),  # a full-width digit
        ("62812+34567890", "not_a_number"),
    ],
)
def test_refusal_reasons(raw: str, reason: str) -> None:
    assert reason_of(raw) == reason


@pytest.mark.parametrize(
    "raw",
    [
        "+6281234567890\r\nAction: Originate",
        "+62812345\r\n67890",
        "0812 3456\n7890",
        "0812 3456\r7890",
        "+6281234567890\x00",
        "Action: Originate",
        "+6281234567890;Action:Hangup",
        "1" * 41,
        "0812 " * 9,
        "+62" + " " * 100 + "81234567890",
        "0" * 10_000,
    ],
)
def test_control_characters_ami_text_and_long_input_are_refused(raw: str) -> None:
    with pytest.raises(InvalidPhone):
        phones.parse(raw, "ID")


@pytest.mark.parametrize("raw", [None, 6281234567890, b"+6281234567890", ["+6281234567890"]])
def test_non_string_input_is_refused(raw: object) -> None:
    assert reason_of(raw) == "not_a_number"  # type: ignore[arg-type]


def test_input_at_the_length_limit_is_still_parsed() -> None:
    raw = "+62 812 3456 7890".center(phones.MAX_INPUT_LENGTH)
    assert len(raw) == phones.MAX_INPUT_LENGTH
    assert phones.parse(raw, "ID").e164 == MOBILE


# -- check_allowed -----------------------------------------------------------


def test_mobile_in_an_allowed_region_is_allowed() -> None:
    phones.check_allowed(phones.parse(MOBILE, "ID"), POLICY)


def test_landline_is_refused_under_the_default_policy() -> None:
    with pytest.raises(PhoneTypeNotAllowed) as info:
        phones.check_allowed(phones.parse(JAKARTA_LANDLINE, "ID"), POLICY)
    assert info.value.code == "phone_type_not_allowed"
    assert info.value.extra["phone_type"] == "fixed_line"


def test_landline_is_allowed_when_the_policy_allows_fixed_line() -> None:
    policy = NumbersConfig(allowed_types=("mobile", "fixed_line"))
    phones.check_allowed(phones.parse(JAKARTA_LANDLINE, "ID"), policy)


@pytest.mark.parametrize("raw", ["+447911123456", "+60123456789", "+12025550123"])
def test_foreign_region_is_refused(raw: str) -> None:
    with pytest.raises(RegionNotAllowed) as info:
        phones.check_allowed(phones.parse(raw, "ID"), POLICY)
    assert info.value.code == "region_not_allowed"
    assert info.value.extra["region"] == phones.parse(raw, "ID").region


def test_region_is_checked_before_type() -> None:
    # A foreign landline is refused for its region, the first rule an operator would fix.
    with pytest.raises(RegionNotAllowed):
        phones.check_allowed(phones.parse(ROME, "ID"), POLICY)


def test_other_allowed_region_is_allowed() -> None:
    policy = NumbersConfig(allowed_regions=("ID", "MY"))
    phones.check_allowed(phones.parse("+60123456789", "ID"), policy)


def test_describe_reports_validity_and_policy_without_raising() -> None:
    info = phones.describe("0812-3456-7890", "ID", POLICY)
    assert info["e164"] == MOBILE
    assert info["valid"] is True
    assert info["callable"] is True
    assert info["refused_by"] is None
    assert info["carrier"] == "Telkomsel"
    landline = phones.describe(JAKARTA_LANDLINE, "ID", POLICY)
    assert landline["callable"] is False
    assert landline["refused_by"] == "phone_type_not_allowed"
    bad = phones.describe("0812", "ID", POLICY)
    assert bad["valid"] is False
    assert bad["reason"] == "too_short"
    assert bad["refused_by"] == "invalid_phone"


# -- format_for_trunk --------------------------------------------------------


@pytest.mark.parametrize(
    ("e164", "style", "expected"),
    [
        (MOBILE, "e164", "+6281234567890"),
        (MOBILE, "e164_no_plus", "6281234567890"),
        (MOBILE, "national", "081234567890"),
        (JAKARTA_LANDLINE, "national", "0215551234"),
        (ROME, "e164_no_plus", "390669821234"),
        (ROME, "national", "0669821234"),
        ("+447911123456", "national", "07911123456"),
        ("+12025550123", "national", "2025550123"),
    ],
)
def test_format_for_trunk(e164: str, style: str, expected: str) -> None:
    assert phones.format_for_trunk(e164, style) == expected


def test_format_for_trunk_refuses_an_unknown_style() -> None:
    with pytest.raises(ValueError, match="sip"):
        phones.format_for_trunk(MOBILE, "sip")


# -- property ----------------------------------------------------------------


def _examples() -> list[tuple[str, str, str]]:
    """phonenumbers' example numbers: (international form, national form, region)."""
    kinds = (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE, PhoneNumberType.TOLL_FREE)
    out = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        for kind in kinds:
            number = phonenumbers.example_number_for_type(region, kind)
            if number is not None:
                international = phonenumbers.format_number(number, PhoneNumberFormat.INTERNATIONAL)
                national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
                out.append((international, national, region))
    return out


EXAMPLES = _examples()


@st.composite
def typed_numbers(draw: st.DrawFn) -> tuple[str, str]:
    """A real number as people type it, sometimes with a digit added, dropped or changed."""
    international, national, region = draw(st.sampled_from(EXAMPLES))
    raw = draw(st.sampled_from([international, national]))
    digits = [i for i, ch in enumerate(raw) if ch.isdigit()]
    at = draw(st.sampled_from(digits))
    digit = draw(st.sampled_from("0123456789"))
    raw = draw(
        st.sampled_from(
            [raw, raw + digit, raw[:at] + raw[at + 1 :], raw[:at] + digit + raw[at + 1 :]]
        )
    )
    return raw, draw(st.sampled_from([region, "ID", "IT", "US"]))


_arbitrary = st.tuples(
    st.one_of(st.text(max_size=50), st.from_regex(r"\A\+?[0-9 ()\-./]{0,24}\Z")),
    st.sampled_from(["ID", "IT", "US"]),
)


def _valid_reading(raw: str, region: str) -> bool:
    """Whether phonenumbers' is_valid_number accepts `raw` as typed, or without a
    trunk 0 after its country code: the two readings parse accepts."""
    compact = re.sub(r"[ .\-()/]", "", raw)
    try:
        number = phonenumbers.parse(compact, region)
    except phonenumbers.NumberParseException:
        return False
    if phonenumbers.is_valid_number(number):
        return True
    country = str(number.country_code)
    if not compact.startswith(f"+{country}0"):
        return False
    try:
        retry = phonenumbers.parse(f"+{country}{compact[len(country) + 2 :]}")
    except phonenumbers.NumberParseException:
        return False
    return bool(phonenumbers.is_valid_number(retry))


@given(st.one_of(typed_numbers(), _arbitrary))
@example(("+49 800 12345678900", "DE"))  # 16 digits: longer than E.164 allows
def test_parse_returns_e164_or_raises_invalid_phone(case: tuple[str, str]) -> None:
    raw, region = case
    try:
        phone = phones.parse(raw, region)
    except InvalidPhone as exc:
        assert exc.extra.get("reason") in {
            "too_short",
            "too_long",
            "invalid_length",
            "invalid_country_code",
            "invalid_for_region",
            "not_a_number",
        }
        # Valid is what phonenumbers says it is, for what the input reads as (and at
        # most E.164's 15 digits; our own refusals of input are "not_a_number").
        reason = exc.extra.get("reason")
        assert reason in {"not_a_number", "too_long"} or not _valid_reading(raw, region)
        return
    assert E164.fullmatch(phone.e164), phone.e164
    # Its validity, type and region as phonenumbers' own functions give them.
    assert phonenumbers.is_valid_number(phone.number)
    assert phone.type == phones.TYPE_NAMES[phonenumbers.number_type(phone.number)]
    assert phone.region == phonenumbers.region_code_for_number(phone.number)
    assert phones.format_for_trunk(phone.e164, "e164") == phone.e164
    for style in ("e164_no_plus", "national"):
        assert re.fullmatch(r"[0-9]+", phones.format_for_trunk(phone.e164, style))
    # The normal form is a fixed point, whatever the default region.
    assert phones.parse(phone.e164, "US").e164 == phone.e164


@pytest.mark.parametrize(
    ("e164", "shown"),
    [
        ("+6281234567890", "+62812******90"),
        ("+14155552671", "+141******71"),
        ("+681234567", "+6******67"),  # short: more of it hidden
        ("+68123456", "+******56"),
        ("+1234567", "+*******"),  # too short to show any part
    ],
)
def test_masked_hides_at_least_six_digits(e164: str, shown: str) -> None:
    assert phones.masked(e164) == shown
    assert shown.count("*") >= min(6, len(e164) - 1)
