"""Log lines: JSON off a terminal, readable text on one, call ids on lines about calls."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_auto_writes_json_lines_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    logs.setup("auto", "info", out)
    log = logging.getLogger("gateway.dialer")
    log.info("call %s: %s", "c1", "delivered", extra=logs.call_ids("vrf_1", "c1"))
    log.debug("not at info level")
    [line] = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "call c1: delivered"
    assert (record["level"], record["logger"]) == ("INFO", "gateway.dialer")
    assert (record["verification_id"], record["call_id"]) == ("vrf_1", "c1")
    assert record["time"].endswith("+00:00")


def test_auto_writes_readable_text_on_a_terminal() -> None:
    out = Terminal()
    logs.setup("auto", "info", out)
    logging.getLogger("gateway.dialer").warning("call c2: lost", extra=logs.call_ids(call_id="c2"))
    line = out.getvalue().rstrip("\n")
    assert " WARNING gateway.dialer: call c2: lost [call_id=c2]" in line
    assert "{" not in line


def test_format_can_be_forced_either_way() -> None:
    out = Terminal()
    logs.setup("json", "warning", out)
    logging.getLogger("x").warning("w")
    assert json.loads(out.getvalue())["message"] == "w"
    plain = io.StringIO()
    logs.setup("text", "info", plain)
    logging.getLogger("x").info("i")
    assert plain.getvalue().rstrip().endswith(" INFO x: i")


def test_an_exception_is_one_json_line() -> None:
    out = io.StringIO()
    logs.setup("json", "info", out)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed")
    [line] = out.getvalue().splitlines()
    assert "ValueError: boom" in json.loads(line)["exc_info"]
