"""Session fixtures: the dev PBX (a real Asterisk 22), the SIPp far ends, and the dev
PostgreSQL; a new database per test on each backend.

Each process starts once per test session and stops at its end, unless it was already
running (a developer's `make pbx-up` / `make farend-up` / `make pg-up`), in which case
it is reused and left running. When one cannot start, the tests that need it fail:
they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway import config as gateway_config
from gateway.config import AsteriskConfig, Config, DatabaseConfig, PoolConfig, SecurityConfig
from gateway.pbx import AmiSettings
from gateway.pool import Pool
from gateway.store import (
    CallRecord,
    CallStatus,
    VerificationRecord,
    VerificationStatus,
    sqlite_path,
)
from tests.farend import FarEnd, InviteRecord, format_record
from tests.pg import DevPostgres

REPO = Path(__file__).resolve().parent.parent
PBX_SCRIPT = REPO / "asterisk-config" / "dev" / "pbx.sh"
FAREND_WORKDIR = REPO / ".cache" / "farend"
FIELD_WORKDIR = REPO / ".cache" / "field-end"
VOICE_WORKDIR = REPO / ".cache" / "voice-end"
ROUTES_WORKDIR = REPO / ".cache" / "routes-end"

DEV_AMI = AmiSettings(
    host="127.0.0.1",
    port=5038,
    username="otp-gateway",
    secret="otp-dev-secret",  # noqa: S106 - the dev PBX's fixed loopback-only secret
    channel="PJSIP/{number}@otp-trunk",
    settle_seconds=0,  # pbx.sh up returns once Asterisk is fully booted
)
# The pool prefix the dev config uses: +62 21 500 xxxx (Jakarta, a fixed-line block).
DEV_CLI_PREFIX = "6221500"


def _pbx(command: str, node: str = "a") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(PBX_SCRIPT), command, node], capture_output=True, text=True, timeout=600
    )


def _node(node: str, ami: AmiSettings) -> Iterator[AmiSettings]:
    """Asterisk node `node` of the dev bed, up for the session (started if it was not)."""
    was_running = _pbx("status", node).returncode == 0
    started = _pbx("up", node)
    if started.returncode != 0:
        pytest.fail(
            f"dev PBX node {node} did not start:\n{started.stdout}\n{started.stderr}",
            pytrace=False,
        )
    yield ami
    if not was_running:
        stopped = _pbx("down", node)
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="session")
def dev_pbx() -> Iterator[AmiSettings]:
    """The dev Asterisk (node a), logged in over AMI; started for the session if it was
    not up."""
    yield from _node("a", DEV_AMI)


@pytest.fixture(scope="session")
def dev_pbx_b() -> Iterator[AmiSettings]:
    """Node b of the dev bed: a second Asterisk from the same root, AMI 127.0.0.1:5039,
    SIP 5061, trunking to the same far end (make cluster-up)."""
    yield from _node("b", dataclasses.replace(DEV_AMI, port=5039))


def _serve(far: FarEnd, name: str) -> Iterator[FarEnd]:
    """Start `far` unless it runs already; stop it afterwards only if it was started here."""
    was_running = far.running()
    if not was_running:
        try:
            far.start()
        except RuntimeError as exc:
            pytest.fail(f"{name} did not start: {exc}", pytrace=False)
    yield far
    if not was_running:
        far.stop()


@pytest.fixture(scope="session")
def far_end() -> Iterator[FarEnd]:
    """The SIPp far end on 127.0.0.1:5070 (endpoint otp-trunk), recording every INVITE."""
    yield from _serve(FarEnd(FAREND_WORKDIR), "far end")


@pytest.fixture(scope="session")
def field_end() -> Iterator[FarEnd]:
    """The field far end on 127.0.0.1:5071 (endpoint otp-field): real networks' behaviours.

    Dial it with the channel `PJSIP/{number}@otp-field`; see tests/sipp/README.md.
    """
    yield from _serve(FarEnd.field(FIELD_WORKDIR), "field far end")


# The voice far end's fixed settings (tests/sipp/voice.xml): voice calls come from
# VOICE_CLI, and the RTP Asterisk sends them goes to 127.0.0.1:VOICE_RTP_PORT, where a
# test that listens binds (tests/rtp.py). Outside Asterisk's RTP range and SIPp's.
VOICE_CLI = "+622150009999"
VOICE_RTP_PORT = 5098


@pytest.fixture(scope="session")
def voice_end() -> Iterator[FarEnd]:
    """The voice far end on 127.0.0.1:5072 (endpoint otp-voice): answers voice calls
    from VOICE_CLI with its audio sent to VOICE_RTP_PORT; rings or refuses flash calls.

    Dial it with the channel `PJSIP/{number}@otp-voice`; see tests/sipp/README.md.
    """
    yield from _serve(
        FarEnd.voice(VOICE_WORKDIR, rtp_port=VOICE_RTP_PORT, voice_cli=VOICE_CLI), "voice far end"
    )


# The routes far end (tests/sipp/routes.xml) refuses, with 603, the calls from one pool's
# caller IDs to the numbers TELKOMSEL matches, and rings every other call.
TELKOMSEL = "^62(811|812|813|821|822|823|851|852|853)"


class RoutesEnd:
    """The routes far end on 127.0.0.1:5073 (endpoint otp-route), restarted with another
    rule when a test changes what the network refuses."""

    def __init__(self) -> None:
        self.far: FarEnd | None = None  # the running one
        # What the ones stopped received (the next one's start clears the shared log).
        self._past: list[InviteRecord] = []

    def start(self, reject_from: str, reject_to: str = TELKOMSEL) -> FarEnd:
        """(Re)start it refusing calls from `reject_from` (digits, or "none") to `reject_to`."""
        self.stop()
        far = FarEnd.routes(ROUTES_WORKDIR, reject_from=reject_from, reject_to=reject_to)
        try:
            far.start()
        except RuntimeError as exc:
            pytest.fail(f"routes far end did not start: {exc}", pytrace=False)
        self.far = far
        return far

    def stop(self) -> None:
        if self.far is not None:
            self._past.extend(self.far.records())
            self.far.stop()
            self.far = None

    def records(self) -> list[InviteRecord]:
        """What every far end started here received, oldest first."""
        return [*self._past, *(self.far.records() if self.far is not None else [])]


@pytest.fixture
def routes_end() -> Iterator[RoutesEnd]:
    """The routes far end, stopped after the test. Dial it with `PJSIP/{number}@otp-route`."""
    stale = FarEnd.routes(ROUTES_WORKDIR)
    if stale.running():  # left by a test process that was killed
        stale.stop()
    end = RoutesEnd()
    yield end
    end.stop()


@pytest.fixture(scope="session")
def dev_postgres() -> Iterator[DevPostgres]:
    """The dev PostgreSQL (make pg-up); started for the session if it was not up."""
    postgres = DevPostgres()
    was_running = postgres.running()
    if not was_running:
        try:
            postgres.up()
        except RuntimeError as exc:
            pytest.fail(f"dev PostgreSQL did not start: {exc}", pytrace=False)
    yield postgres
    if not was_running:
        postgres.down()


BACKENDS = ("sqlite", "postgresql")
_databases = itertools.count()

NewDatabase = Callable[[], str]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each test that asks for a database runs once on each backend."""
    return str(request.param)


@pytest.fixture
def new_database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[NewDatabase]:
    """Make new, empty databases (URLs) on the test's backend; dropped after it."""
    if backend == "sqlite":
        yield lambda: f"sqlite:///{tmp_path / f'gateway-{next(_databases)}.sqlite3'}"
        return
    postgres: DevPostgres = request.getfixturevalue("dev_postgres")
    made: list[str] = []

    def new() -> str:
        made.append(f"test_{os.getpid()}_{next(_databases)}")
        return postgres.create_database(made[-1])

    yield new
    for name in made:
        postgres.drop_database(name)


@pytest.fixture
def database(new_database: NewDatabase) -> str:
    """A new, empty database for the test: a sqlite:/// or a postgresql:// URL."""
    return new_database()


async def raw_query(database: str, sql: str) -> list[tuple[Any, ...]]:
    """Read `database` on a second, plain connection: what is really stored."""
    if database.startswith("postgresql://"):
        conn = await asyncpg.connect(database)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()
    with contextlib.closing(sqlite3.connect(sqlite_path(database))) as db:
        return db.execute(sql).fetchall()


async def dump(database: str) -> dict[str, tuple[list[str], list[tuple[Any, ...]]]]:
    """Every table of `database`: its columns and rows, read as raw_query reads."""
    postgres = database.startswith("postgresql://")
    tables = await raw_query(
        database,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        if postgres
        else "SELECT name FROM sqlite_master WHERE type = 'table'",
    )
    dumped = {}
    for (table,) in tables:
        columns = await raw_query(
            database,
            "SELECT column_name FROM information_schema.columns "
            f"WHERE table_schema = 'public' AND table_name = '{table}'"
            if postgres
            else f"SELECT name FROM pragma_table_info('{table}')",
        )
        rows = await raw_query(database, f"SELECT * FROM {table}")
        dumped[str(table)] = ([str(c[0]) for c in columns], rows)
    return dumped


async def stored_bytes(database: str) -> bytes:
    """What a copy of the database holds: SQLite's files (with the WAL) as they are on
    disk; PostgreSQL's rows, as text."""
    if database.startswith("postgresql://"):
        dumped = await dump(database)
        return repr(dumped).encode()
    path = Path(sqlite_path(database))
    return b"".join(p.read_bytes() for p in path.parent.glob(f"{path.name}*"))


# The code secret of make_config's configs: HMAC key of the codes the tests store.
TEST_CODE_SECRET = "unit-test-code-secret-0123456789"  # noqa: S105 - a test's HMAC key
# The pool of make_config's configs: 4-digit codes behind +62 21 500 (Jakarta).
TEST_POOL = PoolConfig(name="default", prefix="+6221500", code_length=4)


def make_config(
    database: str | DatabaseConfig, *, checked: bool = True, **overrides: Any
) -> Config:
    """A valid gateway Config for a unit test, on `database` (a URL, or a whole
    DatabaseConfig for its other settings).

    The PBX is a fake, so the AMI secret is never used; one pool (TEST_POOL); the code
    secret TEST_CODE_SECRET; everything else the gateway's defaults. Each keyword
    replaces the Config field of its name: make_config(url, calls=CallsConfig(...)).
    The result passes the checks a YAML file goes through, or the test fails here:
    no test runs on a configuration the gateway would refuse to start with, unless it
    says so (`checked=False`: a TTL of seconds, to watch an expiry happen)."""
    if isinstance(database, str):
        database = DatabaseConfig(url=database)
    defaults: dict[str, Any] = {
        "asterisk": AsteriskConfig(secret="unused"),  # noqa: S106 - the PBX is fake
        "pools": (TEST_POOL,),
        "security": SecurityConfig(code_secret=TEST_CODE_SECRET),
        "database": database,
    }
    config = Config(**(defaults | overrides))
    if checked:
        problems = gateway_config._check(config)
        assert not problems, f"make_config made an invalid config: {problems}"
    return config


# The phone and the instant of make_verification's and make_call's records, unless told.
TEST_PHONE = "+6281234567890"
TEST_T0 = 1_700_000_000.0
# What a verification of TEST_POOL tells of its caller ID, as the gateway derives it.
_TEST_CLI = Pool(TEST_POOL).shape


def make_verification(
    vid: str = "vrf_1",
    *,
    phone: str = TEST_PHONE,
    created_at: float = TEST_T0,
    **overrides: Any,
) -> VerificationRecord:
    """A pending verification of TEST_POOL, as the gateway stores it, for a unit test.

    API key key_1, region ID, no reference or callback URL, the code's HMAC
    "hmac-of-code", 5 attempts; created (and last updated) at `created_at`, expiring
    300 s later. Each keyword replaces the VerificationRecord field of its name:
    make_verification("vrf_2", callback_url=url, carrier="Telkomsel")."""
    fields: dict[str, Any] = {
        "id": vid,
        "api_key_id": "key_1",
        "phone": phone,
        "region": "ID",
        "reference": None,
        "callback_url": None,
        "status": VerificationStatus.PENDING,
        "code_hash": "hmac-of-code",
        "pool": TEST_POOL.name,
        "cli_prefix": _TEST_CLI.prefix,
        "cli_length": _TEST_CLI.length,
        "cli_pattern": _TEST_CLI.pattern,
        "attempts_remaining": 5,
        "created_at": created_at,
        "expires_at": created_at + 300,
        "updated_at": created_at,
    }
    return VerificationRecord(**(fields | overrides))


def make_call(
    call_id: str = "call_1",
    verification_id: str = "vrf_1",
    *,
    phone: str = TEST_PHONE,
    queued_at: float = TEST_T0,
    **overrides: Any,
) -> CallRecord:
    """The queued call of verification `verification_id` to `phone`, for a unit test.

    It dials `phone` without its + (dial_number=... replaces that) and rings 8 s; it is
    queued at `queued_at` and owned by no gateway. Each keyword replaces the CallRecord
    field of its name: make_call("call_2", "vrf_2", owner="gw-a", ring_seconds=1)."""
    fields: dict[str, Any] = {
        "id": call_id,
        "verification_id": verification_id,
        "status": CallStatus.QUEUED,
        "dial_number": phone[1:],
        "ring_seconds": 8,
        "queued_at": queued_at,
    }
    return CallRecord(**(fields | overrides))


# What a broken constraint raises, on either backend.
INTEGRITY_ERRORS = (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError)


_used_numbers: set[str] = set()


def phone_number(behaviour: int, network: str = "812", block: str | None = None) -> str:
    """A fresh Indonesian mobile number (no +) whose last digit picks the far end's behaviour.

    See tests/sipp/README.md: 0 rings, 1 progress only, 2 answers, 3 busy, 4 not found, ...
    on the lab far end; the field far end (`field_end`) gives the digits other meanings.
    `network` is the mobile prefix: 812 Telkomsel, 815 Indosat, 817 XL, 881 Smartfren.
    With `block` (digits, no +), a number that starts with it, as long as the others.
    """
    prefix = block or f"62{network}"
    free = 13 - len(prefix) - 1  # digits drawn, between the prefix and `behaviour`
    # Random, not sequential: consecutive numbers share a prefix, and the gateway's
    # per-prefix limit (range walking) would refuse a test's twenty-first call. Never one
    # handed out before in this session: the far end's records outlive each test.
    while True:
        number = f"{prefix}{random.randrange(10**free):0{free}d}{behaviour}"
        if number not in _used_numbers:
            _used_numbers.add(number)
            return number


async def wire_record(
    far_end: FarEnd,
    number: str,
    settled: Callable[[InviteRecord], bool] = lambda r: r.final_code is not None,
    timeout: float = 5.0,
    count: int = 1,
) -> InviteRecord:
    """The newest INVITE the far end got for `number`, once `count` came and all settled.

    Polls without blocking the event loop: an in-process gateway must keep dialing.
    """
    deadline = time.monotonic() + timeout
    while True:
        calls = far_end.calls_to(number)
        if len(calls) >= count and all(settled(r) for r in calls):
            assert len(calls) == count, f"{number} was called {len(calls)} times, not {count}"
            return calls[-1]
        if time.monotonic() > deadline:
            shown = "\n".join(format_record(r) for r in calls) or "no INVITE"
            raise AssertionError(f"far end, {number}: not settled within {timeout}s: {shown}")
        await asyncio.sleep(0.02)


def pbx_command(command: str, node: str = "a") -> None:
    """Run `pbx.sh command node` (up, kill, ...) for a fault test; fail the test if it fails."""
    result = _pbx(command, node)
    assert result.returncode == 0, f"pbx.sh {command} {node}: {result.stdout}{result.stderr}"
