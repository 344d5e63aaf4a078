"""Offline check of a file of numbers: validity, type, region and carrier, as a CSV report.

No call is made and no database is opened: each number goes through `phones.parse`, the
same code the HTTP API uses, so a number reads here exactly as the API would read it.
"""

from __future__ import annotations

import csv
import io
import itertools
import multiprocessing
import os
import re
import signal
import stat
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from typing import TextIO

import phonenumbers
from tqdm import tqdm

from gateway import phones
from gateway.errors import InvalidPhone

# The header cell that names the column of numbers; without it the first column is read.
PHONE_HEADER = "phone"
# A physical line is cut here and the rest of it dropped, so junk without line breaks
# cannot fill memory. Below csv's default field_size_limit (131072), so one line alone
# never trips it; a quoted cell spanning many lines still can, and reads as one bad row.
MAX_LINE_CHARS = 65_536
# The report echoes at most this much of an input cell; numbers are far shorter
# (phones.MAX_INPUT_LENGTH), so only junk is cut.
MAX_ECHOED_INPUT = 100
# Numbers handed to a worker at once: large enough that pickling is cheap beside the
# checking, small enough that the progress bar moves smoothly.
BATCH_SIZE = 2_000
# Batches queued per worker: keeps the workers busy while memory stays bounded.
BATCHES_IN_FLIGHT_PER_WORKER = 2
# Each worker loads its own copy of phonenumbers' metadata, and past a few workers the
# parent's CSV reading and writing is the bottleneck.
MAX_WORKERS = 4
# What makes a spreadsheet read a cell as a formula (OWASP's list), with the full-width
# forms some read the same way.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_E164_LIKE = re.compile(r"\+[0-9]+")


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One report row: what the gateway makes of one input number."""

    input: str
    e164: str | None
    valid: bool
    type: str | None
    reason: str | None
    carrier: str | None
    region: str | None

    def row(self) -> list[str]:
        """The report's cells, in REPORT_COLUMNS order, safe to open in a spreadsheet."""
        cells = [
            self.input,
            self.e164 or "",
            "true" if self.valid else "false",
            self.type or "",
            self.reason or "",
            self.carrier or "",
            self.region or "",
        ]
        return [spreadsheet_safe(cell) for cell in cells]


def spreadsheet_safe(cell: str) -> str:
    """`cell`, with a leading ' if a spreadsheet would read it as a formula (OWASP, CSV
    injection): it starts with = + - @, a tab or a carriage return. A + and digits
    alone (an E.164 number) is left as it is: no formula can be made of it."""
    if cell.startswith(FORMULA_STARTS) and not _E164_LIKE.fullmatch(cell):
        return "'" + cell
    return cell


REPORT_COLUMNS = tuple(f.name for f in fields(CheckResult))
# CheckResult's fields in order, as a worker process sends them back.
_Fields = tuple[str, str | None, bool, str | None, str | None, str | None, str | None]


@dataclass(slots=True)
class Summary:
    """Counts over a whole report."""

    total: int = 0
    valid: int = 0
    invalid_by_reason: Counter[str] = field(default_factory=Counter)
    valid_by_type: Counter[str] = field(default_factory=Counter)

    @property
    def invalid(self) -> int:
        return self.total - self.valid

    def add(self, result: CheckResult) -> None:
        self.total += 1
        if result.valid:
            self.valid += 1
            self.valid_by_type[result.type or "unknown"] += 1
        else:
            self.invalid_by_reason[result.reason or "not_a_number"] += 1

    def describe(self) -> str:
        """One paragraph for a person: totals, invalid by reason, valid by type."""
        noun = "number" if self.total == 1 else "numbers"
        text = f"Checked {self.total:,} {noun}: {self.valid:,} valid"
        if self.valid_by_type:
            text += f" ({_breakdown(self.valid_by_type)})"
        text += f", {self.invalid:,} invalid"
        if self.invalid_by_reason:
            text += f" ({_breakdown(self.invalid_by_reason)})"
        return text + "."


def check_number(raw: str, default_region: str) -> CheckResult:
    """Check one number; never raises."""
    echoed = raw if len(raw) <= MAX_ECHOED_INPUT else raw[:MAX_ECHOED_INPUT] + "…"
    try:
        phone = phones.parse(raw, default_region)
    except InvalidPhone as exc:
        reason = str(exc.extra.get("reason") or "not_a_number")
        return CheckResult(echoed, None, False, None, reason, None, None)
    return CheckResult(echoed, phone.e164, True, phone.type, None, phone.carrier, phone.region)


def check_rows(rows: Iterable[str], default_region: str) -> Iterator[CheckResult]:
    """Check each number in order, in this process."""
    for raw in rows:
        yield check_number(raw, default_region)


def check_file(
    source: TextIO,
    report: TextIO,
    default_region: str,
    *,
    workers: int = 1,
    on_progress: Callable[[int], object] | None = None,
) -> Summary:
    """Check every number in the CSV `source` and write the report to `report`, in order.

    `source` should be opened with newline="" (the csv module's rule). Numbers are read
    from the column headed "phone" if the first row has one, else from the first column;
    blank rows are skipped; a row the csv module cannot read is reported as not_a_number.
    With `workers` > 1 a process pool (spawned, so the program's __main__ must keep the
    `if __name__ == "__main__"` idiom) does the checking. `on_progress` is told how many
    more input lines are done, once per batch.
    """
    writer = csv.writer(report)
    writer.writerow(REPORT_COLUMNS)
    summary = Summary()
    lines_reported = 0
    column = _NumberColumn(source)
    for results, lines_read in _check_batches(_batches(column), default_region, workers):
        for result in results:
            summary.add(result)
        writer.writerows(result.row() for result in results)
        if on_progress is not None:
            on_progress(lines_read - lines_reported)
        lines_reported = lines_read
    if on_progress is not None and column.lines_read > lines_reported:
        on_progress(column.lines_read - lines_reported)  # blank lines after the last number
    return summary


def main(path: str, output: str | None, default_region: str) -> int:
    """`numbers check`: report on `path` ("-" for stdin) to `output` (None or "-" for stdout).

    Prints a summary to stderr and returns 0; returns 1 with a one-line reason, never a
    traceback, when a file cannot be read or written or the region is unknown.
    """
    region = default_region.upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        print(f"unknown region {default_region!r}: use a code such as ID", file=sys.stderr)
        return 1
    try:
        with ExitStack() as files:
            try:
                source = files.enter_context(_open_source(path))
            except OSError as exc:
                print(f"cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            try:
                report = files.enter_context(_open_report(output))
            except OSError as exc:
                print(f"cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            advance = files.enter_context(_progress_bar(path, show=sys.stderr.isatty()))
            summary = check_file(source, report, region, workers=_workers(), on_progress=advance)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`); point stdout at /dev/null so the
        # interpreter's last flush does not print a traceback either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"numbers check stopped: {exc}", file=sys.stderr)
        return 1
    print(summary.describe(), file=sys.stderr)
    return 0


# -- reading -------------------------------------------------------------------


def _bounded_lines(source: TextIO) -> Iterator[str]:
    """Physical lines of `source`, each cut to MAX_LINE_CHARS."""
    while line := source.readline(MAX_LINE_CHARS):
        if len(line) == MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            while (rest := source.readline(MAX_LINE_CHARS)) and not rest.endswith(("\n", "\r")):
                pass
            line += "\n"
        yield line


class _NumberColumn:
    """The number cell of each non-blank row, and how many physical lines are read so far."""

    def __init__(self, source: TextIO) -> None:
        self._reader = csv.reader(_bounded_lines(source))

    @property
    def lines_read(self) -> int:
        return self._reader.line_num

    def __iter__(self) -> Iterator[str]:
        column: int | None = None
        while True:
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error:  # a cell past csv's field_size_limit
                yield ""
                continue
            if not any(cell.strip() for cell in row):
                continue
            if column is None:
                row[0] = row[0].removeprefix("\ufeff")  # a BOM the caller's decoding kept
                names = [cell.strip().lower() for cell in row]
                if PHONE_HEADER in names:
                    column = names.index(PHONE_HEADER)
                    continue
                column = 0
            yield row[column] if column < len(row) else ""


def _batches(column: _NumberColumn) -> Iterator[tuple[list[str], int]]:
    """Cells in lists of BATCH_SIZE, each with the lines read up to its last cell."""
    cells = iter(column)
    while batch := list(itertools.islice(cells, BATCH_SIZE)):
        yield batch, column.lines_read


# -- checking ------------------------------------------------------------------


def _check_batches(
    batches: Iterator[tuple[list[str], int]], default_region: str, workers: int
) -> Iterator[tuple[list[CheckResult], int]]:
    """Each batch's results, in input order, checked here or by a pool of `workers`."""
    first = list(itertools.islice(batches, 2))
    if workers <= 1 or len(first) < 2:
        # Starting a pool takes longer than checking a single batch.
        for cells, lines_read in itertools.chain(first, batches):
            yield list(check_rows(cells, default_region)), lines_read
        return
    # spawn, not fork: the parent may hold threads (the progress bar's monitor) that a
    # forked child would inherit half-way through.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_ignore_sigint) as pool:
        pending: deque[tuple[Future[list[_Fields]], int]] = deque()
        for cells, lines_read in itertools.chain(first, batches):
            pending.append((pool.submit(_check_batch, cells, default_region), lines_read))
            if len(pending) >= workers * BATCHES_IN_FLIGHT_PER_WORKER:
                future, done_lines = pending.popleft()
                yield [CheckResult(*values) for values in future.result()], done_lines
        while pending:
            future, done_lines = pending.popleft()
            yield [CheckResult(*values) for values in future.result()], done_lines


def _check_batch(cells: list[str], default_region: str) -> list[_Fields]:
    # Plain tuples cross the process boundary about six times faster than dataclasses.
    return [
        (r.input, r.e164, r.valid, r.type, r.reason, r.carrier, r.region)
        for r in check_rows(cells, default_region)
    ]


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; only the parent should act on it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _workers() -> int:
    return min(len(os.sched_getaffinity(0)), MAX_WORKERS)


# -- files and progress ----------------------------------------------------------


@contextmanager
def _open_source(path: str) -> Iterator[TextIO]:
    # utf-8-sig drops a BOM; "replace" turns binary junk into text that reads as not_a_number.
    if path == "-":
        stdin = io.TextIOWrapper(
            sys.stdin.buffer, encoding="utf-8-sig", errors="replace", newline=""
        )
        try:
            yield stdin
        finally:
            stdin.detach()  # leave sys.stdin open
        return
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as file:
        yield file


@contextmanager
def _open_report(output: str | None) -> Iterator[TextIO]:
    if output is None or output == "-":
        stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
        try:
            yield stdout
        finally:
            stdout.detach()  # flushes, and leaves sys.stdout open
        return
    with open(output, "w", encoding="utf-8", newline="") as file:
        yield file


@contextmanager
def _progress_bar(path: str, *, show: bool) -> Iterator[Callable[[int], object] | None]:
    """A bar on stderr advanced by input lines, or None when stderr is not a terminal."""
    if not show:
        yield None
        return
    with tqdm(total=_count_lines(path), unit=" lines", unit_scale=True, file=sys.stderr) as bar:
        yield bar.update


def _count_lines(path: str) -> int | None:
    """Physical lines in the file at `path`, for the progress bar's total; None for stdin."""
    if path == "-" or not stat.S_ISREG(os.stat(path).st_mode):
        return None  # a pipe can be read only once
    count = 0
    last = b"\n"
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _breakdown(counts: Counter[str]) -> str:
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{n:,} {name}" for name, n in ordered)
