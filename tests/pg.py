"""A throwaway PostgreSQL cluster for development and tests, under .cache/postgresql/.

It listens on 127.0.0.1:55432 only (role otp, password otp-dev, database otp) and on a
unix socket in its own directory, and trades durability for speed: after a crash, or to
start afresh, delete .cache/postgresql/. PostgreSQL refuses to run as root, so as root
the server runs as the `postgres` system user that the Debian package creates.

CLI (used by the Makefile):  python tests/pg.py up|down|status|url
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLUSTER_DIR = REPO_ROOT / ".cache" / "postgresql"
DATA_DIR = "data"  # PGDATA, inside the cluster dir
INITDB_DIR = "data.tmp"  # initdb works here; renamed to DATA_DIR once complete
LOG_FILE = "postgresql.log"  # server log (pg_ctl -l), appended across starts
SOCKET_DIR = "socket"  # unix socket and its lock file, instead of /var/run/postgresql
LOCK_FILE = "up.lock"  # serialises concurrent up/down (e.g. two test sessions)
SETTINGS_FILE = "otp-dev.conf"  # in the data dir, included by postgresql.conf, rewritten per start
HOST = "127.0.0.1"
PORT = 55432  # not 5432: a system cluster (Debian's `main`) may be there
ROLE = "otp"
PASSWORD = "otp-dev"  # noqa: S105 - the dev cluster's fixed loopback-only password
DATABASE = "otp"
DEV_URL = f"postgresql://{ROLE}:{PASSWORD}@{HOST}:{PORT}/{DATABASE}"
SERVER_USER = "postgres"  # as root, initdb/pg_ctl/postgres run as this system user
BIN_GLOB = "/usr/lib/postgresql/*/bin/initdb"  # Debian's per-version server binaries
START_TIMEOUT = 60.0  # here 0.1 s (0.7 s with initdb); a cold cache or busy CI box is slower
STOP_TIMEOUT = 30.0  # `-m fast` rolls back open transactions; with fsync off it is quick
COMMAND_TIMEOUT = 120.0  # initdb, psql
POLL_INTERVAL = 0.05
MAX_SOCKET_PATH = 107  # sizeof(sockaddr_un.sun_path) minus the NUL
# Unquoted-identifier-like: no quoting needed in URLs, and at most NAMEDATALEN - 1 bytes,
# which PostgreSQL would otherwise truncate silently.
DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
PROTECTED_DATABASES = frozenset({"postgres", "template0", "template1", DATABASE})
SETTINGS: dict[str, str] = {
    "listen_addresses": f"'{HOST}'",  # loopback only
    "port": str(PORT),
    "unix_socket_permissions": "0700",  # only the owner (and root) may use the socket
    "max_connections": "300",  # tests open many connection pools at once
    "password_encryption": "'scram-sha-256'",
    # A throwaway cluster: durability buys nothing here and costs time on every commit,
    # checkpoint and CREATE DATABASE. A crash may corrupt it; then delete and re-create it.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
}
# Ensures role and database exist (a start after an interrupted first `up` completes it).
PROVISION_SQL = """\
SELECT format('CREATE ROLE %I', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \\gexec
ALTER ROLE :"role" LOGIN CREATEDB PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \\gexec
"""


def database_url(name: str, port: int = PORT) -> str:
    """Return the URL of database `name` as the otp role over TCP."""
    return f"postgresql://{ROLE}:{PASSWORD}@{HOST}:{port}/{name}"


def find_bindir(version: str | None = None) -> Path:
    """Return the PostgreSQL server bindir: `version`'s if installed, else the newest."""
    if version is not None:
        exact = Path(f"/usr/lib/postgresql/{version}/bin")
        if (exact / "initdb").is_file():
            return exact

    def version_key(initdb: str) -> tuple[int, ...]:
        """Sort key: the numeric version in /usr/lib/postgresql/<version>/bin/initdb."""
        name = Path(initdb).parent.parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    found = sorted(glob.glob(BIN_GLOB), key=version_key)
    if found:
        return Path(found[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            bindir = Path(out.stdout.strip())
            if (bindir / "initdb").is_file():
                return bindir
    raise RuntimeError(
        f"dev postgres: no PostgreSQL server binaries ({BIN_GLOB}): "
        "apt-get install postgresql (`make deps` does it)"
    )


def process_state(pid: int) -> str | None:
    """Return the state letter of process `pid` (R, S, Z, ...), or None if there is none."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def is_live_postmaster(pid: int, data_dir: Path) -> bool:
    """Tell whether `pid` is a live (non-zombie) postgres serving `data_dir`."""
    if process_state(pid) in (None, "Z", "X"):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    name = os.path.basename(cmdline[0])
    return name in (b"postgres", b"postmaster") and str(data_dir).encode() in cmdline


def tail(path: Path, max_bytes: int = 4000) -> str:
    """Return the last `max_bytes` of a text file, or '' if it cannot be read."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class DevPostgres:
    """Start/stop the dev cluster and create/drop databases in it."""

    def __init__(self, cluster_dir: Path = DEFAULT_CLUSTER_DIR, port: int = PORT) -> None:
        """Prepare (not start) a cluster in `cluster_dir` listening on 127.0.0.1:`port`."""
        self.cluster_dir = Path(cluster_dir).resolve()
        self.port = port
        self.data_dir = self.cluster_dir / DATA_DIR
        self.log_file = self.cluster_dir / LOG_FILE
        self.socket_dir = self.cluster_dir / SOCKET_DIR
        self.as_root = os.geteuid() == 0
        # The cluster's superuser role is named after the OS user the server runs as.
        self.owner = SERVER_USER if self.as_root else pwd.getpwuid(os.geteuid()).pw_name
        self.url = database_url(DATABASE, port)
        self.admin_url = (
            f"postgresql://{quote(self.owner)}@/postgres"
            f"?host={quote(str(self.socket_dir))}&port={port}"
        )
        self._bindir: Path | None = None

    # ---- state -------------------------------------------------------------------------

    @property
    def bindir(self) -> Path:
        """The server binaries: those of the data dir's version when it exists."""
        if self._bindir is None:
            try:
                version: str | None = (self.data_dir / "PG_VERSION").read_text().strip()
            except OSError:
                version = None
            self._bindir = find_bindir(version)
        return self._bindir

    def pid(self) -> int | None:
        """Return the postmaster's pid per its postmaster.pid, or None."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        """Tell whether a postgres serving this cluster's data dir is alive."""
        pid = self.pid()
        return pid is not None and is_live_postmaster(pid, self.data_dir)

    def ready(self) -> bool:
        """Tell whether the server accepts connections on 127.0.0.1:port (pg_isready)."""
        cmd = [str(self.bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port), "-t", "2"]
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0

    def database_url(self, name: str) -> str:
        """Return the URL of database `name` in this cluster, as the otp role."""
        return database_url(name, self.port)

    # ---- lifecycle ---------------------------------------------------------------------

    def up(self, timeout: float = START_TIMEOUT) -> None:
        """Create the cluster if needed, start it, and wait until it accepts connections."""
        deadline = time.monotonic() + timeout
        try:
            if self.running():
                self._wait_ready(deadline)  # it may be starting
                return
            self._prepare_dirs()
            with self._locked():
                if self.running():  # started meanwhile by someone else
                    self._wait_ready(deadline)
                    return
                if not (self.data_dir / "PG_VERSION").is_file():
                    self._initdb()
                self._write_config()
                self._wait_for_dead_postmaster(deadline)
                self._start(timeout)
                self._wait_ready(deadline)
                self._provision()
        except OSError as exc:
            raise RuntimeError(f"dev postgres: {exc}") from exc

    def down(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (`pg_ctl stop -m fast`) if it runs; idempotent."""
        if not self.running():
            return
        with self._locked():
            if not self.running():
                return
            cmd = [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-s"]
            cmd += ["-m", "fast", "-w", "-t", str(max(1, int(timeout)))]
            done = self._server_run(cmd, timeout + 10)
            if done.returncode != 0 and self.running():
                raise RuntimeError(
                    f"dev postgres: pg_ctl stop failed: {done.stderr.strip()}\n"
                    f"{tail(self.log_file)}"
                )

    # ---- databases ---------------------------------------------------------------------

    def psql(self, script: str, **variables: str) -> str:
        """Run `script` through psql as the superuser over the socket; return its output.

        `variables` become psql variables: interpolate them as :'name' (a literal) or
        :"name" (an identifier), never by formatting them into the script.
        """
        cmd = [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        for name, value in variables.items():
            cmd += ["-v", f"{name}={value}"]
        cmd += ["-d", self.admin_url]
        done = subprocess.run(
            cmd, input=script, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
        if done.returncode != 0:
            raise RuntimeError(f"dev postgres: psql failed: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str, *, replace: bool = False) -> str:
        """Create database `name` owned by otp (first dropping it if `replace`); return its URL."""
        check_database_name(name)
        drop = 'DROP DATABASE IF EXISTS :"name" WITH (FORCE);\n' if replace else ""
        self.psql(drop + 'CREATE DATABASE :"name" OWNER :"role";\n', name=name, role=ROLE)
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drop database `name` if it exists, disconnecting its sessions (WITH (FORCE))."""
        check_database_name(name)
        self.psql('DROP DATABASE IF EXISTS :"name" WITH (FORCE);\n', name=name)

    # ---- helpers -----------------------------------------------------------------------

    def _server_ids(self) -> tuple[int, int]:
        """Return the uid and gid the server runs as."""
        if not self.as_root:
            return os.geteuid(), os.getegid()
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise RuntimeError(
                f"dev postgres: running as root, but there is no `{SERVER_USER}` system user "
                "to run the server as (PostgreSQL refuses root); the Debian postgresql "
                "package creates it: apt-get install postgresql"
            ) from None
        return entry.pw_uid, entry.pw_gid

    def _server_cmd(self, cmd: Sequence[str]) -> list[str]:
        """Return `cmd` prefixed to run as the server user (runuser when we are root)."""
        if not self.as_root:
            return list(cmd)
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        return [runuser, "-u", SERVER_USER, "--", *cmd]

    def _server_run(self, cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run `cmd` as the server user from the cluster dir, capturing its output."""
        return subprocess.run(
            self._server_cmd(cmd),
            cwd=self.cluster_dir,  # the server user may not be able to enter our cwd
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _prepare_dirs(self) -> None:
        """Create the cluster and socket dirs, owned by the server user, mode 0700."""
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path).encode()) > MAX_SOCKET_PATH:
            raise RuntimeError(
                f"dev postgres: unix socket path {socket_path} is longer than "
                f"{MAX_SOCKET_PATH} bytes; move the repository to a shorter path"
            )
        uid, gid = self._server_ids()
        for path in (self.cluster_dir, self.socket_dir):
            path.mkdir(parents=True, exist_ok=True)
            if self.as_root:
                os.chown(path, uid, gid)
                path.chmod(0o700)
            elif path.stat().st_uid != uid:
                raise RuntimeError(
                    f"dev postgres: {path} belongs to uid {path.stat().st_uid}, not to you "
                    f"(uid {uid}); it was probably created as root: use root, or remove it"
                )
        if self.as_root:
            self._check_server_user_reaches_cluster()

    def _check_server_user_reaches_cluster(self) -> None:
        """Raise RuntimeError naming the directory the server user cannot traverse, if any."""

        def can(test: str, path: Path) -> bool:
            """Tell whether `test -<test> path` succeeds as the server user."""
            done = self._server_run(["test", test, str(path)], 10)
            return done.returncode == 0

        if can("-w", self.cluster_dir) and can("-x", self.cluster_dir):
            return
        for path in reversed(self.cluster_dir.parents):
            if not can("-x", path):
                st = path.stat()
                raise RuntimeError(
                    f"dev postgres: the `{SERVER_USER}` user (which runs the server, since "
                    f"PostgreSQL refuses root) cannot traverse {path} (mode "
                    f"{st.st_mode & 0o7777:04o}, uid {st.st_uid}, gid {st.st_gid}): "
                    f"chmod o+x {path}, or put the repository elsewhere"
                )
        raise RuntimeError(
            f"dev postgres: the `{SERVER_USER}` user cannot write to {self.cluster_dir}"
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the cluster dir's lock file."""
        with (self.cluster_dir / LOCK_FILE).open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def _initdb(self) -> None:
        """Create the data dir with initdb (in a temporary dir, renamed when complete)."""
        tmp = self.cluster_dir / INITDB_DIR
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted initdb
        cmd = [str(self.bindir / "initdb"), "-D", str(tmp), "-U", self.owner]
        cmd += ["--encoding=UTF8", "--locale=C.UTF-8"]  # whatever the caller's LANG says
        cmd += ["--auth-local=trust", "--auth-host=scram-sha-256"]  # replaced by _write_config
        cmd += ["--no-sync", "--no-instructions"]  # throwaway: no fsync of the new files
        done = self._server_run(cmd, COMMAND_TIMEOUT)
        if done.returncode != 0:
            raise RuntimeError(f"dev postgres: initdb failed:\n{done.stdout}{done.stderr}")
        with (tmp / "postgresql.conf").open("a") as fh:
            fh.write(f"\ninclude '{SETTINGS_FILE}'  # written by tests/pg.py\n")
        tmp.rename(self.data_dir)

    def _write_config(self) -> None:
        """Write the dev settings and pg_hba.conf into the data dir (before each start)."""
        settings = dict(SETTINGS, port=str(self.port))
        settings["unix_socket_directories"] = "'{}'".format(str(self.socket_dir).replace("'", "''"))
        lines = ["# Written by tests/pg.py before each start: edit that instead."]
        lines += [f"{name} = {value}" for name, value in settings.items()]
        self._write_server_file(self.data_dir / SETTINGS_FILE, "\n".join(lines) + "\n")
        hba = (
            "# Written by tests/pg.py before each start: edit that instead.\n"
            "# The superuser over the socket, whose dir only the server user (and root) enter;\n"
            "# everyone else with a password over TCP from loopback.\n"
            f'local all "{self.owner}" trust\n'
            f"host all all {HOST}/32 scram-sha-256\n"
        )
        self._write_server_file(self.data_dir / "pg_hba.conf", hba)

    def _write_server_file(self, path: Path, text: str) -> None:
        """Write `path` (mode 0600), owned by the server user."""
        path.write_text(text)
        path.chmod(0o600)
        if self.as_root:
            os.chown(path, *self._server_ids())

    def _wait_for_dead_postmaster(self, deadline: float) -> None:
        """Wait while a killed postmaster is a zombie: postgres would take it for alive."""
        pid = self.pid()
        # Its parent is init once pg_ctl has exited; some inits reap only every few seconds.
        while pid is not None and process_state(pid) == "Z" and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)

    def _start(self, timeout: float) -> None:
        """Start the server with pg_ctl and wait until it reports ready."""
        cmd = [str(self.bindir / "pg_ctl"), "start", "-D", str(self.data_dir), "-s"]
        cmd += ["-l", str(self.log_file), "-w", "-t", str(max(1, int(timeout)))]
        done = self._server_run(cmd, timeout + 10)
        if done.returncode != 0:
            raise RuntimeError(
                f"dev postgres: pg_ctl start failed: {done.stderr.strip()}\n"
                f"--- {self.log_file} (tail) ---\n{tail(self.log_file)}"
            )

    def _wait_ready(self, deadline: float) -> None:
        """Poll pg_isready over TCP until it succeeds or `deadline` passes."""
        while not self.ready():
            if not self.running() or time.monotonic() >= deadline:
                state = "running" if self.running() else "not running"
                raise RuntimeError(
                    f"dev postgres: no connection on {HOST}:{self.port} (server {state})\n"
                    f"--- {self.log_file} (tail) ---\n{tail(self.log_file)}"
                )
            time.sleep(POLL_INTERVAL)

    def _provision(self) -> None:
        """Create (or fix) the otp role and its database."""
        self.psql(PROVISION_SQL, role=ROLE, password=PASSWORD, db=DATABASE)


def check_database_name(name: str) -> None:
    """Raise ValueError unless `name` is a plain, unprotected database name."""
    if not DATABASE_NAME.fullmatch(name):
        raise ValueError(f"database name {name!r} must match {DATABASE_NAME.pattern}")
    if name in PROTECTED_DATABASES:
        raise ValueError(f"database {name!r} belongs to the dev cluster itself")


# ---- CLI -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI: up | down | status | url."""
    parser = argparse.ArgumentParser(description="Dev/test PostgreSQL cluster for otp-gateway.")
    parser.add_argument("action", choices=["up", "down", "status", "url"])
    args = parser.parse_args(argv)
    pg = DevPostgres()
    if args.action == "url":
        print(pg.url)
        return 0
    if args.action == "status":
        if pg.running():
            print(f"dev postgres running (pid {pg.pid()}, {pg.url}, log {pg.log_file})")
            return 0
        print("dev postgres not running")
        return 1
    try:
        if args.action == "up":
            if pg.running():
                print(f"dev postgres already running (pid {pg.pid()}): {pg.url}")
                return 0
            started = time.monotonic()
            pg.up()
            took = time.monotonic() - started
            print(f"dev postgres up in {took:.1f} s (pid {pg.pid()}, log {pg.log_file}): {pg.url}")
            return 0
        was_running = pg.running()
        pg.down()
        print("dev postgres stopped" if was_running else "dev postgres not running")
        return 0
    except (RuntimeError, OSError) as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
