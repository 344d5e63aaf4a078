"""Far-end simulators for the Asterisk trunks: a SIPp UAS plus a reader for its event log.

Three scenarios pick their behaviour from the last digit of the Request-URI user and
write one line per SIP event in the same format; see tests/sipp/README.md:
- tests/sipp/farend.xml, the lab far end on 127.0.0.1:5070 (endpoint otp-trunk);
- tests/sipp/field.xml, the "field" far end on 127.0.0.1:5071 (endpoint otp-field),
  which behaves like real mobile networks and ignores OPTIONS;
- tests/sipp/voice.xml, the voice far end on 127.0.0.1:5072 (endpoint otp-voice), which
  answers voice calls with an SDP that sends Asterisk's RTP to the test (tests/rtp.py).
Another one picks it from the caller and the callee, in the same format:
- tests/sipp/routes.xml, the routes far end on 127.0.0.1:5073 (endpoint otp-route), a
  carrier that refuses (603) one caller-ID pool's calls to its own numbers and rings the rest.

CLI (used by the Makefile):  python tests/farend.py up|down|status|show [--field] [--workdir DIR]
(the lab and field far ends only: the tests start the voice and routes far ends themselves).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIO = REPO_ROOT / "tests" / "sipp" / "farend.xml"
DEFAULT_WORKDIR = REPO_ROOT / ".cache" / "farend"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5070
FIELD_SCENARIO = REPO_ROOT / "tests" / "sipp" / "field.xml"
FIELD_WORKDIR = REPO_ROOT / ".cache" / "field-end"
FIELD_PORT = 5071
VOICE_SCENARIO = REPO_ROOT / "tests" / "sipp" / "voice.xml"
VOICE_WORKDIR = REPO_ROOT / ".cache" / "voice-end"
VOICE_PORT = 5072
# The -set variables voice.xml needs: the RTP port its 200's SDP names, and the From user
# (digits, no '+') that makes a call a voice call.
VOICE_VARIABLES = ("rtp_port", "voice_cli")
ROUTES_SCENARIO = REPO_ROOT / "tests" / "sipp" / "routes.xml"
ROUTES_WORKDIR = REPO_ROOT / ".cache" / "routes-end"
ROUTES_PORT = 5073
# The -set variables routes.xml needs: the From-user prefix of the refused caller-ID pool
# (digits, or "none") and the carrier's numbers (a regular expression; see routes_pattern).
ROUTES_VARIABLES = ("reject_from", "reject_to")
# What routes.xml understands of reject_to: SIPp compiles its regular expressions when it
# loads the scenario, so the scenario matches the value as data, and only in this form.
ROUTES_PATTERN_FORM = re.compile(r"\^[0-9]*(\([0-9]+(\|[0-9]+)*\))?")
SIPP_ENV = "FAREND_SIPP"  # optional override of the sipp executable
PID_FILE = "sipp.pid"
LOG_FILE = "farend.log"  # <log> actions, one line per SIP event
ERROR_FILE = "errors.log"  # SIPp warnings (unexpected messages, timeouts)
OUT_FILE = "sipp.out"  # SIPp stdout/stderr (final statistics, fatal errors)
SCREEN_FILE = "screen.log"  # statistics screens dumped on SIGUSR2
RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.02


@dataclass
class InviteRecord:
    """Everything the far end saw and did for one received INVITE (times are epoch seconds)."""

    call_id: str
    request_user: str
    from_user: str
    invited_at: float  # INVITE received
    # The SIP port of the Asterisk that sent it (its Via): which node placed the call.
    via_port: int | None = None
    answered_at: float | None = None  # 200 OK to the INVITE sent
    canceled_at: float | None = None  # first CANCEL received
    bye_at: float | None = None  # first BYE received
    final_code: int | None = None  # first final response sent to the INVITE
    responses: list[tuple[int, float]] = field(default_factory=list)  # (code, sent_at), in order
    acked_at: float | None = None  # first ACK received
    bye_sent_at: float | None = None  # we hung up (caller sent no BYE within 60 s)
    timeout: str | None = None  # "ring", "ack" or "bye" when a scenario timer fired
    ended_at: float | None = None  # the scenario reached its end for this call

    def sent_at(self, code: int) -> float | None:
        """Return when response `code` was first sent to the INVITE, or None."""
        return next((at for sent, at in self.responses if sent == code), None)


def parse_log_line(line: str) -> tuple[str, float, str, list[str]] | None:
    """Split one event line into (event, epoch, call_id, extra fields); None if malformed."""
    parts = line.rstrip("\r\n").split("|")
    if len(parts) < 3:
        return None
    try:
        # [timestamp] is "YYYY-MM-DD<TAB>HH:MM:SS.uuuuuu<TAB><epoch>.uuuuuu".
        epoch = float(parts[1].rsplit("\t", 1)[-1])
    except ValueError:
        return None
    return parts[0], epoch, parts[2], parts[3:]


class EventLog:
    """Incremental parser of the far-end log: folds event lines into InviteRecords."""

    def __init__(self) -> None:
        """Start with no records."""
        self._live: list[InviteRecord] = []  # updated in place as events arrive
        self._snapshots: list[InviteRecord] = []  # copies handed out, replaced when stale
        self._stale: set[int] = set()
        self._by_call_id: dict[str, int] = {}  # call-id -> index of its latest INVITE

    def feed(self, line: str) -> None:
        """Fold one log line into the records (an INVITE starts a new record)."""
        parsed = parse_log_line(line)
        if parsed is None:
            return
        event, at, call_id, extra = parsed
        if event == "INVITE":
            record = InviteRecord(
                call_id=call_id,
                request_user=extra[0] if extra else "",
                from_user=extra[1] if len(extra) > 1 else "",
                invited_at=at,
                via_port=int(extra[2]) if len(extra) > 2 and extra[2].isdigit() else None,
            )
            self._by_call_id[call_id] = len(self._live)
            self._stale.add(len(self._live))
            self._live.append(record)
            self._snapshots.append(record)
            return
        index = self._by_call_id.get(call_id)
        if index is None:
            return
        self._stale.add(index)
        apply_event(self._live[index], event, at, extra)

    def records(self) -> list[InviteRecord]:
        """Return snapshot copies of all records, in INVITE order."""
        for index in self._stale:
            live = self._live[index]
            self._snapshots[index] = dataclasses.replace(live, responses=list(live.responses))
        self._stale.clear()
        return list(self._snapshots)


def apply_event(rec: InviteRecord, event: str, at: float, extra: Sequence[str]) -> None:
    """Apply one non-INVITE event (epoch `at`, extra fields) to its record."""
    if event == "SENT" and extra and extra[0].isdigit():
        code = int(extra[0])
        rec.responses.append((code, at))
        if code >= 200 and rec.final_code is None:
            rec.final_code = code
            if code == 200:
                rec.answered_at = at
    elif event == "CANCEL" and rec.canceled_at is None:
        rec.canceled_at = at
    elif event == "BYE" and rec.bye_at is None:
        rec.bye_at = at
    elif event == "ACK" and rec.acked_at is None:
        rec.acked_at = at
    elif event == "BYE_SENT" and rec.bye_sent_at is None:
        rec.bye_sent_at = at
    elif event == "TIMEOUT" and rec.timeout is None:
        rec.timeout = extra[0] if extra else "?"
    elif event == "END":
        rec.ended_at = at


def format_record(record: InviteRecord) -> str:
    """Render a record as one human-readable line."""
    responses = ",".join(f"{code}@{at:.3f}" for code, at in record.responses)
    optional = {
        "answered": record.answered_at,
        "cancel": record.canceled_at,
        "bye": record.bye_at,
        "ack": record.acked_at,
        "bye_sent": record.bye_sent_at,
        "end": record.ended_at,
    }
    extras = " ".join(f"{name}={at:.3f}" for name, at in optional.items() if at is not None)
    timeout = f" timeout={record.timeout}" if record.timeout else ""
    return (
        f"{record.invited_at:.3f} {record.call_id} to={record.request_user} "
        f"from={record.from_user} final={record.final_code} sent=[{responses}] {extras}{timeout}"
    ).rstrip()


def udp_inodes(host: str, port: int) -> set[str]:
    """Return the socket inodes bound to UDP host:port, per /proc/net/udp (IPv4 only)."""
    packed = socket.inet_aton(host)
    local = f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"
    inodes: set[str] = set()
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return inodes
    for line in lines:
        cols = line.split()
        if len(cols) > 9 and cols[1] == local:
            inodes.add(cols[9])
    return inodes


def process_socket_inodes(pid: int) -> set[str]:
    """Return the socket inodes held open by process `pid`."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        fds = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def is_live_sipp(pid: int, scenario: Path = SCENARIO) -> bool:
    """Tell whether `pid` is a live (non-zombie) sipp process running `scenario`."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    if state in ("Z", "X"):
        return False
    return b"sipp" in os.path.basename(cmdline[0]) and str(scenario).encode() in cmdline


def check_udp_port_free(host: str, port: int) -> None:
    """Raise RuntimeError if UDP host:port cannot be bound right now."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise RuntimeError(f"far end: UDP {host}:{port} is already in use") from exc
        raise RuntimeError(f"far end: cannot bind UDP {host}:{port}: {exc}") from exc
    finally:
        probe.close()


def tail(path: Path, max_bytes: int = 4000) -> str:
    """Return the last `max_bytes` of a text file, or '' if it does not exist."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def inheritable_fds() -> list[int]:
    """Return this process's inheritable file descriptors above stderr."""
    fds: list[int] = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):  # e.g. the fd of the listing itself, now closed
            if fd > 2 and os.get_inheritable(fd):
                fds.append(fd)
    return fds


def spawn_detached(cmd: Sequence[str], out_file: Path) -> int:
    """Spawn `cmd` in a new session, stdin from /dev/null, stdout+stderr to `out_file`."""
    file_actions: list[tuple[int | str, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(out_file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    # Like Popen(close_fds=True): an inherited pipe would keep e.g. `make` waiting for EOF.
    file_actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in inheritable_fds()]
    # posix_spawn, not Popen: `farend.py up` exits leaving sipp running, and an
    # abandoned Popen object would warn "subprocess ... is still running".
    return os.posix_spawn(
        cmd[0],
        list(cmd),
        dict(os.environ, TZ="UTC"),  # TZ keeps the localtime() behind [timestamp] cheap
        file_actions=file_actions,
        setsid=True,
        setsigmask=(),
        setsigdef=RESET_SIGNALS,
    )


def reap(pid: int) -> int | None:
    """Reap our child `pid` if it has exited: its exit status, None while it runs."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (any more)
        return -1
    return None if done == 0 else os.waitstatus_to_exitcode(status)


def terminate(pid: int, own_child: bool, scenario: Path = SCENARIO) -> None:
    """SIGTERM `pid` (SIGKILL after STOP_TIMEOUT) and wait until it is gone (reaped if ours)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            gone = reap(pid) is not None if own_child else not is_live_sipp(pid, scenario)
            if gone:
                return
            time.sleep(POLL_INTERVAL)
    raise RuntimeError(f"far end: sipp pid {pid} survived SIGKILL")


def routes_pattern(reject_to: str) -> str:
    """Check `reject_to` for routes.xml: a regular expression in ROUTES_PATTERN_FORM."""
    if not reject_to or any(c.isspace() or c in "\"'" for c in reject_to):
        raise ValueError(
            f"routes far end: reject_to must be non-empty, without spaces or quotes: {reject_to!r}"
        )
    try:
        re.compile(reject_to)
    except re.error as exc:
        raise ValueError(f"routes far end: reject_to {reject_to!r} is not a regex: {exc}") from exc
    if not ROUTES_PATTERN_FORM.fullmatch(reject_to):
        raise ValueError(
            f"routes far end: reject_to {reject_to!r} is not of the form ^PREFIX or "
            "^PREFIX(A|B|...) with digits, the only one routes.xml understands"
        )
    return reject_to


class FarEnd:
    """Start/stop the SIPp far end and read what it received."""

    def __init__(
        self,
        workdir: Path,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        scenario: Path = SCENARIO,
        answer_options: bool = True,
        variables: Mapping[str, str] | None = None,
        required_variables: Sequence[str] = (),
    ) -> None:
        """Prepare (not start) a far end logging into `workdir`, listening on UDP host:port.

        `answer_options` runs SIPp with -aa, which answers out-of-dialog OPTIONS with 200.
        `variables` are the scenario's global variables, passed as `-set NAME VALUE`;
        start() refuses to run without every name in `required_variables`.
        """
        self.workdir = Path(workdir)
        self.host = host
        self.port = port
        self.scenario = Path(scenario).resolve()  # as is_live_sipp finds it in the cmdline
        self.answer_options = answer_options
        self.variables = dict(variables or {})
        self.required_variables = tuple(required_variables)
        self.pid_file = self.workdir / PID_FILE
        self.log_file = self.workdir / LOG_FILE
        self.error_file = self.workdir / ERROR_FILE
        self.out_file = self.workdir / OUT_FILE
        self.screen_file = self.workdir / SCREEN_FILE
        self._child: int | None = None  # pid spawned by this object, which must reap it
        self._reset_parser()

    @classmethod
    def field(
        cls, workdir: Path = FIELD_WORKDIR, host: str = DEFAULT_HOST, port: int = FIELD_PORT
    ) -> FarEnd:
        """The field far end (field.xml): like a carrier, it leaves OPTIONS unanswered."""
        return cls(workdir, host=host, port=port, scenario=FIELD_SCENARIO, answer_options=False)

    @classmethod
    def voice(
        cls,
        workdir: Path = VOICE_WORKDIR,
        host: str = DEFAULT_HOST,
        port: int = VOICE_PORT,
        *,
        rtp_port: int | None = None,
        voice_cli: str | None = None,
    ) -> FarEnd:
        """The voice far end (voice.xml), answering OPTIONS (-aa).

        Calls from `voice_cli` (digits; a leading '+' is dropped) are voice calls, answered
        with an SDP that sends the RTP to 127.0.0.1:`rtp_port`. Both are needed to start
        it, not to check or stop one that runs.
        """
        variables: dict[str, str] = {}
        if rtp_port is not None:
            if not 0 < rtp_port < 65536:
                raise ValueError(f"voice far end: bad RTP port {rtp_port}")
            variables["rtp_port"] = str(rtp_port)
        if voice_cli is not None:
            digits = voice_cli.removeprefix("+")
            if not digits.isascii() or not digits.isdigit():
                raise ValueError(f"voice far end: voice_cli must be digits, not {voice_cli!r}")
            variables["voice_cli"] = digits
        return cls(
            workdir,
            host=host,
            port=port,
            scenario=VOICE_SCENARIO,
            variables=variables,
            required_variables=VOICE_VARIABLES,
        )

    @classmethod
    def routes(
        cls,
        workdir: Path = ROUTES_WORKDIR,
        host: str = DEFAULT_HOST,
        port: int = ROUTES_PORT,
        *,
        reject_from: str | None = None,
        reject_to: str | None = None,
    ) -> FarEnd:
        """The routes far end (routes.xml), answering OPTIONS (-aa).

        A call whose From user starts with `reject_from` (digits; a leading '+' is dropped;
        "none" refuses nothing) to a Request-URI user that `reject_to` matches gets 100 and
        603 Decline; any other call 100, 180 and waits for the CANCEL. `reject_to` is a
        regular expression of the form ^PREFIX or ^PREFIX(A|B|...), all digits. Both are
        needed to start it, not to check or stop one that runs.
        """
        variables: dict[str, str] = {}
        if reject_from is not None:
            digits = reject_from.removeprefix("+")
            if reject_from != "none" and (not digits.isascii() or not digits.isdigit()):
                raise ValueError(
                    f'routes far end: reject_from must be digits or "none", not {reject_from!r}'
                )
            variables["reject_from"] = "none" if reject_from == "none" else digits
        if reject_to is not None:
            variables["reject_to"] = routes_pattern(reject_to)
        return cls(
            workdir,
            host=host,
            port=port,
            scenario=ROUTES_SCENARIO,
            variables=variables,
            required_variables=ROUTES_VARIABLES,
        )

    # ---- lifecycle -------------------------------------------------------------------

    def command(self) -> list[str]:
        """Return the sipp command line used by start()."""
        sipp = os.environ.get(SIPP_ENV) or "sipp"
        return [
            shutil.which(sipp) or sipp,
            "-sf", str(self.scenario),
            "-i", self.host,
            "-p", str(self.port),
            "-bind_local",
            "-mi", self.host,
            "-ci", self.host,
            "-nostdin",
            *(["-aa"] if self.answer_options else []),
            *[arg for name, value in self.variables.items() for arg in ("-set", name, value)],
            "-trace_logs", "-log_file", str(self.log_file),
            "-trace_err", "-error_file", str(self.error_file),
            "-screen_file", str(self.screen_file),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Start sipp in the background and wait until it has bound its UDP port."""
        if self.running():
            raise RuntimeError(f"far end already running (pid {self.pid()}, {self.workdir})")
        if not self.scenario.is_file():
            raise RuntimeError(f"far end: scenario {self.scenario} not found")
        missing = [name for name in self.required_variables if name not in self.variables]
        if missing:
            raise RuntimeError(
                f"far end: {self.scenario.name} needs -set {', '.join(missing)} (variables=)"
            )
        cmd = self.command()
        if not os.access(cmd[0], os.X_OK):
            raise RuntimeError(f"far end: sipp executable {cmd[0]!r} not found")
        check_udp_port_free(self.host, self.port)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in (self.log_file, self.error_file, self.pid_file):
            stale.unlink(missing_ok=True)
        self._reset_parser()
        pid = spawn_detached(cmd, self.out_file)
        self._child = pid
        self.pid_file.write_text(f"{pid}\n")
        deadline = time.monotonic() + timeout
        while True:
            status = reap(pid)
            if status is not None:
                self._child = None
                self.pid_file.unlink(missing_ok=True)
                raise RuntimeError(
                    f"far end: sipp exited with status {status} during startup:\n"
                    f"{tail(self.out_file)}{tail(self.error_file)}"
                )
            bound = udp_inodes(self.host, self.port)
            if bound and bound & process_socket_inodes(pid):
                return
            if time.monotonic() >= deadline:
                self.stop()
                raise RuntimeError(
                    f"far end: sipp did not bind UDP {self.host}:{self.port} "
                    f"within {timeout:.1f} s:\n{tail(self.out_file)}"
                )
            time.sleep(POLL_INTERVAL)

    def pid(self) -> int | None:
        """Return the pid of the sipp we (or the CLI) started, per the pid file."""
        if self._child is not None:
            return self._child
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        """Tell whether the sipp started for this workdir is alive."""
        if self._child is not None and reap(self._child) is not None:
            self._child = None
            return False
        pid = self.pid()
        return pid is not None and is_live_sipp(pid, self.scenario)

    def stop(self) -> None:
        """Stop the sipp we started (SIGTERM, then SIGKILL) and wait for it; idempotent."""
        pid = self.pid()
        child, self._child = self._child, None
        if pid is not None and (child is not None or is_live_sipp(pid, self.scenario)):
            terminate(pid, own_child=child is not None, scenario=self.scenario)
        self.pid_file.unlink(missing_ok=True)

    # ---- records ---------------------------------------------------------------------

    def _reset_parser(self) -> None:
        """Forget everything parsed so far."""
        self._events = EventLog()
        self._offset = 0
        self._partial = b""
        self._inode: int | None = None

    def _read_new_lines(self) -> None:
        """Parse the lines appended to the log since the last call (restarting on truncation)."""
        try:
            with self.log_file.open("rb") as fh:
                st = os.fstat(fh.fileno())
                if st.st_ino != self._inode or st.st_size < self._offset:
                    self._reset_parser()
                    self._inode = st.st_ino
                fh.seek(self._offset)
                chunk = fh.read()
        except FileNotFoundError:
            if self._offset:
                self._reset_parser()
            return
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        for raw in lines:
            self._events.feed(raw.decode("utf-8", "replace"))

    def records(self) -> list[InviteRecord]:
        """Return snapshots of all INVITE records, in the order the INVITEs arrived."""
        self._read_new_lines()
        return self._events.records()

    def calls_to(self, request_user: str) -> list[InviteRecord]:
        """Return the records whose Request-URI user equals `request_user`."""
        return [r for r in self.records() if r.request_user == request_user]

    def wait_for(
        self, predicate: Callable[[list[InviteRecord]], bool], timeout: float
    ) -> list[InviteRecord]:
        """Poll records() until predicate(records) is true; AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if predicate(records):
                return records
            if time.monotonic() >= deadline:
                shown = "\n".join(format_record(r) for r in records[-50:]) or "(no INVITE received)"
                raise AssertionError(
                    f"far end: condition not met within {timeout:.1f} s; "
                    f"{len(records)} record(s), last ones:\n{shown}"
                )
            time.sleep(POLL_INTERVAL)


# ---- CLI -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI: up | down | status | show, for the lab far end or (--field) the field one."""
    parser = argparse.ArgumentParser(description="Far-end SIPp simulator for otp-gateway tests.")
    parser.add_argument("action", choices=["up", "down", "status", "show"])
    parser.add_argument(
        "--field",
        action="store_true",
        help=f"the field far end ({FIELD_SCENARIO.name}, port {FIELD_PORT}, no OPTIONS answers)",
    )
    parser.add_argument("--workdir", type=Path, help="state/log directory")
    parser.add_argument("--host", default=DEFAULT_HOST, help="listen address (up only)")
    parser.add_argument("--port", type=int, help="listen UDP port (up only)")
    args = parser.parse_args(argv)
    if args.field:
        name = "field far end"
        far = FarEnd.field(args.workdir or FIELD_WORKDIR, args.host, args.port or FIELD_PORT)
    else:
        name = "far end"
        far = FarEnd(args.workdir or DEFAULT_WORKDIR, args.host, args.port or DEFAULT_PORT)
    if args.action == "up":
        if far.running():
            print(f"{name} already running (pid {far.pid()})")
            return 0
        try:
            far.start()
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{name} up on udp:{far.host}:{far.port} (pid {far.pid()}, log {far.log_file})")
        return 0
    if args.action == "down":
        was_running = far.running()
        far.stop()
        print(f"{name} stopped" if was_running else f"{name} not running")
        return 0
    if args.action == "status":
        if far.running():
            print(f"{name} running (pid {far.pid()}, log {far.log_file})")
            return 0
        print(f"{name} not running")
        return 1
    for record in far.records():
        print(format_record(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
