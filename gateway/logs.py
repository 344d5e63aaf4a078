"""Log lines: JSON for machines (stderr not a terminal), readable text for people.

A line about a call carries its ids as fields (`extra=call_ids(...)`): in JSON they are
members, in text a trailing `[verification_id=… call_id=…]`. No line holds a code, a
full caller ID or a secret: the code lives only in the caller ID, which is never logged.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

CONTEXT = ("verification_id", "call_id")


def call_ids(verification_id: str | None = None, call_id: str | None = None) -> dict[str, str]:
    """The `extra` of a line about a verification or a call."""
    ids = {"verification_id": verification_id, "call_id": call_id}
    return {k: v for k, v in ids.items() if v}


class TextFormatter(logging.Formatter):
    """`time level logger: message [ids]`, for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT if hasattr(record, k))
        return f"{line} [{ids}]" if ids else line


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, ids."""
    return JsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def setup(format: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send the root logger's lines to `stream` (stderr) in the chosen format."""
    stream = stream or sys.stderr
    as_json = format == "json" or (format == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter() if as_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # No line shows where it was logged from, nor the thread or process: skip looking
    # them up for every record (the logging HOWTO's "Optimization"; a fifth of a
    # call's log line, make bench).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
