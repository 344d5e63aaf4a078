"""The SIPp far-end simulators on their own, driven by SIPp probe UACs and by raw UDP."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import phone_number
from tests.farend import (
    FIELD_PORT,
    FIELD_SCENARIO,
    ROUTES_PORT,
    ROUTES_SCENARIO,
    SCENARIO,
    VOICE_PORT,
    VOICE_SCENARIO,
    FarEnd,
    InviteRecord,
    is_live_sipp,
    routes_pattern,
)

HOST = "127.0.0.1"
PROBE = Path(__file__).resolve().parent / "sipp" / "uac_probe.xml"
# Waits out the field far end's delays before it cancels (7 s, 2.5 s after a 183, 1 s after a 180).
PATIENT_PROBE = Path(__file__).resolve().parent / "sipp" / "uac_patient_probe.xml"
FAREND_PY = Path(__file__).resolve().parent / "farend.py"
FROM_PREFIX = "62215009"
# Every behaviour digit once: (Request-URI user, From user).
PROBE_CALLS = [(f"6281990000{d}", f"{FROM_PREFIX}{d:03d}") for d in range(10)]
# What the far end must have sent for each last digit, in order.
EXPECTED_RESPONSES = {
    0: [100, 180, 487],
    1: [183, 487],
    2: [180, 200],
    3: [486],
    4: [404],
    5: [603],
    6: [503],
    7: [484],
    8: [480],
    9: [100, 487],
}


def free_udp_port() -> int:
    """A currently free UDP port on 127.0.0.1 (the dev far end owns 5070)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start_probe(
    port: int, calls: list[tuple[str, str]], workdir: Path, probe: Path = PROBE
) -> subprocess.Popen[bytes]:
    """Start placing `calls` with a SIPp probe UAC at the far end on `port`."""
    sipp = shutil.which("sipp")
    assert sipp is not None, "sipp is not installed (apt-get install sip-tester)"
    workdir.mkdir(parents=True, exist_ok=True)
    injection = workdir / "calls.csv"
    injection.write_text("SEQUENTIAL\n" + "".join(f"{to};{frm};\n" for to, frm in calls))
    args = [
        sipp,
        "-sf", str(probe),
        "-inf", str(injection),
        f"{HOST}:{port}",
        # An explicit port: without -p SIPp takes the first free one from 5060 up,
        # which may be a dev far end's 5070 or 5071 while it is down.
        "-i", HOST, "-p", str(free_udp_port()), "-bind_local", "-mi", HOST, "-ci", HOST,
        "-nostdin",
        "-m", str(len(calls)), "-r", "100",
        "-timeout", "15s", "-timeout_error",
        "-trace_err", "-error_file", str(workdir / "probe-errors.log"),
    ]  # fmt: skip
    with (workdir / "probe.out").open("wb") as out:
        return subprocess.Popen(
            args, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )


def finish_probe(probe: subprocess.Popen[bytes], workdir: Path) -> None:
    """Wait for a probe from start_probe(); fail unless all its calls succeeded."""
    try:
        returncode = probe.wait(timeout=30)
    except subprocess.TimeoutExpired:
        probe.kill()
        probe.wait()
        raise
    if returncode != 0:
        out = (workdir / "probe.out").read_text(errors="replace")
        errors = workdir / "probe-errors.log"
        log = errors.read_text(errors="replace") if errors.exists() else ""
        pytest.fail(f"probe UAC failed ({returncode}):\n{out[-3000:]}\n{log}")


def run_probe(port: int, calls: list[tuple[str, str]], workdir: Path, probe: Path = PROBE) -> None:
    """Place `calls` with a SIPp probe UAC at the far end on `port`; fail unless all succeed."""
    finish_probe(start_probe(port, calls, workdir, probe), workdir)


@pytest.fixture(scope="module")
def far(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarEnd]:
    """A private far end on a free port and a temporary workdir, stopped afterwards."""
    far = FarEnd(tmp_path_factory.mktemp("farend"), host=HOST, port=free_udp_port())
    yield from private(far, "far end")


def private(far: FarEnd, name: str) -> Iterator[FarEnd]:
    """Start `far`, hand it out, then stop it and check that it is gone."""
    try:
        far.start()
    except RuntimeError as exc:
        pytest.fail(f"{name} did not start: {exc}", pytrace=False)
    yield far
    far.stop()
    assert not far.running()


@pytest.fixture(scope="module")
def probed(far: FarEnd, tmp_path_factory: pytest.TempPathFactory) -> dict[str, InviteRecord]:
    """One probe call per behaviour digit, settled; records keyed by Request-URI user."""
    run_probe(far.port, PROBE_CALLS, tmp_path_factory.mktemp("probe"))
    users = {to for to, _ in PROBE_CALLS}
    records = far.wait_for(
        lambda rs: {r.request_user for r in rs if r.ended_at is not None} >= users, timeout=2
    )
    return {r.request_user: r for r in records if r.request_user in users}


@pytest.mark.parametrize("digit", range(10))
def test_behaviour_by_last_digit(probed: dict[str, InviteRecord], digit: int) -> None:
    to, frm = PROBE_CALLS[digit]
    record = probed[to]
    assert record.from_user == frm
    assert [code for code, _ in record.responses] == EXPECTED_RESPONSES[digit]
    assert record.final_code == EXPECTED_RESPONSES[digit][-1]
    assert record.acked_at is not None and record.ended_at is not None
    assert record.timeout is None and record.bye_sent_at is None
    if digit in (0, 1, 9):
        assert record.canceled_at is not None
        # The probe cancels 1.5 s after the last provisional response.
        assert 1.4 <= record.canceled_at - record.invited_at <= 2.5
    else:
        assert record.canceled_at is None
    if digit == 2:
        ringing = record.sent_at(180)
        assert ringing is not None and record.answered_at is not None
        assert 0.45 <= record.answered_at - ringing <= 0.8
        assert record.bye_at is not None and record.bye_at >= record.answered_at
    else:
        assert record.answered_at is None and record.bye_at is None


def test_times_are_wall_clock(probed: dict[str, InviteRecord]) -> None:
    for record in probed.values():
        assert abs(record.invited_at - time.time()) < 30
        assert all(record.invited_at <= at for _, at in record.responses)


def sip_request(method: str, user: str, port: int, local_port: int, call_id: str, to: str) -> bytes:
    """A minimal in-transaction request from 127.0.0.1:local_port (CSeq 1)."""
    return (
        f"{method} sip:{user}@{HOST}:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {HOST}:{local_port};branch=z9hG4bK-{call_id}\r\n"
        f'From: "Raw" <sip:{FROM_PREFIX}777@{HOST}>;tag=raw\r\n'
        f"{to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: 1 {method}\r\n"
        f"Contact: <sip:raw@{HOST}:{local_port}>\r\n"
        "Max-Forwards: 70\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def has_call(call_id: str) -> Callable[[list[InviteRecord]], bool]:
    """A wait_for predicate: an INVITE with this Call-ID was recorded."""
    return lambda records: any(r.call_id == call_id for r in records)


def test_records_are_readable_within_100_ms(far: FarEnd) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(2)
        local_port = sock.getsockname()[1]
        for i in range(5):
            user, call_id = f"628199100{i}3", f"latency-{i}-{os.getpid()}"
            invite = sip_request(
                "INVITE", user, far.port, local_port, call_id, f"To: <sip:{user}@{HOST}>"
            )
            sent = time.time()
            sock.sendto(invite, (HOST, far.port))
            far.wait_for(has_call(call_id), timeout=0.1)
            response = sock.recv(65535).decode()
            assert response.startswith("SIP/2.0 486 ")
            to = next(h for h in response.split("\r\n") if h.startswith("To:"))
            ack = sip_request("ACK", user, far.port, local_port, call_id, to)
            sock.sendto(ack, (HOST, far.port))
            [record] = [r for r in far.records() if r.call_id == call_id]
            assert record.from_user == f"{FROM_PREFIX}777"
            assert sent - 0.01 <= record.invited_at <= time.time()
        far.wait_for(
            lambda rs: all(r.ended_at for r in rs if r.call_id.startswith("latency-")), timeout=1
        )


def test_wait_for_timeout_shows_the_records(far: FarEnd) -> None:
    with pytest.raises(AssertionError, match="condition not met"):
        far.wait_for(lambda rs: False, timeout=0.05)


def test_start_fails_clearly_when_the_port_is_busy(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind((HOST, 0))
        far = FarEnd(tmp_path, host=HOST, port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="already in use"):
            far.start()
    assert not far.running()
    far.stop()  # idempotent when nothing runs


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run tests/farend.py like the Makefile does."""
    return subprocess.run(
        [sys.executable, str(FAREND_PY), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cli_up_down_are_idempotent_and_outlive_the_caller(tmp_path: Path) -> None:
    workdir, port = tmp_path / "cli", str(free_udp_port())
    try:
        assert cli("status", "--workdir", str(workdir)).returncode == 1
        up = cli("up", "--workdir", str(workdir), "--port", port)
        assert up.returncode == 0, up.stderr
        pid = int((workdir / "sipp.pid").read_text())
        # The CLI process has exited; its sipp keeps running in its own session.
        assert is_live_sipp(pid)
        assert os.getsid(pid) == pid
        again = cli("up", "--workdir", str(workdir), "--port", port)
        assert again.returncode == 0 and "already running" in again.stdout
        assert int((workdir / "sipp.pid").read_text()) == pid
        assert cli("status", "--workdir", str(workdir)).returncode == 0

        run_probe(int(port), [("6281992222223", f"{FROM_PREFIX}123")], tmp_path / "probe")
        show = cli("show", "--workdir", str(workdir))
        assert "to=6281992222223" in show.stdout and f"from={FROM_PREFIX}123" in show.stdout

        assert cli("down", "--workdir", str(workdir)).returncode == 0
        assert not is_live_sipp(pid)
        assert not (workdir / "sipp.pid").exists()
        down = cli("down", "--workdir", str(workdir))
        assert down.returncode == 0 and "not running" in down.stdout
        assert cli("status", "--workdir", str(workdir)).returncode == 1
    finally:
        FarEnd(workdir).stop()


def test_stray_options_is_answered_and_scenario_is_the_committed_one(far: FarEnd) -> None:
    assert str(SCENARIO) in Path(f"/proc/{far.pid()}/cmdline").read_text()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(2)
        local_port = sock.getsockname()[1]
        options = sip_request(
            "OPTIONS", "ping", far.port, local_port, f"opt-{os.getpid()}", f"To: <sip:{HOST}>"
        )
        sock.sendto(options, (HOST, far.port))
        assert sock.recv(65535).decode().startswith("SIP/2.0 200 ")
    assert far.running()


# ---- the field far end (field.xml): real networks' delays, early media and refusals ----

# Every digit twice: the probe that cancels 1.5 s after a provisional response (so
# CANCELs land inside the field far end's pauses) and the patient one (which waits
# them out). (Request-URI user, From user).
EARLY_CALLS = [(f"6281993000{d}", f"{FROM_PREFIX}{d:03d}") for d in range(10)]
PATIENT_CALLS = [(f"6281994000{d}", f"{FROM_PREFIX}{d:03d}") for d in range(10)]
FIELD_EARLY_RESPONSES = {
    0: [100, 487],  # canceled during the 6 s post-dial delay
    1: [183, 487],  # canceled during the announcement, before its 480
    2: [200],
    3: [403],
    4: [183, 487],
    5: [100, 487],
    6: [180, 487],
    7: [183, 487],  # canceled before the 180
    8: [180, 200],
    9: [401],
}
FIELD_PATIENT_RESPONSES = {
    0: [100, 180, 487],
    1: [183, 480],
    2: [200],
    3: [403],
    4: [183, 487],
    5: [100, 487],
    6: [180, 487],
    7: [183, 180, 487],
    8: [180, 200],
    9: [401],
}
# The field far end's delays, in seconds: (first code, second code, delay).
FIELD_DELAYS = {0: (100, 180, 6.0), 1: (183, 480, 2.0), 7: (183, 180, 2.0), 8: (180, 200, 0.5)}
# How late SIPp may be on a <pause> on a busy machine, in seconds.
PAUSE_SLACK_S = 0.3


@pytest.fixture(scope="module")
def field(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarEnd]:
    """A private field far end on a free port and a temporary workdir, stopped afterwards."""
    field = FarEnd.field(tmp_path_factory.mktemp("field"), port=free_udp_port())
    yield from private(field, "field far end")


@pytest.fixture(scope="module")
def field_probed(
    field: FarEnd, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, InviteRecord]:
    """Both probes' calls to the field far end, run at once and settled; keyed by user."""
    early_dir, patient_dir = tmp_path_factory.mktemp("early"), tmp_path_factory.mktemp("patient")
    early = start_probe(field.port, EARLY_CALLS, early_dir)
    patient = start_probe(field.port, PATIENT_CALLS, patient_dir, PATIENT_PROBE)
    finish_probe(early, early_dir)
    finish_probe(patient, patient_dir)
    users = {to for to, _ in EARLY_CALLS + PATIENT_CALLS}
    records = field.wait_for(
        lambda rs: {r.request_user for r in rs if r.ended_at is not None} >= users, timeout=2
    )
    return {r.request_user: r for r in records if r.request_user in users}


def check_field_call(record: InviteRecord, frm: str, expected: list[int]) -> None:
    """What every settled field call shares: its responses, ACK, end, and no timer fired."""
    assert record.from_user == frm
    assert [code for code, _ in record.responses] == expected
    assert record.final_code == expected[-1]
    assert record.acked_at is not None and record.ended_at is not None
    assert record.timeout is None and record.bye_sent_at is None
    # The first response goes out at once; only later ones wait.
    assert record.responses[0][1] - record.invited_at < PAUSE_SLACK_S
    if expected[-1] == 200:
        assert record.answered_at is not None and record.bye_at is not None
        assert record.canceled_at is None
    else:
        assert record.answered_at is None and record.bye_at is None
        assert (record.canceled_at is not None) == (expected[-1] == 487)


@pytest.mark.parametrize("digit", range(10))
def test_field_cancel_during_a_delay(field_probed: dict[str, InviteRecord], digit: int) -> None:
    to, frm = EARLY_CALLS[digit]
    record = field_probed[to]
    check_field_call(record, frm, FIELD_EARLY_RESPONSES[digit])
    if record.canceled_at is not None:
        # The probe cancels 1.5 s after the first provisional: inside every pause.
        assert 1.4 <= record.canceled_at - record.invited_at <= 2.5
        sent_487 = record.sent_at(487)
        assert sent_487 is not None and sent_487 - record.canceled_at < PAUSE_SLACK_S


@pytest.mark.parametrize("digit", range(10))
def test_field_behaviour_by_last_digit(field_probed: dict[str, InviteRecord], digit: int) -> None:
    to, frm = PATIENT_CALLS[digit]
    record = field_probed[to]
    check_field_call(record, frm, FIELD_PATIENT_RESPONSES[digit])
    if digit in FIELD_DELAYS:
        first, second, delay = FIELD_DELAYS[digit]
        first_at, second_at = record.sent_at(first), record.sent_at(second)
        assert first_at is not None and second_at is not None
        assert delay - 0.05 <= second_at - first_at <= delay + PAUSE_SLACK_S


def test_field_scenario_runs_without_auto_answer(field: FarEnd, tmp_path: Path) -> None:
    pid = field.pid()
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert str(FIELD_SCENARIO).encode() in cmdline and b"-aa" not in cmdline
    # Each FarEnd recognises only a sipp running its own scenario.
    assert is_live_sipp(pid, FIELD_SCENARIO) and not is_live_sipp(pid)
    (tmp_path / "sipp.pid").write_text(f"{pid}\n")
    assert FarEnd.field(tmp_path).running() and not FarEnd(tmp_path).running()


@pytest.mark.integration  # the shared field far end on its fixed port
def test_field_end_ignores_options_and_keeps_serving(field_end: FarEnd) -> None:
    # The dev field far end itself (5071), as Asterisk's otp-field endpoint sees it.
    assert field_end.port == FIELD_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(1)
        local_port = sock.getsockname()[1]
        options = sip_request(
            "OPTIONS", "ping", FIELD_PORT, local_port, f"fopt-{os.getpid()}", f"To: <sip:{HOST}>"
        )
        sock.sendto(options, (HOST, FIELD_PORT))
        with pytest.raises(TimeoutError):
            sock.recv(65535)
        assert field_end.running()

        user, call_id = phone_number(3), f"after-options-{os.getpid()}-{time.time()}"
        invite = sip_request(
            "INVITE", user, FIELD_PORT, local_port, call_id, f"To: <sip:{user}@{HOST}>"
        )
        sock.sendto(invite, (HOST, FIELD_PORT))
        response = sock.recv(65535).decode()
        assert response.startswith("SIP/2.0 403 ")
        to = next(h for h in response.split("\r\n") if h.startswith("To:"))
        sock.sendto(
            sip_request("ACK", user, FIELD_PORT, local_port, call_id, to), (HOST, FIELD_PORT)
        )
    field_end.wait_for(lambda rs: any(r.call_id == call_id and r.ended_at for r in rs), timeout=2)
    [record] = field_end.calls_to(user)
    assert record.call_id == call_id and record.final_code == 403 and record.acked_at
    assert field_end.running()


def test_cli_field_flag(tmp_path: Path) -> None:
    workdir, port = tmp_path / "field", str(free_udp_port())
    try:
        up = cli("up", "--field", "--workdir", str(workdir), "--port", port)
        assert up.returncode == 0 and "field far end up" in up.stdout, up.stderr
        pid = int((workdir / "sipp.pid").read_text())
        assert is_live_sipp(pid, FIELD_SCENARIO)
        assert cli("status", "--field", "--workdir", str(workdir)).returncode == 0
        # The lab far end's CLI does not mistake the field far end for its own.
        assert cli("status", "--workdir", str(workdir)).returncode == 1
        assert cli("down", "--field", "--workdir", str(workdir)).returncode == 0
        assert not is_live_sipp(pid, FIELD_SCENARIO)
    finally:
        FarEnd.field(workdir).stop()


# ---- the voice far end (voice.xml): answers voice calls, sends their RTP to the test ----

VOICE_CLI = "622150099"  # the From user of voice calls
VOICE_RTP_PORT = 47_002  # only written into the 200's SDP: nothing listens in these tests
# (Request-URI user, From user) -> responses sent to the INVITE, in order.
VOICE_CALLS = {
    ("62819950002", VOICE_CLI): [180, 200],  # answered; the probe hangs up
    ("62819950010", VOICE_CLI): [180, 200],  # any other digit: answered too
    ("62819950001", VOICE_CLI): [180, 200],  # answered (the far end would hang up after 1 s)
    ("62819950005", VOICE_CLI): [486],
    ("62819950009", VOICE_CLI): [180, 487],  # rings until the probe cancels
    ("62819951000", f"{FROM_PREFIX}000"): [180, 487],  # flash calls: 0 rings
    ("62819951003", f"{FROM_PREFIX}003"): [486],
    ("62819951002", f"{FROM_PREFIX}002"): [100, 487],  # never answered, unlike a voice call
    ("62819951007", f"{FROM_PREFIX}007"): [100, 487],
    ("62819951009", f"{VOICE_CLI}1"): [100, 487],  # the From user must equal voice_cli
}


@pytest.fixture(scope="module")
def voice(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarEnd]:
    """A private voice far end on a free port and a temporary workdir, stopped afterwards."""
    voice = FarEnd.voice(
        tmp_path_factory.mktemp("voice"),
        port=free_udp_port(),
        rtp_port=VOICE_RTP_PORT,
        voice_cli=f"+{VOICE_CLI}",  # the '+' is dropped
    )
    yield from private(voice, "voice far end")


def test_voice_far_end_command(voice: FarEnd, tmp_path: Path) -> None:
    assert voice.port != VOICE_PORT
    pid = voice.pid()
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert cmdline[cmdline.index("-sf") + 1] == str(VOICE_SCENARIO) and "-aa" in cmdline
    sets = [cmdline[i + 1 : i + 3] for i, arg in enumerate(cmdline) if arg == "-set"]
    assert sets == [["rtp_port", str(VOICE_RTP_PORT)], ["voice_cli", VOICE_CLI]]
    assert is_live_sipp(pid, VOICE_SCENARIO) and not is_live_sipp(pid)
    assert not is_live_sipp(pid, FIELD_SCENARIO)
    # Checking and stopping need no variables; starting does.
    (tmp_path / "sipp.pid").write_text(f"{pid}\n")
    assert FarEnd.voice(tmp_path).running() and not FarEnd.field(tmp_path).running()
    (tmp_path / "sipp.pid").unlink()
    with pytest.raises(RuntimeError, match="needs -set voice_cli"):
        FarEnd.voice(tmp_path, port=free_udp_port(), rtp_port=VOICE_RTP_PORT).start()
    with pytest.raises(ValueError, match="digits"):
        FarEnd.voice(tmp_path, voice_cli="62-21")
    with pytest.raises(ValueError, match="RTP port"):
        FarEnd.voice(tmp_path, rtp_port=70_000)
    command = FarEnd(tmp_path, variables={"a": "1", "b": "x y"}).command()
    at = command.index("-set")
    assert command[at : at + 6] == ["-set", "a", "1", "-set", "b", "x y"]
    assert "-set" not in FarEnd(tmp_path).command()


def test_voice_behaviour_by_caller_and_last_digit(voice: FarEnd, tmp_path: Path) -> None:
    calls = list(VOICE_CALLS)
    run_probe(voice.port, calls, tmp_path)
    users = {to for to, _ in calls}
    records = voice.wait_for(
        lambda rs: {r.request_user for r in rs if r.ended_at is not None} >= users, timeout=2
    )
    by_user = {r.request_user: r for r in records}
    for (to, frm), expected in VOICE_CALLS.items():
        record = by_user[to]
        assert record.from_user == frm
        assert [code for code, _ in record.responses] == expected, to
        assert record.acked_at is not None and record.timeout is None, to
        assert (record.answered_at is not None) == (expected[-1] == 200), to
        assert (record.canceled_at is not None) == (expected[-1] == 487), to


def test_voice_call_sends_rtp_to_rtp_port_and_digit_1_hangs_up(voice: FarEnd) -> None:
    user, call_id = "62819952221", f"voice-1-{os.getpid()}-{time.time()}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(3)
        local_port = sock.getsockname()[1]
        invite = sip_request(
            "INVITE", user, voice.port, local_port, call_id, f"To: <sip:{user}@{HOST}>"
        ).replace(f"sip:{FROM_PREFIX}777@".encode(), f"sip:+{VOICE_CLI}@".encode())
        sock.sendto(invite, (HOST, voice.port))
        assert sock.recv(65535).decode().startswith("SIP/2.0 180 ")
        ok = sock.recv(65535).decode()
        assert ok.startswith("SIP/2.0 200 ")
        sdp = ok.split("\r\n\r\n", 1)[1]
        assert f"m=audio {VOICE_RTP_PORT} RTP/AVP 0" in sdp and f"c=IN IP4 {HOST}" in sdp
        to = next(h for h in ok.split("\r\n") if h.startswith("To:"))
        sock.sendto(
            sip_request("ACK", user, voice.port, local_port, call_id, to), (HOST, voice.port)
        )
        bye = sock.recv(65535).decode()
        while bye.startswith("SIP/2.0 200 "):  # a retransmission that crossed our ACK
            bye = sock.recv(65535).decode()
        assert bye.startswith("BYE ")
        headers = [
            h
            for h in bye.split("\r\n")
            if h.split(":")[0] in ("Via", "From", "To", "Call-ID", "CSeq")
        ]
        reply = "SIP/2.0 200 OK\r\n" + "\r\n".join(headers) + "\r\nContent-Length: 0\r\n\r\n"
        sock.sendto(reply.encode(), (HOST, voice.port))
    voice.wait_for(lambda rs: any(r.call_id == call_id and r.ended_at for r in rs), timeout=2)
    record = next(r for r in voice.records() if r.call_id == call_id)
    assert record.from_user == VOICE_CLI and record.answered_at and record.acked_at
    assert record.bye_sent_at is not None and record.bye_at is None
    assert 0.95 <= record.bye_sent_at - record.acked_at <= 1.5


# ---- the routes far end (routes.xml): one carrier refuses one caller-ID pool ----

ROUTES_POOL = "6221500"  # the refused pool's From-user prefix
ROUTES_CARRIER = "^62(811|812|813|821|822|823|852|853)"  # the refusing carrier's numbers
REFUSED = [100, 603]
RINGS = [100, 180, 487]  # rings until the probe cancels
# (Request-URI user, From user) -> responses sent to the INVITE, in order.
ROUTES_CALLS = {
    ("62811995001", f"{ROUTES_POOL}01"): REFUSED,
    ("62853995002", f"+{ROUTES_POOL}02"): REFUSED,  # the From user's '+' is dropped
    ("+62821995003", f"{ROUTES_POOL}03"): REFUSED,  # and the Request-URI user's
    ("62821995004", ROUTES_POOL): REFUSED,  # the prefix alone
    ("62811995005", "622150101"): RINGS,  # another pool
    ("62811995006", ROUTES_POOL[:-1]): RINGS,  # shorter than the prefix
    ("62814995007", f"{ROUTES_POOL}07"): RINGS,  # another carrier
    ("62855995008", f"{ROUTES_POOL}08"): RINGS,
    ("6281995009", f"{ROUTES_POOL}09"): RINGS,  # 62819 is not 628(11|12|...)
    ("0811995010", f"{ROUTES_POOL}10"): RINGS,  # the pattern is anchored
}


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FarEnd]:
    """A private routes far end on a free port and a temporary workdir, stopped afterwards."""
    routes = FarEnd.routes(
        tmp_path_factory.mktemp("routes"),
        port=free_udp_port(),
        reject_from=f"+{ROUTES_POOL}",  # the '+' is dropped
        reject_to=ROUTES_CARRIER,
    )
    yield from private(routes, "routes far end")


def check_routes_calls(far: FarEnd, calls: dict[tuple[str, str], list[int]], workdir: Path) -> None:
    """Place `calls` with the probe and check what the far end sent to each."""
    run_probe(far.port, list(calls), workdir)
    users = {to for to, _ in calls}
    records = far.wait_for(
        lambda rs: {r.request_user for r in rs if r.ended_at is not None} >= users, timeout=2
    )
    by_user = {r.request_user: r for r in records}
    for (to, frm), expected in calls.items():
        record = by_user[to]
        assert record.from_user == frm.removeprefix("+"), to
        assert [code for code, _ in record.responses] == expected, to
        assert record.final_code == expected[-1] and record.answered_at is None, to
        assert record.acked_at is not None and record.timeout is None, to
        assert (record.canceled_at is not None) == (expected == RINGS), to


def test_routes_far_end_command(routes: FarEnd, tmp_path: Path) -> None:
    assert routes.port != ROUTES_PORT
    pid = routes.pid()
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert cmdline[cmdline.index("-sf") + 1] == str(ROUTES_SCENARIO) and "-aa" in cmdline
    sets = [cmdline[i + 1 : i + 3] for i, arg in enumerate(cmdline) if arg == "-set"]
    assert sets == [["reject_from", ROUTES_POOL], ["reject_to", ROUTES_CARRIER]]
    assert is_live_sipp(pid, ROUTES_SCENARIO) and not is_live_sipp(pid)
    assert not is_live_sipp(pid, VOICE_SCENARIO) and not is_live_sipp(pid, FIELD_SCENARIO)
    # Checking and stopping need no variables; starting does.
    (tmp_path / "sipp.pid").write_text(f"{pid}\n")
    assert FarEnd.routes(tmp_path).running() and not FarEnd.voice(tmp_path).running()
    (tmp_path / "sipp.pid").unlink()
    with pytest.raises(RuntimeError, match="needs -set reject_to"):
        FarEnd.routes(tmp_path, port=free_udp_port(), reject_from="none").start()
    with pytest.raises(RuntimeError, match="needs -set reject_from, reject_to"):
        FarEnd.routes(tmp_path, port=free_udp_port()).start()
    assert not FarEnd.routes(tmp_path).running()


@pytest.mark.parametrize(
    ("reject_from", "variable"),
    [("6221500", "6221500"), ("+6221500", "6221500"), ("none", "none")],
)
def test_routes_reject_from(tmp_path: Path, reject_from: str, variable: str) -> None:
    far = FarEnd.routes(tmp_path, reject_from=reject_from, reject_to="^62811")
    command = far.command()
    at = command.index("-set")
    assert command[at : at + 6] == ["-set", "reject_from", variable, "-set", "reject_to", "^62811"]


@pytest.mark.parametrize("reject_from", ["", "+", "62-21", "6221 500", "+none", "None", "٦٢"])
def test_routes_bad_reject_from(tmp_path: Path, reject_from: str) -> None:
    with pytest.raises(ValueError, match='digits or "none"'):
        FarEnd.routes(tmp_path, reject_from=reject_from)


@pytest.mark.parametrize("reject_to", [ROUTES_CARRIER, "^62811", "^(62811|62812)", "^"])
def test_routes_reject_to(tmp_path: Path, reject_to: str) -> None:
    assert routes_pattern(reject_to) == reject_to
    assert FarEnd.routes(tmp_path, reject_to=reject_to).variables == {"reject_to": reject_to}


@pytest.mark.parametrize(
    ("reject_to", "problem"),
    [
        ("", "non-empty"),
        ("^62 811", "without spaces"),
        ("^62\t811", "without spaces"),
        ("^62'811", "quotes"),
        ('^62"811', "quotes"),
        ("^62(811", "not a regex"),
        ("^62(811|812))", "not a regex"),
        ("62811", "not of the form"),  # unanchored
        ("^62811$", "not of the form"),
        ("^62(81[1-3]|852)", "not of the form"),
        ("^62(811|)", "not of the form"),
        ("^62(811)(812)", "not of the form"),
        ("^\\+62811", "not of the form"),
    ],
)
def test_routes_bad_reject_to(tmp_path: Path, reject_to: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        FarEnd.routes(tmp_path, reject_to=reject_to)


def test_routes_behaviour_by_caller_and_callee(routes: FarEnd, tmp_path: Path) -> None:
    check_routes_calls(routes, ROUTES_CALLS, tmp_path)


def test_routes_reject_from_none_refuses_nothing(tmp_path: Path) -> None:
    accepting = FarEnd.routes(
        tmp_path / "routes", port=free_udp_port(), reject_from="none", reject_to=ROUTES_CARRIER
    )
    calls = {(f"62811996{i:03d}", f"{ROUTES_POOL}{i:02d}"): RINGS for i in range(2)}
    calls[("62811996100", "none")] = RINGS
    accepting.start()
    try:
        check_routes_calls(accepting, calls, tmp_path / "probe")
    finally:
        accepting.stop()
    assert not accepting.running()
