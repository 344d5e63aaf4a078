"""What the gateway learns at login: Asterisk's version gaps, the trunk, config rules."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, EarlyMediaConfig, parse
from gateway.pbx import trunk_name, version_gaps

BASE = """
asterisk: {secret: s3cret}
security: {code_secret: a-long-enough-code-secret}
pools: [{name: p, prefix: "+6221500", code_length: 4}]
"""


@pytest.mark.parametrize(
    ("version", "gaps"),
    [
        ("22.10.1+dfsg+~cs6.17.60671434-1", set()),
        ("22.7.0", set()),
        ("23.0.0", set()),
        ("22.5.0", {"TechCause"}),
        ("22.0.0", {"eventfilter", "TechCause"}),
        ("21.5.0", {"eventfilter", "TechCause"}),
        ("21.6.0", {"TechCause"}),
        ("20.11.0", {"TechCause"}),
        ("20.10.2", {"eventfilter", "TechCause"}),
        ("18.26.0", {"TechCause"}),
        ("19.8.0", {"not supported", "eventfilter", "TechCause"}),
        ("16.30.0", {"not supported", "eventfilter", "TechCause"}),
        ("GIT-master-abc123", {"not recognised"}),
    ],
)
def test_version_gaps_name_what_the_gateway_lacks(version: str, gaps: set[str]) -> None:
    found = version_gaps(version)
    assert {word for word in gaps for line in found if word in line} == gaps
    assert len(found) == len(gaps)


@pytest.mark.parametrize(
    ("channel", "trunk"),
    [
        ("PJSIP/{number}@otp-trunk", "otp-trunk"),
        ("PJSIP/otp-trunk/sip:{number}@carrier.example", "otp-trunk"),
        ("PJSIP/{number}@carrier-b", "carrier-b"),
    ],
)
def test_trunk_name_is_the_endpoint(channel: str, trunk: str) -> None:
    assert trunk_name(channel) == trunk


def problems(extra: str) -> list[str]:
    try:
        parse(BASE + extra, {})
    except ConfigError as exc:
        return exc.problems
    return []


def test_a_channel_that_is_not_pjsip_is_refused() -> None:
    text = BASE.replace("{secret: s3cret}", '{secret: s3cret, channel: "Local/{number}@otp"}')
    with pytest.raises(ConfigError) as raised:
        parse(text, {})
    assert any(p.startswith("asterisk.channel: must be a PJSIP") for p in raised.value.problems)


@pytest.mark.parametrize(("seconds", "ok"), [(-1, False), (0, True), (60, True), (61, False)])
def test_max_post_dial_seconds_is_bounded(seconds: int, ok: bool) -> None:
    found = problems(f"calls: {{max_post_dial_seconds: {seconds}}}\n")
    assert (found == []) is ok, found
    if not ok:
        assert found == ["calls.max_post_dial_seconds: must be 0-60"]


def test_early_media_is_alerting_by_region_or_carrier() -> None:
    config = parse(
        BASE + "numbers: {early_media_is_alerting: {regions: [ID], carriers: [XL]}}\n", {}
    )
    policy = config.numbers.early_media_is_alerting
    assert policy == EarlyMediaConfig(regions=("ID",), carriers=("XL",))
    assert policy.applies("ID", None)
    assert policy.applies("MY", "XL")
    assert not policy.applies("MY", "Maxis")
    assert not EarlyMediaConfig().applies("ID", "Telkomsel")


def test_early_media_regions_are_checked() -> None:
    found = problems("numbers: {early_media_is_alerting: {regions: [indonesia]}}\n")
    assert found == ["numbers.early_media_is_alerting.regions[0]: must be an ISO 3166 alpha-2 code"]
