"""The configuration reference and config.example.yaml: written from the declaration in
gateway/config.py, and never out of step with it."""

from __future__ import annotations

import dataclasses
import shutil
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import config, configdoc

REPO = Path(__file__).resolve().parent.parent
ENV = {"AMI_SECRET": "ami-secret-for-doc-tests", "OTP_CODE_SECRET": "code-secret-for-doc-tests"}
FIX = f"run `{configdoc.COMMAND}` and commit the result"


def declared(cls: Any = config.Config, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(key path, field) of every key below `cls`, a list's items as `[]`; the keys of
    an inline value (a window's count and seconds) are its list's."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        path = f"{prefix}.{spec.name}" if prefix else spec.name
        yield path, spec
        kind = hints[spec.name]
        args = [a for a in typing.get_args(kind) if a is not type(None) and a is not Ellipsis]
        below = kind if dataclasses.is_dataclass(kind) else (args[0] if args else None)
        if not dataclasses.is_dataclass(below) or getattr(below, "inline", False):
            continue
        yield from declared(below, path if below is kind else f"{path}[]")


def default(spec: Any) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def test_the_reference_in_the_docs_is_the_declarations() -> None:
    text = (REPO / configdoc.REFERENCE).read_text(encoding="utf-8")
    assert text == configdoc.with_reference(text), (
        f"{configdoc.REFERENCE}: the reference between the config-reference markers differs "
        f"from the declaration in gateway/config.py: {FIX}"
    )


def test_the_example_config_is_the_declarations() -> None:
    text = (REPO / configdoc.EXAMPLE).read_text(encoding="utf-8")
    assert text == configdoc.example_yaml(), (
        f"{configdoc.EXAMPLE} differs from the declaration in gateway/config.py: {FIX}"
    )


def test_every_key_is_declared_with_setting() -> None:
    for path, spec in declared():
        about = config.setting_of(spec)  # raises for a field declared without setting()
        assert about.doc and not about.doc.endswith("."), path
        assert spec.repr is not about.secret, f"{path}: a secret must stay out of repr()"


def test_every_key_is_in_the_reference_and_the_example_but_an_older_spelling() -> None:
    reference, example = configdoc.reference_markdown(), configdoc.example_yaml()
    for path, spec in declared():
        section = "." not in path and path not in ("pools", "test_numbers")
        assert (f"### `{path}`" if section else f"| `{path}` |") in reference, path
        about = config.setting_of(spec)
        # A node's keys are in the commented example of asterisk.nodes as far as it goes.
        if about.in_example and not path.startswith("asterisk.nodes[]"):
            assert f"{spec.name}:" in example, path
        assert about.in_example or path == "database.path", path


def test_the_example_is_valid_and_every_key_in_it_is_at_its_default() -> None:
    cfg = config.load(REPO / configdoc.EXAMPLE, ENV)
    assert cfg.asterisk == config.AsteriskConfig(secret=ENV["AMI_SECRET"])
    assert cfg.security == config.SecurityConfig(code_secret=ENV["OTP_CODE_SECRET"])
    assert (
        cfg.pools
        == config.setting_of(
            next(f for f in dataclasses.fields(config.Config) if f.name == "pools")
        ).example
    )
    for spec in dataclasses.fields(config.Config):
        if spec.name not in ("asterisk", "pools", "security"):
            assert getattr(cfg, spec.name) == default(spec), spec.name


def test_the_example_takes_its_secrets_from_the_environment() -> None:
    example = configdoc.example_yaml()
    assert 'secret: "${AMI_SECRET}"' in example
    assert 'code_secret: "${OTP_CODE_SECRET}"' in example
    assert 'secret: "${OTP_WEBHOOK_SECRET:-}"' in example


def test_a_key_empty_by_default_shows_its_example_commented_out() -> None:
    example = configdoc.example_yaml()
    assert "  # nodes:" in example
    assert '#   - {name: b, host: 10.0.0.12, secret: "${AMI_SECRET_B}", max_per_second: 5}' in (
        example
    )
    assert "  # allowed_networks: [127.0.0.1/32, 10.20.0.0/16]" in example
    assert '\n# test_numbers: {"+6281200000001": "1234"}\n' in example


def test_the_reference_states_defaults_rules_and_meanings() -> None:
    reference = configdoc.reference_markdown()
    for row in (
        "| `http.port` | `8080` | 1-65535 | listen port |",
        "| `pools[].code_length` | `4` | 4-8 | how many trailing digits are the code |",
        "| `asterisk.nodes[].max_concurrent` | `calls.max_concurrent` | 1-100000 |",
        "| `calls.ring_seconds` | `8` | between 1 and `calls.max_ring_seconds` |",
        "| `database.retention_days` | `90` | 0 (keep for ever) or 31-3650 |",
        "| `asterisk.secret` | required | not empty; one line |",
        "| `logging.level` | `info` | `debug`, `info`, `warning` or `error` |",
        "| `limits.per_phone` | `[{count: 3, seconds: 600}, {count: 10, seconds: 86400}]` |",
        "| `numbers.early_media_is_alerting` | `{regions: [], carriers: []}` |",
    ):
        assert row in reference, row
    assert "A secret: take it from the environment, as `${AMI_SECRET}`" in reference


def test_write_rewrites_what_differs_and_then_nothing(tmp_path: Path) -> None:
    doc = tmp_path / configdoc.REFERENCE
    doc.parent.mkdir(parents=True)
    shutil.copy(REPO / configdoc.REFERENCE, doc)
    text = doc.read_text()
    doc.write_text(text.replace("| `http.port` | `8080` |", "| `http.port` | `80` |"))
    assert configdoc.stale(tmp_path) == [doc, tmp_path / configdoc.EXAMPLE]
    assert configdoc.write(tmp_path) == [doc, tmp_path / configdoc.EXAMPLE]
    assert doc.read_text() == text
    assert (tmp_path / configdoc.EXAMPLE).read_text() == configdoc.example_yaml()
    assert configdoc.stale(tmp_path) == []
    assert configdoc.write(tmp_path) == []


def test_a_page_without_the_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="markers"):
        configdoc.with_reference("# Configuration\n\nno markers here\n")
