"""The configuration reference and config.example.yaml, written from gateway/config.py.

Each key's default, rules and description are declared once, with setting() on its
field; this module only renders them: `reference_markdown()` is the Markdown between the
markers of docs/operator/configuration.md, `example_yaml()` the whole example file.
`python -m gateway config-reference --write` rewrites both.
"""

from __future__ import annotations

import json
import posixpath
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import MISSING, Field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config import Config, Setting, setting_of

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = Path("docs/operator/configuration.md")
EXAMPLE = Path("config.example.yaml")
START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
COMMAND = "python -m gateway config-reference --write"

COMMENT_AT = 27  # the column of a key's comment in the example, where the line allows
COMMENT_LAST = 44  # a line longer than this has its comment above it
WIDTH = 92  # the example's lines, comments wrapped to fit

_LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")
_LONE_MARK = re.compile(r" (?=[-_.:](?:[ ;,)]|$))")

EXAMPLE_HEADER = f"""\
# otp-gateway configuration: every key at its default, but for what is required. A key
# that is empty by default is commented out, with an example value.
# Secrets come from the environment with ${{NAME}} (or ${{NAME:-fallback}}).
# Check a file with: python -m gateway check-config --config FILE
#
# Written from gateway/config.py, where each key is declared, by
#   {COMMAND}
# Edit the declaration, not this file. docs/operator/configuration.md explains every key.
"""

REFERENCE_NOTE = (
    f"<!-- Written from the declaration in gateway/config.py by `{COMMAND}`: "
    "edit that, not this part. -->"
)


# -- the declaration, read ------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unoptional(kind: Any) -> Any:
    """`X | None` is X."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        (kind,) = [a for a in typing.get_args(kind) if a is not type(None)]
    return kind


def _item(kind: Any) -> Any:
    """The item type of `tuple[X, ...]`, else None."""
    return typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None


def _is_section(kind: Any) -> bool:
    """A dataclass written as a mapping of keys (Window, written inline, is a value)."""
    return isinstance(kind, type) and is_dataclass(kind) and not getattr(kind, "inline", False)


def _default(spec: Field[Any]) -> Any:
    if spec.default is not MISSING:
        return spec.default
    if spec.default_factory is not MISSING:
        return spec.default_factory()
    return MISSING


# -- values as YAML -------------------------------------------------------------------


def _scalar(value: Any) -> str:
    """A scalar as YAML reads it back, in a flow collection too: plain where that is the
    same value, else double-quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else str(value)
    text = str(value)
    try:
        plain = bool(text) and yaml.safe_load(f"[{text}]") == [text]
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _flow(value: Any, full: bool = False) -> str:
    """A value as inline YAML; a dataclass by the keys that are not at their default
    (every key if `full`)."""
    if is_dataclass(value) and not isinstance(value, type):
        keys = [
            f"{spec.name}: {_flow(getattr(value, spec.name), full)}"
            for spec in fields(value)
            if full or _default(spec) is MISSING or getattr(value, spec.name) != _default(spec)
        ]
        return "{" + ", ".join(keys) + "}"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_flow(v, full) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_flow(k)}: {_flow(v, full)}" for k, v in value.items()) + "}"
    return _scalar(value)


# -- what a key allows, its default, its meaning ------------------------------------------


def _either(choices: tuple[str, ...]) -> str:
    names = [f"`{c}`" for c in choices]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _allowed(about: Setting, kind: Any, owner: str, brief: bool = False) -> str:
    """The rules of a key as the reference states them: "1-65535", "not empty; one line".
    `brief` (the example's comments) leaves out "one line", and "not empty" for text."""
    each = "each " if _item(kind) is not None else ""
    parts = []
    if about.nonempty and not (brief and kind is str):
        parts.append("not empty")
    if about.one_line and not brief:
        parts.append("one line")
    if about.min_length:
        parts.append(f"at least {about.min_length} characters")
    if about.choices:
        parts.append(f"{each}{'one of ' if each else ''}{_either(about.choices)}")
    if about.pattern is not None:
        parts.append(f"{each}{about.pattern.what}")
    span = about.range_text(owner, lambda path: f"`{path}`")
    if span:
        parts.append(span)
    item = _item(kind)
    if isinstance(item, type) and is_dataclass(item) and not _is_section(item):
        rules = (
            f"`{spec.name}` {_allowed(setting_of(spec), _hints(item)[spec.name], '')}"
            for spec in fields(item)
        )
        parts.append("each " + ", ".join(rules))
    if about.also:
        parts.append(about.also)
    text = "; ".join(parts)
    return f"{text} ({about.hint})" if text and about.hint else text


def _default_text(spec: Field[Any], about: Setting) -> str:
    if about.inherits:
        return f"`{about.inherits}`"
    value = _default(spec)
    if value is MISSING:
        return "required"
    text = "none" if value is None else f"`{_flow(value, full=True)}`"
    return f"{text} ({about.empty})" if about.empty else text


def _meaning(about: Setting) -> str:
    parts = [about.doc, about.details]
    if about.example is not None:
        parts.append(f"For example `{_flow(about.example)}`")
    if about.secret:
        where = f", as `${{{about.env}}}`" if about.env else ""
        parts.append(f"A secret: take it from the environment{where}")
    return ". ".join(p for p in parts if p)


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else text + "."


# -- the reference --------------------------------------------------------------------


def _rows(spec: Field[Any], kind: Any, path: str, owner: str) -> Iterator[list[str]]:
    """The reference's row of a key, then those of the keys below it."""
    about = setting_of(spec)
    kind = _unoptional(kind)
    yield [f"`{path}`", _default_text(spec, about), _allowed(about, kind, owner), _meaning(about)]
    below = kind if _is_section(kind) else _item(kind)
    if _is_section(below):
        at = path if below is kind else f"{path}[]"
        hints = _hints(below)
        for sub in fields(below):
            yield from _rows(sub, hints[sub.name], f"{at}.{sub.name}", at)


def _table(rows: Iterator[list[str]]) -> list[str]:
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return lines


def reference_markdown() -> str:
    """The configuration reference: a heading per top-level key, a table of its keys."""
    lines = [REFERENCE_NOTE]
    hints = _hints(Config)
    for spec in fields(Config):
        kind = hints[spec.name]
        lines += ["", f"### `{spec.name}`", ""]
        if _is_section(kind):
            about = setting_of(spec)
            lines += [_sentence(_meaning(about)), ""]
            sub_hints = _hints(kind)
            lines += _table(
                row
                for sub in fields(kind)
                for row in _rows(sub, sub_hints[sub.name], f"{spec.name}.{sub.name}", spec.name)
            )
        else:
            lines += _table(_rows(spec, kind, spec.name, ""))
    return "\n".join(lines) + "\n"


# -- the example ----------------------------------------------------------------------


def _plain(text: str) -> str:
    """Markdown as a YAML comment reads: no backticks, a link as its text and the page
    it leads to, from the root of the repository."""

    def link(match: re.Match[str]) -> str:
        page = match.group(2).split("#", 1)[0] or REFERENCE.name
        return f"{match.group(1)} in {posixpath.normpath(REFERENCE.parent.as_posix() + '/' + page)}"

    return _LINK.sub(link, text).replace("`", "")


def _comment(about: Setting, kind: Any, owner: str, value: Any) -> str:
    """A key's comment in the example: its description, then what is required, what an
    empty value means and its rules in parentheses."""
    notes = []
    if value is MISSING:
        notes.append("required")
    if about.empty and (value is None or value in ("", (), {})):
        notes.append(f"empty: {about.empty}")
    allowed = _allowed(about, kind, owner, brief=True)
    if allowed:
        notes.append(allowed)
    text = about.doc + (f" ({'; '.join(notes)})" if notes else "")
    return _plain(text)


def _wrap(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width`, never before a lone - _ . or : (a list of
    characters, as in "letters, digits and - _ .")."""
    glued = _LONE_MARK.sub("\N{NO-BREAK SPACE}", text)
    lines = textwrap.wrap(glued, width, break_long_words=False, break_on_hyphens=False)
    return [line.replace("\N{NO-BREAK SPACE}", " ") for line in lines]


def _with_comment(line: str, comment: str, indent: int) -> list[str]:
    """`line` with `comment`: after it, at COMMENT_AT or just after a longer line,
    wrapped on the lines below; above it when the line is longer than COMMENT_LAST."""
    if not comment:
        return [line]
    at = max(COMMENT_AT, len(line) + 2)
    if at > COMMENT_LAST:  # set apart by a blank line, so it is not read as the last key's
        return ["", *_block_comment(comment, indent), line]
    first, *rest = (" " * at + "# " + text for text in _wrap(comment, WIDTH - at - 2))
    return [line.ljust(at) + first.lstrip(), *rest]


def _block_comment(text: str, indent: int = 0) -> list[str]:
    return [" " * indent + "# " + line for line in _wrap(_plain(text), WIDTH - indent - 2)]


def _key_lines(
    path: str, value: Any, kind: Any, indent: int, flow_items: bool = False
) -> list[str]:
    """`name: value` as block YAML at `indent`: a section as a mapping below it, a list
    of sections or of inline values as a block list (of flow mappings if `flow_items`)."""
    pad, name = " " * indent, path.rsplit(".", 1)[-1]
    item = _item(kind)
    if _is_section(kind):
        return [f"{pad}{name}:", *_mapping_lines(kind, value, indent + 2, path)]
    if item is not None and is_dataclass(item) and value:
        lines = [f"{pad}{name}:"]
        for entry in value:
            if _is_section(item) and not flow_items:
                body = _mapping_lines(item, entry, indent + 4, f"{path}[]")
                lines += [f"{pad}  - {body[0].lstrip()}", *body[1:]]
            else:
                lines.append(f"{pad}  - {_flow(entry)}")
        return lines
    return [f"{pad}{name}: {_flow(value)}"]


def _field_lines(spec: Field[Any], kind: Any, value: Any, indent: int, owner: str) -> list[str]:
    """One key of the example, with its comment: at its value, or its default; a
    required one from the environment or its example; an empty one with an example
    commented out."""
    about, path = setting_of(spec), f"{owner}.{spec.name}" if owner else spec.name
    kind = _unoptional(kind)
    if not about.in_example:
        return []
    if about.env:
        reference = f"${{{about.env}}}" if value is MISSING else f"${{{about.env}:-}}"
        lines = [f"{' ' * indent}{spec.name}: {_scalar(reference)}"]
    elif value is MISSING and _is_section(kind):
        lines = _key_lines(path, None, kind, indent)  # its keys at their defaults
    elif value is MISSING and about.example is not None:
        lines = _key_lines(path, about.example, kind, indent)
    elif value in (None, (), {}) and about.example is not None:
        shown = _key_lines(path, about.example, kind, indent, flow_items=True)
        lines = [line[:indent] + "# " + line[indent:] for line in shown]
    elif value is None:
        return []
    else:
        lines = _key_lines(path, value, kind, indent)
    if indent == 0:
        return lines  # a top-level key's comment is above it, with a blank line
    comment = _comment(about, kind, owner, value)
    return _with_comment(lines[0], comment, indent) + lines[1:]


def _mapping_lines(cls: Any, obj: Any, indent: int, path: str) -> list[str]:
    """The keys of `obj` (an instance of `cls` at `path`), or of `cls` at its defaults."""
    hints = _hints(cls)
    lines = []
    for spec in fields(cls):
        value = _default(spec) if obj is None else getattr(obj, spec.name)
        lines += _field_lines(spec, hints[spec.name], value, indent, path)
    return lines


def example_yaml() -> str:
    """config.example.yaml: every top-level key under a comment that describes it."""
    lines = EXAMPLE_HEADER.splitlines()
    hints = _hints(Config)
    for spec in fields(Config):
        kind, about = hints[spec.name], setting_of(spec)
        if _is_section(kind):
            head = about.doc
        else:
            value = _default(spec)
            head = _comment(about, kind, "", value)
        lines += ["", *_block_comment(_sentence(head))]
        lines += _field_lines(spec, kind, _default(spec), 0, "")
    return "\n".join(lines) + "\n"


# -- the files ------------------------------------------------------------------------


def with_reference(text: str) -> str:
    """`text` (docs/operator/configuration.md) with the reference between its markers."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{REFERENCE}: the markers {START} and {END} are missing")
    return text[: start + len(START)] + "\n" + reference_markdown() + "\n" + text[end:]


def generated(root: Path = ROOT) -> dict[Path, str]:
    """Each generated file under `root` with the text it should have."""
    return {
        root / REFERENCE: with_reference((root / REFERENCE).read_text(encoding="utf-8")),
        root / EXAMPLE: example_yaml(),
    }


def stale(root: Path = ROOT) -> list[Path]:
    """The generated files that differ from the declaration."""
    return [
        path
        for path, text in generated(root).items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]


def write(root: Path = ROOT) -> list[Path]:
    """Rewrite the generated files that differ; return them."""
    changed = stale(root)
    texts = generated(root)
    for path in changed:
        path.write_text(texts[path], encoding="utf-8")
    return changed
