"""Configuration: defaults, ${ENV} interpolation, every problem named by its key path."""

from __future__ import annotations

import base64
import copy
import dataclasses
import ipaddress
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config
from gateway.config import ConfigError
from tests.conftest import make_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"

AMI_SECRET = "ami-Secret-9f3e1c"  # noqa: S105 - test value
CODE_SECRET = "code-Secret-4b7a2d8e0c1f"  # noqa: S105 - test value
ENV = {"AMI_SECRET": AMI_SECRET, "OTP_CODE_SECRET": CODE_SECRET}

BASE: dict[str, Any] = {
    "asterisk": {"secret": AMI_SECRET},
    "security": {"code_secret": CODE_SECRET},
    "pools": [{"name": "default", "prefix": "+6221500"}],
}
# Forty distinct caller IDs whose last four digits differ: a small, explicit list.
FORTY_NUMBERS = [f"+6221500{n:04d}" for n in range(0, 4000, 100)]


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, mappings recursively, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse(raw: dict[str, Any] | str, environ: dict[str, str] | None = None) -> config.Config:
    text = raw if isinstance(raw, str) else yaml.safe_dump(raw)
    return config.parse(text, {} if environ is None else environ)


def problems(raw: dict[str, Any] | str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, environ)
    assert info.value.problems, "a ConfigError must list at least one problem"
    return info.value.problems


def paths(found: list[str]) -> set[str]:
    """The key path of each problem (the text before the first ': ')."""
    return {p.split(": ", 1)[0] for p in found}


def problem_at(found: list[str], path: str) -> str:
    matches = [p for p in found if p.split(": ", 1)[0] == path]
    assert len(matches) == 1, f"expected one problem at {path!r} in {found}"
    return matches[0]


def with_pool(**pool: Any) -> dict[str, Any]:
    return merged(BASE, {"pools": [{"name": "p", **pool}]})


# -- defaults ----------------------------------------------------------------


def test_minimal_config_gets_every_default() -> None:
    cfg = parse(BASE)
    assert cfg.http == config.HttpConfig(host="127.0.0.1", port=8080)
    assert config.database_url(cfg.database) == "sqlite:///var/gateway.sqlite3"
    assert cfg.asterisk == config.AsteriskConfig(
        secret=AMI_SECRET,
        host="127.0.0.1",
        port=5038,
        username="otp-gateway",
        channel="PJSIP/{number}@otp-trunk",
        dial_format="e164_no_plus",
    )
    assert cfg.calls == config.CallsConfig(
        ring_seconds=8,
        max_ring_seconds=15,
        max_post_dial_seconds=15,
        max_concurrent=150,
        max_per_second=10.0,
    )
    assert cfg.verification == config.VerificationConfig(ttl_seconds=300, max_attempts=5)
    assert cfg.numbers == config.NumbersConfig(
        default_region="ID",
        allowed_regions=("ID",),
        allowed_types=("mobile", "fixed_line_or_mobile"),
    )
    assert cfg.security.code_secret == CODE_SECRET
    assert cfg.pools == (
        config.PoolConfig(
            name="default",
            prefix="+6221500",
            code_length=4,
            numbers=(),
            cli_format="e164_no_plus",
            regions=(),
            allow_low_entropy=False,
        ),
    )


def test_given_values_override_defaults_and_lists_become_tuples() -> None:
    cfg = parse(
        merged(
            BASE,
            {
                "http": {"port": 9000},
                "calls": {"max_per_second": 7, "ring_seconds": 5},
                "numbers": {"allowed_regions": ["ID", "MY"], "default_region": "MY"},
                "pools": [{"name": "a", "prefix": "+6221500", "code_length": 6, "regions": ["MY"]}],
            },
        )
    )
    assert cfg.http.port == 9000
    assert cfg.http.host == "127.0.0.1"
    assert cfg.calls.ring_seconds == 5
    assert cfg.calls.max_per_second == 7.0
    assert isinstance(cfg.calls.max_per_second, float)
    assert cfg.numbers.allowed_regions == ("ID", "MY")
    assert cfg.pools[0].regions == ("MY",)
    assert cfg.pools[0].code_length == 6


def test_config_is_frozen() -> None:
    cfg = parse(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.http.port = 1  # type: ignore[misc]


# -- ${ENV} interpolation ----------------------------------------------------


def test_env_reference_is_replaced_from_the_given_environ() -> None:
    raw = merged(BASE, {"asterisk": {"secret": "${AMI}"}, "security": {"code_secret": "${CODE}"}})
    ami, code = "from-env", "c" * 16
    cfg = parse(raw, {"AMI": ami, "CODE": code})
    assert cfg.asterisk.secret == ami
    assert cfg.security.code_secret == code


def test_env_default_applies_only_when_the_variable_is_unset() -> None:
    raw = merged(BASE, {"asterisk": {"host": "${AMI_HOST:-10.0.0.5}", "username": "${U:-otp}"}})
    cfg = parse(raw, {"U": "operator"})
    assert cfg.asterisk.host == "10.0.0.5"
    assert cfg.asterisk.username == "operator"


def test_env_set_to_empty_string_wins_over_the_default() -> None:
    raw = merged(BASE, {"database": {"path": "db/${SUFFIX:-default}.sqlite3"}})
    assert parse(raw, {"SUFFIX": ""}).database.path == "db/.sqlite3"


def test_env_reference_inside_a_longer_string_and_in_list_items() -> None:
    raw = merged(
        BASE,
        {
            "asterisk": {"channel": "PJSIP/{number}@${TRUNK}"},
            "numbers": {"allowed_regions": ["ID", "${EXTRA_REGION}"]},
        },
    )
    cfg = parse(raw, {"TRUNK": "carrier-a", "EXTRA_REGION": "MY"})
    assert cfg.asterisk.channel == "PJSIP/{number}@carrier-a"
    assert cfg.numbers.allowed_regions == ("ID", "MY")


def test_env_values_are_not_interpolated_again() -> None:
    raw = merged(BASE, {"asterisk": {"secret": "${AMI}"}})
    literal = "${OTHER}"
    assert parse(raw, {"AMI": literal, "OTHER": "x"}).asterisk.secret == literal


def test_unset_env_without_default_names_the_variable_and_key_path() -> None:
    raw = merged(BASE, {"asterisk": {"secret": "${AMI}"}, "numbers": {"allowed_regions": ["${R}"]}})
    found = problems(raw, {})
    assert "AMI" in problem_at(found, "asterisk.secret")
    assert "not set" in problem_at(found, "asterisk.secret")
    assert "R" in problem_at(found, "numbers.allowed_regions[0]")


def test_empty_env_default_gives_an_empty_secret_which_is_refused() -> None:
    found = problems(merged(BASE, {"asterisk": {"secret": "${AMI:-}"}}), {})
    assert paths(found) == {"asterisk.secret"}
    assert "empty" in found[0]


def test_parse_reads_only_the_environ_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMI_SECRET", "process-env")
    raw = merged(BASE, {"asterisk": {"secret": "${AMI_SECRET}"}})
    assert "AMI_SECRET" in problem_at(problems(raw, {}), "asterisk.secret")


def test_load_defaults_to_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(merged(BASE, {"asterisk": {"secret": "${GW_TEST_AMI}"}})))
    from_process, given = "from-process", "given"
    monkeypatch.setenv("GW_TEST_AMI", from_process)
    assert config.load(path).asterisk.secret == from_process
    assert config.load(path, {"GW_TEST_AMI": given}).asterisk.secret == given


# -- every problem at once, each with its key path ---------------------------


def test_structural_problems_are_all_reported_with_their_key_paths() -> None:
    raw = """
htp: {}
http: {port: true, hots: x}
asterisk: {port: "5038", secret: s}
pools:
  - name: a
    prefix: "+6221500"
    code_length: 4.5
    allow_low_entropy: "yes"
    numbers: ["+622150001234", +622150005678]
  - prefix: "+6221501"
    extra: 1
calls: {max_per_second: true, max_concurrent: false, ring_seconds: 8.0}
verification: {max_attempts: 5.0}
numbers: {allowed_regions: ID}
"""
    found = problems(raw)
    assert paths(found) == {
        "htp",
        "http.hots",
        "http.port",
        "asterisk.port",
        "pools[0].code_length",
        "pools[0].allow_low_entropy",
        "pools[0].numbers[1]",
        "pools[1].extra",
        "pools[1].name",
        "calls.max_per_second",
        "calls.max_concurrent",
        "calls.ring_seconds",
        "verification.max_attempts",
        "numbers.allowed_regions",
        "security",
    }
    assert len(found) == len(paths(found))
    assert "unknown key" in problem_at(found, "htp")
    assert "unknown key" in problem_at(found, "pools[1].extra")
    assert "required" in problem_at(found, "pools[1].name")
    assert "required" in problem_at(found, "security")
    assert "integer" in problem_at(found, "asterisk.port")
    assert "quote" in problem_at(found, "pools[0].numbers[1]")
    assert "list" in problem_at(found, "numbers.allowed_regions")


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"http": {"port": True}}, "http.port"),
        ({"calls": {"max_concurrent": False}}, "calls.max_concurrent"),
        ({"calls": {"max_per_second": True}}, "calls.max_per_second"),
        ({"verification": {"ttl_seconds": True}}, "verification.ttl_seconds"),
    ],
)
def test_a_boolean_is_not_accepted_as_a_number(overrides: dict[str, Any], path: str) -> None:
    found = problems(merged(BASE, overrides))
    assert paths(found) == {path}
    assert "true or false" in found[0]


@pytest.mark.parametrize("value", [1, 0, "true", "yes"])
def test_a_number_or_string_is_not_accepted_as_a_boolean(value: object) -> None:
    found = problems(with_pool(prefix="+6221500", allow_low_entropy=value))
    assert paths(found) == {"pools[0].allow_low_entropy"}


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"http": "8080"}, "http"),
        ({"pools": {"name": "x"}}, "pools"),
        ({"pools": ["default"]}, "pools[0]"),
        ({"numbers": {"allowed_types": [["mobile"]]}}, "numbers.allowed_types[0]"),
        ({"asterisk": {"secret": 12345}}, "asterisk.secret"),
        ({"http": {"host": None}}, "http.host"),
        ({"numbers": {"early_media_is_alerting": ["ID"]}}, "numbers.early_media_is_alerting"),
        (
            {"numbers": {"early_media_is_alerting": {"regions": "ID"}}},
            "numbers.early_media_is_alerting.regions",
        ),
        (
            {"numbers": {"early_media_is_alerting": {"carrier": ["XL"]}}},
            "numbers.early_media_is_alerting.carrier",
        ),
    ],
)
def test_wrong_shapes_are_named_by_path(overrides: dict[str, Any], path: str) -> None:
    assert paths(problems(merged(BASE, overrides))) == {path}


def test_missing_required_sections_and_keys() -> None:
    assert paths(problems("")) == {"asterisk", "pools", "security"}
    assert paths(problems("http: {port: 80}")) == {"asterisk", "pools", "security"}
    found = problems({"asterisk": {}, "security": {}, "pools": [{}]})
    assert paths(found) == {"asterisk.secret", "security.code_secret", "pools[0].name"}


def test_top_level_must_be_a_mapping() -> None:
    assert paths(problems("- a\n- b\n")) == {"(top level)"}


def test_invalid_yaml_is_one_problem() -> None:
    found = problems("asterisk: [\n")
    assert len(found) == 1
    assert found[0].startswith("not valid YAML")


def test_range_and_format_problems_are_all_reported_with_their_key_paths() -> None:
    raw = merged(
        BASE,
        {
            "http": {"port": 0},
            "asterisk": {"port": 70000, "channel": "PJSIP/x@trunk", "dial_format": "sip"},
            "security": {"code_secret": "short"},
            "calls": {"ring_seconds": 20, "max_concurrent": 0, "max_per_second": 0},
            "verification": {"ttl_seconds": 10, "max_attempts": 0},
            "numbers": {
                "default_region": "id",
                "allowed_regions": ["ID", "Indonesia"],
                "allowed_types": ["mobile", "landline"],
            },
            "pools": [{"name": "a", "prefix": "6221500", "code_length": 9, "cli_format": "sip"}],
        },
    )
    found = problems(raw)
    assert paths(found) == {
        "http.port",
        "asterisk.port",
        "asterisk.channel",
        "asterisk.dial_format",
        "security.code_secret",
        "calls.ring_seconds",
        "calls.max_concurrent",
        "calls.max_per_second",
        "verification.ttl_seconds",
        "verification.max_attempts",
        "numbers.default_region",
        "numbers.allowed_regions[1]",
        "numbers.allowed_types[1]",
        "pools[0].prefix",
        "pools[0].code_length",
        "pools[0].cli_format",
    }
    assert len(found) == len(paths(found))
    assert "{number}" in problem_at(found, "asterisk.channel")
    assert "4-8" in problem_at(found, "pools[0].code_length")


def test_an_ami_value_with_a_line_break_is_refused() -> None:
    raw = merged(BASE, {"asterisk": {"username": "otp\r\nAction: Logoff", "secret": "a\nb"}})
    assert paths(problems(raw)) == {"asterisk.username", "asterisk.secret"}


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        ({"http": {"port": 1}}, None),
        ({"http": {"port": 65535}}, None),
        ({"http": {"port": 65536}}, "http.port"),
        ({"asterisk": {"port": 0}}, "asterisk.port"),
        ({"calls": {"ring_seconds": 15, "max_ring_seconds": 15}}, None),
        ({"calls": {"ring_seconds": 16, "max_ring_seconds": 15}}, "calls.ring_seconds"),
        ({"calls": {"ring_seconds": 0}}, "calls.ring_seconds"),
        ({"calls": {"ring_seconds": 8, "max_ring_seconds": 60}}, None),
        ({"calls": {"ring_seconds": 8, "max_ring_seconds": 61}}, "calls.max_ring_seconds"),
        ({"calls": {"max_concurrent": 1}}, None),
        ({"calls": {"max_per_second": 0.5}}, None),
        ({"calls": {"max_per_second": -1}}, "calls.max_per_second"),
        ({"calls": {"pbx_wait_seconds": 0}}, None),
        ({"calls": {"pbx_wait_seconds": 300}}, None),
        ({"calls": {"pbx_wait_seconds": -1}}, "calls.pbx_wait_seconds"),
        ({"calls": {"pbx_wait_seconds": 301}}, "calls.pbx_wait_seconds"),
        ({"verification": {"ttl_seconds": 30}}, None),
        ({"verification": {"ttl_seconds": 29}}, "verification.ttl_seconds"),
        ({"verification": {"max_attempts": 1}}, None),
        ({"verification": {"max_attempts": 20}}, None),
        ({"verification": {"max_attempts": 21}}, "verification.max_attempts"),
        ({"security": {"code_secret": "x" * 16}}, None),
        ({"security": {"code_secret": "x" * 15}}, "security.code_secret"),
        ({"numbers": {"allowed_regions": []}}, "numbers.allowed_regions"),
        ({"numbers": {"allowed_types": ["toll_free", "voip"]}}, None),
        ({"asterisk": {"dial_format": "national"}}, None),
        ({"asterisk": {"dial_format": "e164"}}, None),
        ({"pools": []}, "pools"),
        ({"pools": [{"name": "a", "prefix": "+6221500", "code_length": 4}]}, None),
        ({"pools": [{"name": "a", "prefix": "+6221500", "code_length": 8}]}, None),
        ({"pools": [{"name": "a", "prefix": "+6221500", "code_length": 3}]}, "pools[0]"),
        ({"pools": [{"name": "a", "prefix": "+62215001", "code_length": 7}]}, None),
        ({"pools": [{"name": "a", "prefix": "+622150012", "code_length": 7}]}, "pools[0]"),
        ({"pools": [{"name": "a", "prefix": "+0221500"}]}, "pools[0].prefix"),
        ({"pools": [{"name": "a", "prefix": "+62 21 500"}]}, "pools[0].prefix"),
        ({"asterisk": {"channel": "PJSIP/otp-trunk/sip:{number}@carrier.example"}}, None),
        ({"http": {"operator_port": 9100}}, None),
        ({"http": {"operator_port": 0}}, "http.operator_port"),
        ({"http": {"operator_port": 8080}}, "http.operator_port"),  # the API's port
        ({"http": {"keepalive_seconds": 0.5}}, None),
        ({"http": {"keepalive_seconds": 0}}, "http.keepalive_seconds"),
        ({"http": {"keepalive_seconds": 301}}, "http.keepalive_seconds"),
        ({"http": {"max_connections": 1}}, None),
        ({"http": {"max_connections": 0}}, "http.max_connections"),
        ({"http": {"max_connections": 60_001}}, "http.max_connections"),
        ({"database": {"retention_days": 0}}, None),  # kept for ever
        ({"database": {"retention_days": 31}}, None),
        ({"database": {"retention_days": 30}}, "database.retention_days"),
        ({"database": {"retention_days": 3651}}, "database.retention_days"),
        (
            {"numbers": {"early_media_is_alerting": {"regions": ["id"]}}},
            "numbers.early_media_is_alerting.regions[0]",
        ),
    ],
)
def test_boundaries(overrides: dict[str, Any], path: str | None) -> None:
    raw = merged(BASE, overrides)
    if path is None:
        parse(raw)
    else:
        assert path in paths(problems(raw))


# -- pools -------------------------------------------------------------------


def test_prefix_and_numbers_together_are_refused() -> None:
    found = problems(with_pool(prefix="+6221500", numbers=FORTY_NUMBERS, allow_low_entropy=True))
    assert paths(found) == {"pools[0]"}
    assert "prefix or numbers" in found[0]


@pytest.mark.parametrize("pool", [{}, {"numbers": []}])
def test_neither_prefix_nor_numbers_is_refused(pool: dict[str, Any]) -> None:
    found = problems(with_pool(**pool))
    assert paths(found) == {"pools[0]"}
    assert "prefix or numbers" in found[0]


def test_low_entropy_numbers_pool_is_refused_by_default() -> None:
    found = problems(with_pool(numbers=FORTY_NUMBERS))
    message = problem_at(found, "pools[0]")
    assert "40 codes" in message
    assert "allow_low_entropy" in message


def test_low_entropy_prefix_pool_is_refused_even_with_a_short_code() -> None:
    found = problems(with_pool(prefix="+6221500", code_length=3))
    assert "pools[0].code_length" in paths(found)
    assert any("1000 codes" in p for p in found)


def test_low_entropy_pool_is_accepted_with_override_and_summary_warns() -> None:
    cfg = parse(with_pool(numbers=FORTY_NUMBERS, allow_low_entropy=True))
    assert cfg.pools[0].numbers == tuple(FORTY_NUMBERS)
    assert cfg.pools[0].codes == 40
    lines = config.summary(cfg)
    pool_line = next(i for i, line in enumerate(lines) if line.startswith("pool p:"))
    assert "40 codes" in lines[pool_line]
    assert "5.3 bits" in lines[pool_line]
    warning = lines[pool_line + 1]
    assert "warning" in warning
    assert "allow_low_entropy" in warning
    assert "1 time in 8" in warning  # 5 attempts against 40 codes


def test_summary_has_no_warning_for_a_full_pool_even_with_the_override_set() -> None:
    cfg = parse(with_pool(prefix="+6221500", code_length=4, allow_low_entropy=True))
    lines = config.summary(cfg)
    assert not any("warning" in line for line in lines)
    assert any("+6221500XXXX" in line and "10000 codes" in line for line in lines)


def test_entropy_bits() -> None:
    assert config.entropy_bits(config.PoolConfig("a", prefix="+6221500")) == pytest.approx(
        math.log2(10_000)
    )
    six = config.PoolConfig("a", prefix="+6221500", code_length=6)
    assert config.entropy_bits(six) == pytest.approx(math.log2(1_000_000))
    listed = config.PoolConfig("b", numbers=tuple(FORTY_NUMBERS), allow_low_entropy=True)
    assert config.entropy_bits(listed) == pytest.approx(math.log2(40))


def test_duplicate_pool_names_are_refused() -> None:
    raw = merged(
        BASE,
        {
            "pools": [
                {"name": "same", "prefix": "+6221500"},
                {"name": "other", "prefix": "+6221501"},
                {"name": "same", "prefix": "+6221502"},
            ]
        },
    )
    found = problems(raw)
    assert paths(found) == {"pools[0].name", "pools[2].name"}
    assert "same" in found[0]


def test_numbers_whose_codes_collide_are_refused() -> None:
    numbers = ["+622150001234", "+622150115678", "+622150991234"]
    found = problems(with_pool(numbers=numbers, allow_low_entropy=True))
    assert paths(found) == {"pools[0].numbers"}
    assert "collide" in found[0]


def test_codes_that_differ_only_beyond_code_length_collide() -> None:
    # Distinct in their last 5 digits, but code_length 4 reads only the last 4.
    numbers = ["+622150011234", "+622150021234"]
    found = problems(with_pool(numbers=numbers, code_length=4, allow_low_entropy=True))
    assert "collide" in problem_at(found, "pools[0].numbers")
    parse(with_pool(numbers=numbers, code_length=5, allow_low_entropy=True))


def test_duplicate_numbers_are_refused() -> None:
    numbers = ["+622150001234", "+622150001234"]
    found = problems(with_pool(numbers=numbers, allow_low_entropy=True))
    assert any("duplicates" in p for p in found)
    assert paths(found) == {"pools[0].numbers"}


def test_numbers_must_be_e164() -> None:
    numbers = ["+622150001234", "622150005678", "+62 21 500 9999"]
    found = problems(with_pool(numbers=numbers, allow_low_entropy=True))
    assert paths(found) == {"pools[0].numbers[1]", "pools[0].numbers[2]"}


def test_pool_regions_must_be_allowed_regions() -> None:
    raw = merged(
        BASE,
        {
            "numbers": {"allowed_regions": ["ID", "MY"]},
            "pools": [{"name": "a", "prefix": "+6221500", "regions": ["ID", "SG", "MY", "PH"]}],
        },
    )
    found = problems(raw)
    assert paths(found) == {"pools[0].regions[1]", "pools[0].regions[3]"}
    assert "allowed_regions" in found[0]


def test_every_pool_problem_is_reported_together() -> None:
    raw = merged(
        BASE,
        {
            "pools": [
                {"name": "a", "prefix": "+6221500", "code_length": 2, "regions": ["SG"]},
                {"name": "a", "numbers": ["+622150001234", "+622150011234"]},
            ]
        },
    )
    found = problems(raw)
    assert paths(found) == {
        "pools[0].name",
        "pools[0].code_length",
        "pools[0].regions[0]",
        "pools[0]",
        "pools[1].name",
        "pools[1].numbers",
        "pools[1]",
    }


def test_a_nonsense_code_length_is_a_config_error_not_a_crash() -> None:
    found = problems(with_pool(prefix="+6221500", code_length=-400))
    assert "pools[0].code_length" in paths(found)


# -- ConfigError, load, the example file, summary ----------------------------


def test_config_error_message_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"http": {"port": "x"}})
    error = info.value
    assert len(error.problems) >= 4
    assert str(error).splitlines() == error.problems


def test_load_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "absent.yaml", ENV)
    assert len(info.value.problems) == 1
    assert "absent.yaml" in info.value.problems[0]


def test_example_config_loads_with_its_secrets_set() -> None:
    cfg = config.load(EXAMPLE, ENV)
    assert cfg.asterisk.secret == AMI_SECRET
    assert cfg.security.code_secret == CODE_SECRET
    assert [p.name for p in cfg.pools] == ["default"]
    assert cfg.pools[0].prefix == "+6221500"
    assert cfg.calls.max_ring_seconds == 15
    assert cfg.numbers.allowed_regions == ("ID",)


def test_example_config_without_its_secrets_names_both_variables() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(EXAMPLE, {})
    found = info.value.problems
    assert paths(found) == {"asterisk.secret", "security.code_secret"}
    assert "AMI_SECRET" in problem_at(found, "asterisk.secret")
    assert "OTP_CODE_SECRET" in problem_at(found, "security.code_secret")


def test_http_and_retention_defaults() -> None:
    cfg = parse(BASE)
    assert (cfg.http.operator_host, cfg.http.operator_port) == ("127.0.0.1", 8081)
    assert (cfg.http.keepalive_seconds, cfg.http.max_connections) == (15.0, 1000)
    assert cfg.database.retention_days == 90
    assert config.load(EXAMPLE, ENV).http == cfg.http  # the example shows the defaults
    assert config.load(EXAMPLE, ENV).database == cfg.database


def test_shutdown_takes_the_longest_call_then_the_requests_in_flight() -> None:
    # The longest call: a voice call's post-dial delay, 30 s ringing, 30 s answered.
    cfg = parse(BASE)
    assert config.shutdown_seconds(cfg) == 15 + 30 + 30 + config.SHUTDOWN_GRACE_S + 10
    # A flash call that may ring longer than a voice call lasts.
    slow = parse(
        merged(
            BASE,
            {
                "calls": {"max_ring_seconds": 60, "max_post_dial_seconds": 60},
                "voice": {"ring_seconds": 20, "max_seconds": 30},
            },
        )
    )
    assert config.shutdown_seconds(slow) == 60 + 60 + config.SHUTDOWN_GRACE_S + 10
    lines = config.summary(slow)
    assert "shutdown: up to 135s after SIGTERM" in "\n".join(lines)


def test_summary_warns_when_operator_routes_leave_loopback() -> None:
    assert not any("operator" in line for line in config.summary(parse(BASE)) if "warn" in line)
    exposed = parse(merged(BASE, {"http": {"operator_host": "0.0.0.0"}}))  # noqa: S104
    assert any(line.startswith("warning: operator routes") for line in config.summary(exposed))


def test_summary_describes_the_config_without_its_secrets() -> None:
    cfg = config.load(EXAMPLE, ENV)
    lines = config.summary(cfg)
    text = "\n".join(lines)
    assert AMI_SECRET not in text
    assert CODE_SECRET not in text
    assert "127.0.0.1:8080" in text
    assert "otp-gateway@127.0.0.1:5038" in text
    assert "pool default: +6221500XXXX, 10000 codes (13.3 bits)" in text
    assert not any("warning" in line for line in lines)


# -- wrong codes: limits per key and across keys, and what they leave a guesser ------


def test_wrong_code_limits_are_per_key_with_higher_ceilings_across_keys() -> None:
    limits = parse(BASE).limits
    assert (limits.failed_checks_per_phone_per_day, limits.failed_checks_per_phone_per_30_days) == (
        10,
        20,
    )
    assert (
        limits.failed_checks_per_phone_per_day_all_keys,
        limits.failed_checks_per_phone_per_30_days_all_keys,
    ) == (30, 60)


@pytest.mark.parametrize(
    ("limits", "path"),
    [
        ({"failed_checks_per_phone_per_30_days": 0}, "limits.failed_checks_per_phone_per_30_days"),
        (  # under the per-key limit, the per-key one would never be reached
            {"failed_checks_per_phone_per_day_all_keys": 9},
            "limits.failed_checks_per_phone_per_day_all_keys",
        ),
        (
            {"failed_checks_per_phone_per_30_days_all_keys": 19},
            "limits.failed_checks_per_phone_per_30_days_all_keys",
        ),
        ({"failed_checks_per_phone_per_day_all_keys": 10}, None),  # one ceiling for all
    ],
)
def test_wrong_code_limits_across_keys_are_at_least_those_per_key(
    limits: dict[str, Any], path: str | None
) -> None:
    raw = merged(BASE, {"limits": limits})
    if path is None:
        parse(raw)
    else:
        found = problems(raw)
        assert paths(found) == {path}
        assert "must be at least" in found[0]


def test_guessing_odds_spend_the_wrong_codes_a_verification_at_a_time() -> None:
    # Each verification is a new code: five guesses at a time, not twenty at one code.
    assert config.guessing_odds(10_000, 5, 20) == pytest.approx(1 - (1 - 5 / 10_000) ** 4)
    assert config.guessing_odds(10_000, 5, 22) == pytest.approx(
        1 - (1 - 5 / 10_000) ** 4 * (1 - 2 / 10_000)
    )
    assert config.guessing_odds(40, 5, 100) == pytest.approx(1 - (35 / 40) ** 20)
    assert config.guessing_odds(4, 5, 3) == pytest.approx(0.75)
    assert config.guessing_odds(4, 5, 5) == 1.0  # five attempts cover four codes
    assert config.guessing_odds(10_000, 5, 0) == 0.0


def test_summary_shows_the_guessing_odds_of_each_pool() -> None:
    raw = merged(
        BASE,
        {
            "pools": [
                {"name": "four", "prefix": "+6221500", "regions": ["ID"]},
                {"name": "six", "prefix": "+62215", "code_length": 6},
            ]
        },
    )
    lines = config.summary(parse(raw))
    assert (
        "limits: wrong codes per phone: per API key 10 a day and 20 per 30 days; "
        "across keys 30 a day and 60 per 30 days"
    ) in lines
    four = lines.index("pool four: +6221500XXXX, 10000 codes (13.3 bits), serves ID")
    # 20 wrong codes through one key: 1 - (1 - 5/10^4)^4; 60 across keys: ^12.
    assert lines[four + 1 : four + 3] == [
        "  guessing one phone's code: 1 in 500 (0.2%) per 30 days through one API key, "
        "1 in 167 (0.598%) through any number of keys",
        "  guessing at large: one API key's 10000 calls a day, each to another phone, "
        "find about 5 codes a day",
    ]
    six = lines.index(
        "pool six: +62215XXXXXX, 1000000 codes (19.9 bits), serves all allowed regions"
    )
    assert lines[six + 1 : six + 3] == [
        "  guessing one phone's code: 1 in 50000 (0.002%) per 30 days through one API key, "
        "1 in 16667 (0.006%) through any number of keys",
        "  guessing at large: one API key's 10000 calls a day, each to another phone, "
        "find about 0.05 codes a day",
    ]


def test_summary_never_contains_secrets_even_when_they_resemble_other_values() -> None:
    raw = merged(
        BASE,
        {
            "asterisk": {"secret": "SECRET-AMI-zz"},
            "security": {"code_secret": "SECRET-CODE-0123456789"},
            "pools": [{"name": "low", "numbers": FORTY_NUMBERS, "allow_low_entropy": True}],
        },
    )
    text = "\n".join(config.summary(parse(raw)))
    assert "SECRET-" not in text


def test_test_numbers_map_normalised_phones_to_codes_of_the_serving_pool() -> None:
    cfg = parse(merged(BASE, {"test_numbers": {"+6281200000001": "4321"}}))
    assert cfg.test_numbers == {"+6281200000001": "4321"}
    assert parse(BASE).test_numbers == {}  # off unless configured


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({"+62 812 0000 0001": "4321"}, "must be an E.164 number"),
        ({"081200000001": "4321"}, "must be an E.164 number"),
        ({"+6281200000001": "43210"}, "the code must be 4 digits"),
        ({"+6281200000001": "12a4"}, "the code must be 4 digits"),
        ({"+6281200000001": 4321}, 'must be a string (quote it: "4321")'),
        ({"+14155550100": "4321"}, "no pool serves its region US"),
        ([["+6281200000001", "4321"]], "test_numbers: must be a mapping"),
    ],
)
def test_bad_test_numbers_are_refused_with_their_key(entries: Any, expected: str) -> None:
    found = problems(merged(BASE, {"test_numbers": entries}))
    assert any(expected in p for p in found), found


def test_summary_warns_when_sandbox_numbers_are_configured() -> None:
    lines = config.summary(parse(merged(BASE, {"test_numbers": {"+6281200000001": "4321"}})))
    assert any(line.startswith("warning: test_numbers is set: 1 phones") for line in lines)
    assert not any("test_numbers" in line for line in config.summary(parse(BASE)))


# -- issue 14: the PJSIP channel, the post-dial cap, early media ---------------------


def test_a_channel_that_is_not_pjsip_is_refused() -> None:
    found = problems(merged(BASE, {"asterisk": {"channel": "Local/{number}@otp"}}))
    assert problem_at(found, "asterisk.channel").startswith("asterisk.channel: must be a PJSIP")


@pytest.mark.parametrize(("seconds", "ok"), [(-1, False), (0, True), (60, True), (61, False)])
def test_max_post_dial_seconds_is_bounded(seconds: int, ok: bool) -> None:
    raw = merged(BASE, {"calls": {"max_post_dial_seconds": seconds}})
    if ok:
        assert parse(raw).calls.max_post_dial_seconds == seconds
    else:
        assert problems(raw) == ["calls.max_post_dial_seconds: must be 0-60"]


def test_early_media_is_alerting_by_region_or_carrier() -> None:
    raw = merged(
        BASE, {"numbers": {"early_media_is_alerting": {"regions": ["ID"], "carriers": ["XL"]}}}
    )
    policy = parse(raw).numbers.early_media_is_alerting
    assert policy == config.EarlyMediaConfig(regions=("ID",), carriers=("XL",))
    assert policy.applies("ID", None)
    assert policy.applies("MY", "XL")
    assert not policy.applies("MY", "Maxis")
    assert not config.EarlyMediaConfig().applies("ID", "Telkomsel")


def test_early_media_regions_are_checked() -> None:
    raw = merged(BASE, {"numbers": {"early_media_is_alerting": {"regions": ["indonesia"]}}})
    assert problems(raw) == [
        "numbers.early_media_is_alerting.regions[0]: must be an ISO 3166 alpha-2 code"
    ]


# -- webhooks -------------------------------------------------------------------


def webhook_secret(size: int) -> str:
    return "whsec_" + base64.b64encode(bytes(range(size))).decode()


@pytest.mark.parametrize(("size", "ok"), [(16, False), (23, False), (24, True), (32, True)])
def test_a_webhook_secret_under_24_bytes_is_refused(size: int, ok: bool) -> None:
    raw = merged(BASE, {"webhooks": {"secret": webhook_secret(size)}})
    if ok:
        assert parse(raw).webhooks.secret == webhook_secret(size)
    else:
        found = problem_at(problems(raw), "webhooks.secret")
        assert found.startswith(f"webhooks.secret: must decode to at least 24 bytes, not {size}")


def test_webhook_allowed_networks_are_cidrs_named_by_index() -> None:
    assert parse(BASE).webhooks.allowed_networks == ()
    good = ["127.0.0.1/32", "10.20.0.0/16", "::1", "fd00::/8"]
    raw = merged(BASE, {"webhooks": {"allowed_networks": good}})
    assert parse(raw).webhooks.allowed_networks == tuple(good)
    raw = merged(BASE, {"webhooks": {"allowed_networks": [*good, "localhost", "10.0.0.0/33"]}})
    assert paths(problems(raw)) == {"webhooks.allowed_networks[4]", "webhooks.allowed_networks[5]"}
    raw = merged(BASE, {"webhooks": {"allowed_networks": "127.0.0.1/32"}})
    assert problems(raw) == ["webhooks.allowed_networks: must be a list"]


@pytest.mark.parametrize(
    ("address", "reached"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1", True),
        ("::ffff:93.184.216.34", True),
        ("64:ff9b::808:808", True),  # NAT64 of a public address
        ("2002:808:808::", True),  # 6to4 of a public address
        ("127.0.0.1", False),
        ("::1", False),
        ("0.0.0.0", False),  # noqa: S104 - an address under test, not a bind
        ("::", False),
        ("::ffff:127.0.0.1", False),
        ("169.254.169.254", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),
        ("198.18.0.1", False),
        ("fd00::1", False),
        ("fe80::1", False),
        ("224.0.0.1", False),
        ("ff02::1", False),
        ("255.255.255.255", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b:1::a00:1", False),  # local-use NAT64 of 10.0.0.1
        ("2002:a00:1::", False),  # 6to4 of 10.0.0.1
    ],
)
def test_webhooks_reach_only_globally_routable_addresses(address: str, reached: bool) -> None:
    assert config.WebhooksConfig().reaches(ipaddress.ip_address(address)) is reached


def test_allowed_networks_open_exactly_themselves() -> None:
    hooks = config.WebhooksConfig(allowed_networks=("127.0.0.1/32", "10.20.0.0/16", "fd00::/8"))
    for inside in ("127.0.0.1", "::ffff:127.0.0.1", "10.20.3.4", "fd00::1"):
        assert hooks.reaches(ipaddress.ip_address(inside)), inside
    for outside in ("127.0.0.2", "10.21.0.1", "::1", "169.254.169.254"):
        assert not hooks.reaches(ipaddress.ip_address(outside)), outside


def test_summary_warns_when_webhooks_may_reach_inside() -> None:
    raw = merged(BASE, {"webhooks": {"secret": webhook_secret(32)}})
    assert not any("allowed_networks" in line for line in config.summary(parse(raw)))
    raw = merged(raw, {"webhooks": {"allowed_networks": ["10.20.0.0/16"]}})
    [line] = [line for line in config.summary(parse(raw)) if "allowed_networks" in line]
    assert line.startswith("warning: webhooks.allowed_networks lets callback URLs reach 10.20")


# -- database ----------------------------------------------------------------


def test_the_database_defaults_to_the_sqlite_file_and_path_still_names_it() -> None:
    assert config.database_url(parse(BASE).database) == "sqlite:///var/gateway.sqlite3"
    older = parse(merged(BASE, {"database": {"path": "/srv/otp/gw.sqlite3"}}))
    assert config.database_url(older.database) == "sqlite:////srv/otp/gw.sqlite3"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///var/gateway.sqlite3",
        "sqlite:////srv/otp/gateway.sqlite3",
        "postgresql://otp:secret@db.internal:5432/otp",
        "postgres://otp@10.0.0.5/otp",
    ],
)
def test_database_urls_of_either_backend_are_accepted(url: str) -> None:
    assert config.database_url(parse(merged(BASE, {"database": {"url": url}})).database) == url


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://otp:x@db/otp", "must be sqlite:///FILE or postgresql://"),
        ("var/gateway.sqlite3", "must be sqlite:///FILE or postgresql://"),
        ("sqlite:///", "sqlite:/// needs a file"),
        ("postgresql://otp:x@:5432/otp", "names no host"),
        ("postgresql://otp:x@db:99999/otp", "the port must be a number 1-65535"),
        ("postgresql://otp:x@db:port/otp", "the port must be a number 1-65535"),
        ("postgresql://otp:x@db:5432/", "names no database"),
        ("postgresql://otp:x@db:5432/otp\nSET", "must be one line without spaces"),
    ],
)
def test_a_wrong_database_url_names_the_key_and_what_is_wrong(url: str, says: str) -> None:
    found = problems(merged(BASE, {"database": {"url": url}}))
    assert says in problem_at(found, "database.url")


def test_path_and_url_together_are_refused() -> None:
    raw = merged(BASE, {"database": {"path": "a.sqlite3", "url": "sqlite:///b.sqlite3"}})
    assert "set only url" in problem_at(problems(raw), "database.path")


def test_pool_size_is_bounded() -> None:
    found = problems(merged(BASE, {"database": {"pool_size": 0}}))
    assert problem_at(found, "database.pool_size") == "database.pool_size: must be 1-100"


def test_the_database_password_comes_from_the_environment_and_is_never_shown() -> None:
    raw = merged(BASE, {"database": {"url": "postgresql://otp:${PGPASSWORD}@db:5432/otp"}})
    cfg = parse(raw, {"PGPASSWORD": "s3cret-pg-password"})
    assert cfg.database.url == "postgresql://otp:s3cret-pg-password@db:5432/otp"
    summary = "\n".join(config.summary(cfg))
    assert "database: postgresql://otp:***@db:5432/otp" in summary
    assert "s3cret-pg-password" not in summary


def test_without_nodes_the_asterisk_mapping_is_the_one_node() -> None:
    cfg = parse(merged(BASE, {"asterisk": {"host": "10.0.0.5", "name": "pbx1"}}))
    (node,) = config.nodes(cfg)
    assert (node.name, node.host, node.port, node.secret) == ("pbx1", "10.0.0.5", 5038, AMI_SECRET)
    assert (node.max_per_second, node.max_concurrent) == (
        cfg.calls.max_per_second,
        cfg.calls.max_concurrent,
    )


def test_a_node_inherits_every_key_it_leaves_out() -> None:
    raw = merged(
        BASE,
        {
            "asterisk": {
                "username": "otp",
                "channel": "PJSIP/{number}@carrier",
                "nodes": [
                    {"name": "a", "host": "10.0.0.1"},
                    {
                        "name": "b",
                        "host": "10.0.0.2",
                        "port": 5039,
                        "secret": "b-secret",
                        "channel": "PJSIP/{number}@carrier-b",
                        "max_per_second": 4,
                        "max_concurrent": 40,
                    },
                ],
            },
            "calls": {"max_per_second": 7, "max_concurrent": 70},
        },
    )
    a, b = config.nodes(parse(raw))
    assert (a.name, a.host, a.port, a.username, a.secret, a.channel) == (
        "a",
        "10.0.0.1",
        5038,
        "otp",
        AMI_SECRET,
        "PJSIP/{number}@carrier",
    )
    assert (a.max_per_second, a.max_concurrent) == (7, 70)
    assert (b.port, b.secret, b.channel, b.max_per_second, b.max_concurrent) == (
        5039,
        "b-secret",
        "PJSIP/{number}@carrier-b",
        4,
        40,
    )
    assert "b-secret" not in repr(b)


def test_nodes_with_one_name_or_one_ami_address_are_refused_by_key() -> None:
    raw = merged(
        BASE,
        {
            "asterisk": {
                "nodes": [
                    {"name": "a", "host": "10.0.0.1"},
                    {"name": "a", "host": "10.0.0.2"},
                    {"name": "c", "host": "10.0.0.1", "port": 5038},
                    {"name": "bad name", "host": "10.0.0.4"},
                ]
            }
        },
    )
    found = problems(raw)
    assert "'a' is also asterisk.nodes[0]'s name" in problem_at(found, "asterisk.nodes[1].name")
    assert "10.0.0.1:5038 is also asterisk.nodes[0]'s" in problem_at(found, "asterisk.nodes[2]")
    assert "letters, digits" in problem_at(found, "asterisk.nodes[3].name")


@pytest.mark.parametrize(
    ("node", "path"),
    [
        ({"port": 0}, "asterisk.nodes[0].port"),
        ({"secret": "s\nAction: Logoff"}, "asterisk.nodes[0].secret"),
        ({"channel": "Local/{number}@x"}, "asterisk.nodes[0].channel"),
        ({"channel": "PJSIP/x\nAction: Originate"}, "asterisk.nodes[0].channel"),
        ({"max_per_second": 0}, "asterisk.nodes[0].max_per_second"),
        ({"max_concurrent": 0}, "asterisk.nodes[0].max_concurrent"),
        ({"colour": "blue"}, "asterisk.nodes[0].colour"),
        ({}, "asterisk.nodes[0].name"),
    ],
)
def test_a_bad_node_key_is_named(node: dict[str, Any], path: str) -> None:
    entry = {"name": "a", **node} if "name" not in node and node else node
    found = problems(merged(BASE, {"asterisk": {"nodes": [entry]}}))
    assert path in paths(found), found


# -- voice ----------------------------------------------------------------------


def with_voice(**voice: Any) -> dict[str, Any]:
    return merged(BASE, {"voice": voice})


def test_voice_defaults_leave_voice_calls_off_until_a_caller_id_is_set() -> None:
    voice = parse(BASE).voice
    assert voice == config.VoiceConfig()
    assert voice == config.VoiceConfig(
        caller_id=None,
        cli_format="e164",
        context="otp-voice",
        locales=("en", "id"),
        default_locale="en",
        repeat=3,
        max_seconds=30,
        ring_seconds=30,
        fallback_after_seconds=60,
        next_min_gap_seconds=30,
        per_phone_per_hour=2,
        per_phone_per_day=5,
        key_daily_calls=1000,
    )
    assert "voice: off (voice.caller_id is unset: voice calls are refused)" in config.summary(
        parse(BASE)
    )


def test_voice_keys_are_read_and_a_null_fallback_means_never() -> None:
    cfg = parse(
        merged(
            BASE,
            {
                "voice": {
                    "caller_id": "+622180001000",
                    "cli_format": "national",
                    "locales": ["en", "id", "pt_BR"],
                    "default_locale": "id",
                    "fallback_after_seconds": None,
                }
            },
        )
    )
    assert cfg.voice.caller_id == "+622180001000"
    assert cfg.voice.cli_format == "national"
    assert cfg.voice.locales == ("en", "id", "pt_BR")
    assert cfg.voice.default_locale == "id"
    assert cfg.voice.fallback_after_seconds is None
    assert any(
        line.startswith("voice: caller ID +622180001000 into context otp-voice")
        and "fallback after never" in line
        for line in config.summary(cfg)
    )


@pytest.mark.parametrize(
    ("caller_id", "ok"),
    [
        ("+622180001000", True),
        ("+12345678", True),  # 8 digits
        ("+123456789012345", True),  # 15 digits
        ("+1234567", False),  # 7 digits
        ("+1234567890123456", False),  # 16 digits
        ("622180001000", False),  # no +
        ("+0221800010", False),  # no country code starts with 0
        ("+62 21 8000 1000", False),
        ("+62218000100x", False),
    ],
)
def test_a_voice_caller_id_must_be_e164(caller_id: str, ok: bool) -> None:
    raw = with_voice(caller_id=caller_id)
    if ok:
        assert parse(raw).voice.caller_id == caller_id
    else:
        found = problems(raw)
        assert paths(found) == {"voice.caller_id"}
        assert "E.164" in found[0]


def test_an_unquoted_voice_caller_id_is_a_number_and_refused() -> None:
    text = yaml.safe_dump(BASE) + "voice:\n  caller_id: +622180001000\n"
    assert "quote it" in problem_at(problems(text), "voice.caller_id")


def test_the_default_locale_must_be_one_of_the_locales() -> None:
    found = problems(with_voice(locales=["en", "id"], default_locale="fr"))
    assert paths(found) == {"voice.default_locale"}
    assert "'fr' is not in voice.locales" in found[0]
    # Leaving out the default's locale breaks the default too.
    assert paths(problems(with_voice(locales=["id"]))) == {"voice.default_locale"}
    assert parse(with_voice(locales=["id"], default_locale="id")).voice.default_locale == "id"


@pytest.mark.parametrize(
    ("locales", "path"),
    [
        (["en", "pt_BR", "fil"], None),
        (["en", "EN"], "voice.locales[1]"),
        (["en", "en-US"], "voice.locales[1]"),
        (["en", "pt_br"], "voice.locales[1]"),
        (["english"], "voice.locales[0]"),
        (["en", "e"], "voice.locales[1]"),
        ([], "voice.locales"),
        (["en", "id", "en"], "voice.locales"),
    ],
)
def test_each_voice_locale_is_a_locale_name_given_once(
    locales: list[str], path: str | None
) -> None:
    raw = with_voice(locales=locales, default_locale="en")
    if path is None:
        assert parse(raw).voice.locales == tuple(locales)
    else:
        found = problems(raw)
        assert path in paths(found), found


@pytest.mark.parametrize(
    ("voice", "path"),
    [
        ({"per_phone_per_hour": 5, "per_phone_per_day": 5}, None),
        ({"per_phone_per_hour": 6, "per_phone_per_day": 5}, "voice.per_phone_per_day"),
        ({"per_phone_per_hour": 1, "per_phone_per_day": 0}, "voice.per_phone_per_day"),
        ({"per_phone_per_hour": 0}, "voice.per_phone_per_hour"),
        ({"per_phone_per_day": 10_001}, "voice.per_phone_per_day"),
    ],
)
def test_voice_calls_per_phone_a_day_are_at_least_those_an_hour(
    voice: dict[str, Any], path: str | None
) -> None:
    raw = with_voice(**voice)
    if path is None:
        parse(raw)
    else:
        found = problems(raw)
        assert paths(found) == {path}


def test_per_phone_per_day_under_per_hour_names_the_hourly_key() -> None:
    found = problems(with_voice(per_phone_per_hour=6, per_phone_per_day=5))
    assert found == ["voice.per_phone_per_day: must be between voice.per_phone_per_hour and 10000"]


@pytest.mark.parametrize(
    ("voice", "path"),
    [
        ({"repeat": 1}, None),
        ({"repeat": 5}, None),
        ({"repeat": 0}, "voice.repeat"),
        ({"repeat": 6}, "voice.repeat"),
        ({"max_seconds": 5}, None),
        ({"max_seconds": 120}, None),
        ({"max_seconds": 4}, "voice.max_seconds"),
        ({"max_seconds": 121}, "voice.max_seconds"),
        ({"ring_seconds": 60}, None),
        ({"ring_seconds": 4}, "voice.ring_seconds"),
        ({"ring_seconds": 61}, "voice.ring_seconds"),
        ({"fallback_after_seconds": 0}, None),
        ({"fallback_after_seconds": 3600}, None),
        ({"fallback_after_seconds": 3601}, "voice.fallback_after_seconds"),
        ({"fallback_after_seconds": -1}, "voice.fallback_after_seconds"),
        ({"next_min_gap_seconds": 0}, None),
        ({"next_min_gap_seconds": 3601}, "voice.next_min_gap_seconds"),
        ({"key_daily_calls": 10_000_000}, None),
        ({"key_daily_calls": 0}, "voice.key_daily_calls"),
        ({"key_daily_calls": 10_000_001}, "voice.key_daily_calls"),
        ({"cli_format": "e164_no_plus"}, None),
        ({"cli_format": "sip"}, "voice.cli_format"),
        ({"context": "otp-voice_2"}, None),
        ({"context": "otp voice"}, "voice.context"),
        ({"context": ""}, "voice.context"),
        ({"context": "x" * 65}, "voice.context"),
    ],
)
def test_voice_boundaries(voice: dict[str, Any], path: str | None) -> None:
    raw = with_voice(**voice)
    if path is None:
        parse(raw)
    else:
        assert paths(problems(raw)) == {path}


def test_voice_repeat_out_of_range_names_its_range() -> None:
    assert problems(with_voice(repeat=6)) == ["voice.repeat: must be 1-5"]


def test_a_voice_section_built_in_code_gets_the_same_checks() -> None:
    voice = config.VoiceConfig(caller_id="+622180001000", locales=("id",), default_locale="id")
    assert make_config("sqlite:///unused", voice=voice).voice == voice
    bad = make_config(
        "sqlite:///unused",
        checked=False,
        voice=config.VoiceConfig(caller_id="0218000", repeat=0, default_locale="fr"),
    )
    assert paths(config._check(bad)) == {
        "voice.caller_id",
        "voice.repeat",
        "voice.default_locale",
    }


# -- the declaration: each key's rules on its field, applied by one walk ---------------


@config.section
class Declared:
    """Keys declared as a new one would be, with each kind of rule."""

    seconds: int = config.setting("a bounded number", default=5, ge=1, le=10)
    rate: float = config.setting("above zero", default=1.0, gt=0, le=100)
    most: int = config.setting("at most `seconds`", default=3, ge=0, le="seconds")
    days: int = config.setting("0 or a range", default=0, ge=31, le=3650, zero="keep for ever")
    mode: str = config.setting("one of three", default="a", choices=("a", "b", "c"))
    names: tuple[str, ...] = config.setting(
        "not empty, each a region", default=("ID",), nonempty=True, pattern=config.REGION
    )
    phrase: str = config.setting(
        "a secret", default="x" * 16, secret=True, min_length=16, one_line=True, hint="long"
    )
    optional: int | None = config.setting("left out: no rules", default=None, ge=1)


def test_declared_rules_are_checked_each_under_its_key_path() -> None:
    assert config._check_settings(Declared(), "demo") == []
    bad = Declared(
        seconds=11,
        rate=0,
        most=12,
        days=30,
        mode="d",
        names=("ID", "id"),
        phrase="short\n",
    )
    assert config._check_settings(bad, "demo") == [
        "demo.seconds: must be 1-10",
        "demo.rate: must be above 0, at most 100",
        "demo.most: must be between 0 and demo.seconds",
        "demo.days: must be 0 (keep for ever) or 31-3650",
        "demo.mode: must be one of ('a', 'b', 'c')",
        "demo.names[1]: must be an ISO 3166 alpha-2 code",
        "demo.phrase: must be one line of printable text (long)",  # the first broken rule
    ]
    assert config._check_settings(Declared(names=()), "demo") == ["demo.names: must not be empty"]
    assert "x" * 16 not in repr(Declared())


def test_declared_sections_stay_frozen_dataclasses_built_by_keyword() -> None:
    cfg = parse(BASE)
    assert (
        dataclasses.replace(cfg, calls=config.CallsConfig(ring_seconds=5)).calls.ring_seconds == 5
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.calls.ring_seconds = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.HttpConfig(port=8080, colour="blue")  # type: ignore[call-arg]
    # Keyword-only: the required sections come where the file has them, not first.
    assert [f.name for f in dataclasses.fields(config.Config)][:4] == [
        "http",
        "database",
        "asterisk",
        "pools",
    ]


# -- pools of their own trunks, pool health, the conversion watch, alerts ------------


def test_a_pool_dials_through_the_nodes_channel_with_weight_1_unless_told() -> None:
    (pool,) = parse(BASE).pools
    assert (pool.channel, pool.weight) == (None, 1)
    raw = with_pool(prefix="+6221500", channel="PJSIP/{number}@trunk-b", weight=3)
    (pool,) = parse(raw).pools
    assert (pool.channel, pool.weight) == ("PJSIP/{number}@trunk-b", 3)
    # Written empty: the node's channel, as a node's own empty channel is.
    assert parse(with_pool(prefix="+6221500", channel="")).pools[0].channel is None


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (
            "Local/{number}@otp",
            ["pools[0].channel: must be a PJSIP channel, PJSIP/{number}@<endpoint>"],
        ),
        ("PJSIP/otp-trunk", ["pools[0].channel: must contain {number}"]),
        (
            "SIP/trunk",
            [
                "pools[0].channel: must contain {number}",
                "pools[0].channel: must be a PJSIP channel, PJSIP/{number}@<endpoint>",
            ],
        ),
        (
            "PJSIP/{number}@b\r\nAction: Logoff",
            ["pools[0].channel: must be one line of printable text"],
        ),
    ],
)
def test_a_pools_channel_must_be_pjsip_with_the_number(channel: str, expected: list[str]) -> None:
    assert problems(with_pool(prefix="+6221500", channel=channel)) == expected


def test_each_pools_channel_is_named_by_its_index() -> None:
    raw = merged(
        BASE,
        {
            "pools": [
                {"name": "a", "prefix": "+6221500", "channel": "PJSIP/{number}@a"},
                {"name": "b", "prefix": "+6221600", "channel": "Local/{number}@b"},
            ]
        },
    )
    assert paths(problems(raw)) == {"pools[1].channel"}


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        (1, None),
        (1000, None),
        (0, "pools[0].weight: must be 1-1000"),
        (-1, "pools[0].weight: must be 1-1000"),
        (1001, "pools[0].weight: must be 1-1000"),
        (1.5, "pools[0].weight: must be an integer, not a number"),
        ("3", "pools[0].weight: must be an integer, not a string"),
        (True, "pools[0].weight: must be an integer, not true or false"),
    ],
)
def test_a_pools_weight_is_bounded(weight: object, expected: str | None) -> None:
    raw = with_pool(prefix="+6221500", weight=weight)
    if expected is None:
        assert parse(raw).pools[0].weight == weight
    else:
        assert problems(raw) == [expected]


def test_caller_health_and_conversion_defaults() -> None:
    cfg = parse(BASE)
    assert cfg.caller_health == config.CallerHealthConfig(
        min_calls=10, probe_seconds=300, recent_calls=100
    )
    assert cfg.conversion == config.ConversionConfig(
        mode="report",
        min_rate=0.2,
        min_verifications=50,
        window_seconds=3600,
        grace_seconds=60,
        block_seconds=3600,
    )
    assert cfg.alerts.url is None


def test_caller_health_and_conversion_keys_are_bounded() -> None:
    raw = merged(
        BASE,
        {
            "caller_health": {"min_calls": 0, "probe_seconds": 4, "recent_calls": 9},
            "conversion": {
                "mode": "refuse",
                "min_rate": 0,
                "min_verifications": 0,
                "window_seconds": 59,
                "grace_seconds": 3601,
                "block_seconds": 59,
            },
        },
    )
    assert problems(raw) == [
        "caller_health.min_calls: must be 1-1000",
        "caller_health.probe_seconds: must be 5-86400",
        "caller_health.recent_calls: must be 10-1000",
        "conversion.mode: must be one of ('report', 'block')",
        "conversion.min_rate: must be above 0, at most 1",
        "conversion.min_verifications: must be 1-1000000",
        "conversion.window_seconds: must be 60-604800",
        "conversion.grace_seconds: must be 0-3600",
        "conversion.block_seconds: must be 60-2592000",
    ]
    raw = merged(BASE, {"conversion": {"mode": "block", "min_rate": 1, "grace_seconds": 0}})
    assert (parse(raw).conversion.mode, parse(raw).conversion.min_rate) == ("block", 1.0)


ALERTS_URL = "https://ops.example.com/otp-alerts"


@pytest.mark.parametrize("url", [ALERTS_URL, "http://10.0.0.5:8080/alerts"])
def test_alerts_url_is_accepted_with_a_webhook_secret(url: str) -> None:
    raw = merged(BASE, {"alerts": {"url": url}, "webhooks": {"secret": webhook_secret(32)}})
    assert parse(raw).alerts.url == url


def test_alerts_url_needs_the_webhook_secret_to_sign_with() -> None:
    found = problems(merged(BASE, {"alerts": {"url": ALERTS_URL}}))
    assert found == ["alerts.url: needs webhooks.secret: alerts are signed like webhooks"]


@pytest.mark.parametrize(
    "url", ["ftp://ops.example.com/alerts", "ops.example.com/alerts", "https:///alerts"]
)
def test_alerts_url_must_be_http_or_https_with_a_host(url: str) -> None:
    raw = merged(BASE, {"alerts": {"url": url}, "webhooks": {"secret": webhook_secret(32)}})
    assert problems(raw) == ["alerts.url: must be an http or https URL"]


def test_a_wrong_alerts_url_without_a_secret_names_both_problems() -> None:
    assert problems(merged(BASE, {"alerts": {"url": "ftp://ops.example.com"}})) == [
        "alerts.url: must be an http or https URL",
        "alerts.url: needs webhooks.secret: alerts are signed like webhooks",
    ]


def test_an_alerts_url_with_a_line_break_is_refused() -> None:
    raw = merged(
        BASE,
        {"alerts": {"url": ALERTS_URL + "\nX: y"}, "webhooks": {"secret": webhook_secret(32)}},
    )
    assert "alerts.url: must be one line of printable text" in problems(raw)
