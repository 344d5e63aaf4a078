"""Every SQL statement: schema migrations and queries, on aiosqlite in WAL mode.

One connection, opened by aiosqlite. Each operation (a query, or a whole transaction)
is one function, queued; the queue is run in batches, one batch at a time, so a
transaction never interleaves with another's statements. A batch of short operations
(lookups by key, a call's few rows) runs on the event loop and never waits for a lock;
any other batch, or one that meets a lock, runs in aiosqlite's thread (Store._run).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite

from gateway.outcomes import CANCELED, about_number

T = TypeVar("T")
log = logging.getLogger(__name__)
# aiosqlite logs each operation at debug level with its arguments and, once done, its
# result: rows with phone numbers. Like the AMI wire, it is never logged, at any level.
logging.getLogger("aiosqlite").setLevel(logging.WARNING)

# API keys looked up within this many seconds are not looked up again (one query per
# request was a tenth of the API's cost); KEY_CACHE_SIZE bounds the answers kept.
KEY_CACHE_S = 1.0
KEY_CACHE_SIZE = 10_000

CHECKPOINT_INTERVAL_S = 1.0
WAL_SIZE_LIMIT = 64 * 2**20  # the log file is cut back to this after a checkpoint
# How long a write nobody is waiting on (a call's ringing, its end) may wait for others
# to share its commit. A commit costs about ten write syscalls whatever it holds.
LAZY_WRITE_S = 0.02

# How long a statement waits for another process holding the write lock (the CLI's
# `keys create` while the gateway runs) before failing.
BUSY_TIMEOUT_MS = 5000

# The database holds phone numbers and key hashes: for the gateway's user alone. SQLite
# gives the -wal and -shm files it creates the mode of the database file.
DATABASE_FILE_MODE = 0o600
DATABASE_DIR_MODE = 0o700

MIGRATIONS: tuple[str, ...] = (
    # 1: API keys, verifications, calls and their event timeline.
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        key_hash TEXT NOT NULL UNIQUE,      -- SHA-256 of the key; the key is shown once
        created_at REAL NOT NULL,
        revoked_at REAL
    );
    CREATE TABLE verifications (
        id TEXT PRIMARY KEY,
        api_key_id TEXT NOT NULL,
        phone TEXT NOT NULL,                -- E.164
        region TEXT NOT NULL,
        reference TEXT,
        callback_url TEXT,
        status TEXT NOT NULL,
        code_hash TEXT NOT NULL,            -- HMAC of the code; the code itself is never stored
        pool TEXT NOT NULL,
        cli_prefix TEXT NOT NULL,
        cli_length INTEGER NOT NULL,
        cli_pattern TEXT NOT NULL,
        attempts_remaining INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX verifications_by_phone ON verifications (phone, created_at);
    CREATE INDEX verifications_pending ON verifications (expires_at) WHERE status = 'pending';
    CREATE TABLE calls (
        id TEXT PRIMARY KEY,                -- the ChannelId given to Originate
        verification_id TEXT NOT NULL UNIQUE REFERENCES verifications (id),
        status TEXT NOT NULL,
        dial_number TEXT NOT NULL,
        ring_seconds REAL NOT NULL,
        outcome TEXT,
        hangup_cause INTEGER,
        sip_code INTEGER,
        reason TEXT,
        queued_at REAL NOT NULL,
        dialed_at REAL,
        ringing_at REAL,
        ended_at REAL
    );
    CREATE INDEX calls_live ON calls (status) WHERE status IN ('queued', 'dialing', 'ringing');
    CREATE TABLE call_events (
        call_id TEXT NOT NULL REFERENCES calls (id),
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        cause INTEGER,
        sip_code INTEGER
    );
    CREATE INDEX call_events_by_call ON call_events (call_id, at);
    """,
    # 2: what each call taught about its number, and the carrier for statistics.
    """
    ALTER TABLE verifications ADD COLUMN carrier TEXT;
    CREATE TABLE number_health (
        phone TEXT PRIMARY KEY,             -- E.164
        status TEXT NOT NULL,               -- unknown | reachable | unreachable | invalid
        last_outcome TEXT,
        last_cause INTEGER,
        last_sip_code INTEGER,
        last_call_at REAL,
        last_delivered_at REAL,
        calls INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    );
    CREATE INDEX number_health_by_status ON number_health (status, phone);
    CREATE INDEX calls_by_end ON calls (ended_at);
    """,
    # 3: what the abuse limits count, and where each API key may be used from.
    """
    ALTER TABLE verifications ADD COLUMN phone_prefix TEXT;
    ALTER TABLE verifications ADD COLUMN failed_checks INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE api_keys ADD COLUMN allowed_networks TEXT;   -- CIDRs, comma-separated
    CREATE INDEX verifications_by_prefix ON verifications (phone_prefix, created_at);
    CREATE INDEX verifications_by_key ON verifications (api_key_id, created_at);
    CREATE INDEX verifications_by_time ON verifications (created_at);
    """,
    # 4: Idempotency-Key: the first response to a key, replayed for its retries.
    """
    CREATE TABLE idempotency_keys (
        api_key_id TEXT NOT NULL,
        key TEXT NOT NULL,
        body_hash TEXT NOT NULL,            -- SHA-256 of the canonical JSON body
        status INTEGER NOT NULL,
        response TEXT NOT NULL,             -- the exact body first answered
        created_at REAL NOT NULL,
        PRIMARY KEY (api_key_id, key)
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
    """,
    # 5: the webhook outbox, written in the transaction of the change it reports.
    """
    CREATE TABLE webhook_outbox (
        id TEXT PRIMARY KEY,                -- webhook-id: the same on every redelivery
        verification_id TEXT NOT NULL REFERENCES verifications (id),
        url TEXT NOT NULL,
        type TEXT NOT NULL,                 -- verification.delivered, ...
        payload TEXT,                       -- fixed at the first attempt, then resent as is
        created_at REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_status INTEGER,
        last_error TEXT,
        delivered_at REAL,
        given_up_at REAL
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at)
        WHERE delivered_at IS NULL AND given_up_at IS NULL;
    CREATE INDEX webhook_outbox_by_verification ON webhook_outbox (verification_id);
    """,
    # 6: sandbox verifications (config test_numbers): never dialed, fixed code.
    """
    ALTER TABLE verifications ADD COLUMN sandbox INTEGER NOT NULL DEFAULT 0;
    """,
    # 7: what every create looks up stays small as the history grows (make bench).
    # A phone's pending verifications (superseded by a new one), without its history.
    # Calls per API key and minute: the rolling day's budget sums at most 1,441 rows
    # instead of walking up to key_daily_calls verifications.
    """
    CREATE INDEX verifications_pending_by_phone ON verifications (phone, api_key_id)
        WHERE status = 'pending';
    DROP INDEX verifications_by_key;        -- its one reader now reads key_usage
    CREATE TABLE key_usage (
        api_key_id TEXT NOT NULL,
        minute INTEGER NOT NULL,            -- unix time // 60
        calls INTEGER NOT NULL,
        PRIMARY KEY (api_key_id, minute)
    ) WITHOUT ROWID;
    INSERT INTO key_usage (api_key_id, minute, calls)
        SELECT api_key_id, CAST(created_at / 60 AS INTEGER), COUNT(*) FROM verifications
        WHERE NOT sandbox GROUP BY 1, 2;
    """,
    # 8: the global and per-prefix windows in O(log n) whatever their count: every
    # dialed verification is numbered, overall and within its prefix, so the count-th
    # latest is one index lookup instead of a walk of `count` rows.
    """
    ALTER TABLE verifications ADD COLUMN global_seq INTEGER;
    ALTER TABLE verifications ADD COLUMN prefix_seq INTEGER;
    UPDATE verifications SET global_seq = n.g, prefix_seq = n.p
        FROM (SELECT id,
                     ROW_NUMBER() OVER (ORDER BY created_at, rowid) AS g,
                     ROW_NUMBER() OVER (PARTITION BY phone_prefix
                                        ORDER BY created_at, rowid) AS p
              FROM verifications WHERE NOT sandbox) AS n
        WHERE verifications.id = n.id;
    UPDATE verifications SET prefix_seq = NULL WHERE phone_prefix IS NULL;
    CREATE UNIQUE INDEX verifications_global_seq ON verifications (global_seq)
        WHERE global_seq IS NOT NULL;
    CREATE UNIQUE INDEX verifications_prefix_seq ON verifications (phone_prefix, prefix_seq)
        WHERE prefix_seq IS NOT NULL;
    DROP INDEX verifications_by_prefix;
    DROP INDEX verifications_by_time;
    """,
    # 9: API key scopes and failed checks per key
    # Keys made before scopes keep every right they had (admin); new keys say theirs.
    # A wrong check is a row of its own, at the time it was made, so the windows over
    # them count by key or across keys, and an admin can forget a phone's.
    """
    ALTER TABLE api_keys ADD COLUMN scope TEXT NOT NULL DEFAULT 'admin';  -- verify | admin
    CREATE TABLE check_failures (
        phone TEXT NOT NULL,                -- E.164
        api_key_id TEXT NOT NULL,
        at REAL NOT NULL,
        failures INTEGER NOT NULL           -- 1; more only for the rows carried over here
    );
    CREATE INDEX check_failures_by_phone ON check_failures (phone, at);
    CREATE INDEX check_failures_by_time ON check_failures (at);
    INSERT INTO check_failures (phone, api_key_id, at, failures)
        SELECT phone, api_key_id, updated_at, failed_checks FROM verifications
        WHERE failed_checks > 0
        AND updated_at > CAST(strftime('%s', 'now') AS REAL) - 30 * 86400;
    """,
)

LIVE_CALL_STATUSES = ("queued", "dialing", "ringing")


@dataclass(frozen=True, slots=True)
class WebhookRecord:
    id: str
    verification_id: str
    url: str
    type: str
    payload: str | None
    created_at: float
    next_attempt_at: float
    attempts: int
    last_status: int | None
    last_error: str | None
    delivered_at: float | None
    given_up_at: float | None


VERIFICATION_STATUSES = (
    "pending",
    "approved",
    "canceled",
    "expired",
    "failed",
    "max_attempts_reached",
)

# The verification status each event reports, for the statements that change it.
STATUS_EVENTS = {
    "approved": "verification.approved",
    "max_attempts_reached": "verification.max_attempts_reached",
    "canceled": "verification.canceled",
    "expired": "verification.expired",
    "failed": "verification.failed",
}


def _enqueue(db: sqlite3.Connection, verification_id: str, kind: str, at: float) -> None:
    """An outbox row for `kind` if the verification asked for webhooks; in the caller's
    transaction, so the event exists exactly when the change does."""
    db.execute(
        "INSERT INTO webhook_outbox (id, verification_id, url, type, created_at, "
        "next_attempt_at) SELECT ?, id, callback_url, ?, ?, ? FROM verifications "
        "WHERE id = ? AND callback_url IS NOT NULL",
        ("msg_" + secrets.token_hex(16), kind, at, at, verification_id),
    )


@dataclass(frozen=True, slots=True)
class Idempotency:
    """An Idempotency-Key with its request, and the response to store with the insert."""

    api_key_id: str
    key: str
    body_hash: str
    status: int
    response: str
    since: float  # rows older than this (24 h) no longer count


@dataclass(frozen=True, slots=True)
class Inserted:
    """The verification was stored; these (verification, live call) were superseded."""

    superseded: list[tuple[str, str | None]]


@dataclass(frozen=True, slots=True)
class Limited:
    """A limit was reached; nothing was stored."""

    retry_after: float
    limit: str  # which: phone, phone_prefix, api_key_daily or global


_LIMIT_NAMES = {
    "phone": "phone",
    "phone_prefix": "phone_prefix",
    "api_key_id": "api_key_daily",
    None: "global",
}


@dataclass(frozen=True, slots=True)
class KnownInvalid:
    """The network called the number invalid (number_health); nothing was stored."""

    last_call_at: float
    last_outcome: str | None
    last_cause: int | None


@dataclass(frozen=True, slots=True)
class Replayed:
    """The Idempotency-Key was used before: its stored response; nothing was stored."""

    body_hash: str
    status: int
    response: str


@dataclass(frozen=True, slots=True)
class WindowLimit:
    """At most `count` verifications in `seconds` where `column` equals `value`.

    `column` None counts every verification (a global ceiling).
    """

    column: Literal["phone", "phone_prefix", "api_key_id"] | None
    value: str | None
    count: int
    seconds: float


@dataclass(frozen=True, slots=True)
class CheckLimit:
    """At most `count` wrong checks against one phone in `seconds`: those made with the
    checking verification's API key (`per_key`), or with any key. `name` says which
    limit refused, for the operator's metrics."""

    count: int
    seconds: float
    per_key: bool
    name: str


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: str
    name: str
    key_hash: str
    created_at: float
    revoked_at: float | None
    allowed_networks: str | None = None
    scope: str = "verify"  # verify | admin (apikeys.SCOPES)


@dataclass(frozen=True, slots=True)
class VerificationRecord:
    id: str
    api_key_id: str
    phone: str
    region: str
    reference: str | None
    callback_url: str | None
    status: str
    code_hash: str
    pool: str
    cli_prefix: str
    cli_length: int
    cli_pattern: str
    attempts_remaining: int
    created_at: float
    expires_at: float
    updated_at: float
    carrier: str | None = None
    phone_prefix: str | None = None
    failed_checks: int = 0
    sandbox: bool = False


@dataclass(frozen=True, slots=True)
class NumberHealthRecord:
    phone: str
    status: str
    last_outcome: str | None
    last_cause: int | None
    last_sip_code: int | None
    last_call_at: float | None
    last_delivered_at: float | None
    calls: int
    delivered: int
    updated_at: float


@dataclass(frozen=True, slots=True)
class CallRecord:
    id: str
    verification_id: str
    status: str
    dial_number: str
    ring_seconds: float
    outcome: str | None = None
    hangup_cause: int | None = None
    sip_code: int | None = None
    reason: str | None = None
    queued_at: float = 0.0
    dialed_at: float | None = None
    ringing_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True, slots=True)
class CallEventRecord:
    call_id: str
    at: float
    kind: str
    cause: int | None
    sip_code: int | None


@functools.cache
def _columns(record_type: type[Any]) -> str:
    return ", ".join(f.name for f in fields(record_type))


@functools.cache
def _placeholders(record_type: type[Any]) -> str:
    return ", ".join("?" for _ in fields(record_type))


def _values(record: Any) -> tuple[Any, ...]:
    """A record's fields in column order (dataclasses.astuple deep-copies: slow)."""
    return tuple(getattr(record, f.name) for f in fields(record))


_V_COLS = _columns(VerificationRecord)
_C_COLS = _columns(CallRecord)


def _add_event(
    db: sqlite3.Connection,
    call_id: str,
    at: float | None,
    kind: str,
    cause: int | None = None,
    sip_code: int | None = None,
) -> None:
    """One entry of a call's timeline (CallEventRecord), in the caller's transaction."""
    db.execute(
        f"INSERT INTO call_events ({_columns(CallEventRecord)}) "
        f"VALUES ({_placeholders(CallEventRecord)})",
        (call_id, at, kind, cause, sip_code),
    )


def _next_seqs(db: sqlite3.Connection, prefix: str | None) -> tuple[int, int | None]:
    """The numbers a new dialed verification takes: overall, and within `prefix`."""
    # IS NOT NULL lets the planner read the maximum off the partial index.
    (latest,) = db.execute(
        "SELECT MAX(global_seq) FROM verifications WHERE global_seq IS NOT NULL"
    ).fetchone()
    if prefix is None:
        return (latest or 0) + 1, None
    (in_prefix,) = db.execute(
        "SELECT MAX(prefix_seq) FROM verifications "
        "WHERE phone_prefix = ? AND prefix_seq IS NOT NULL",
        (prefix,),
    ).fetchone()
    return (latest or 0) + 1, (in_prefix or 0) + 1


def _window_full(
    db: sqlite3.Connection, limit: WindowLimit, at: float, seqs: tuple[int, int | None] | None
) -> float | None:
    """Seconds until `limit` has room for one more verification, or None when it has.

    The window is full when the `count`-th latest verification it counts is inside it;
    the global and per-prefix windows find that one by its number (`seqs`: what the new
    one would take), a phone's small windows by walking its few latest rows."""
    row = None
    if limit.column == "phone":
        row = db.execute(
            "SELECT created_at FROM verifications WHERE phone = ? AND NOT sandbox "
            "ORDER BY created_at DESC LIMIT 1 OFFSET ?",
            (limit.value, limit.count - 1),
        ).fetchone()
    elif seqs is not None:
        overall, in_prefix = seqs
        if limit.column is None and overall > limit.count:
            row = db.execute(
                "SELECT created_at FROM verifications WHERE global_seq = ?",
                (overall - limit.count,),
            ).fetchone()
        elif limit.column == "phone_prefix" and in_prefix is not None and in_prefix > limit.count:
            row = db.execute(
                "SELECT created_at FROM verifications WHERE phone_prefix = ? AND prefix_seq = ?",
                (limit.value, in_prefix - limit.count),
            ).fetchone()
    if row is None or row[0] <= at - limit.seconds:
        return None
    # `count` already in the window: room once the oldest of them leaves it.
    return max(1.0, float(row[0]) + limit.seconds - at)


def _key_usage_full(db: sqlite3.Connection, limit: WindowLimit, at: float) -> float | None:
    """Seconds until the key may call again, or None when its window has room.

    Counted by minute: a call made in the window's first minute counts for the whole
    minute, so the budget errs by at most a minute's calls towards refusing."""
    first = int((at - limit.seconds) // 60) + 1
    rows = db.execute(
        "SELECT minute, calls FROM key_usage WHERE api_key_id = ? AND minute >= ? ORDER BY minute",
        (limit.value, first),
    ).fetchall()
    used = sum(calls for _, calls in rows)
    if used < limit.count:
        return None
    for minute, calls in rows:  # the oldest minutes leave the window first
        used -= calls
        if used < limit.count:
            return max(1.0, float((minute + 1) * 60 + limit.seconds - at))
    return float(limit.seconds)


def _check_limits_full(
    db: sqlite3.Connection,
    limits: tuple[CheckLimit, ...],
    phone: str,
    api_key_id: str,
    at: float,
) -> Limited | None:
    """The first of `limits` that the wrong checks against `phone` already fill, with
    the seconds until it has room; None when each has room. A phone has few rows: the
    limits refuse its checks long before they could grow."""
    rows = db.execute(
        "SELECT at, failures, api_key_id = ? FROM check_failures "
        "WHERE phone = ? AND at > ? ORDER BY at",
        (api_key_id, phone, at - max(limit.seconds for limit in limits)),
    ).fetchall()
    for limit in limits:
        counted = [
            (when, n)
            for when, n, mine in rows
            if when > at - limit.seconds and (mine or not limit.per_key)
        ]
        used = sum(n for _, n in counted)
        if used < limit.count:
            continue
        for when, n in counted:  # room once enough of the oldest have left the window
            used -= n
            if used < limit.count:
                return Limited(max(1.0, float(when) + limit.seconds - at), limit.name)
    return None


def _count_key_usage(db: sqlite3.Connection, api_key_id: str, at: float) -> None:
    minute = int(at // 60)
    new = (
        db.execute(
            "INSERT INTO key_usage (api_key_id, minute, calls) VALUES (?, ?, 1) "
            "ON CONFLICT DO UPDATE SET calls = calls + 1 RETURNING calls",
            (api_key_id, minute),
        ).fetchone()[0]
        == 1
    )
    if new:  # once a minute per key: forget the minutes no window looks at (a day)
        db.execute(
            "DELETE FROM key_usage WHERE api_key_id = ? AND minute < ?",
            (api_key_id, minute - 2 * 1440),
        )


def _private_files(path: Path) -> None:
    """Create the database file, in a directory of its own if it has none, for its owner
    alone; make an existing one (and its -wal and -shm) so if others could read it."""
    if not path.parent.exists():
        path.parent.mkdir(mode=DATABASE_DIR_MODE, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DATABASE_FILE_MODE))
    for file in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = file.stat().st_mode & 0o777
        except FileNotFoundError:
            continue
        if not mode & ~DATABASE_FILE_MODE:
            continue
        try:
            file.chmod(DATABASE_FILE_MODE)
        except PermissionError:  # only its owner (or root) may
            log.warning("%s is mode %03o: make it %03o", file, mode, DATABASE_FILE_MODE)
        else:
            log.warning("%s was mode %03o: made it %03o", file, mode, DATABASE_FILE_MODE)


async def _checkpoints(path: str) -> None:
    """Checkpoint the WAL every CHECKPOINT_INTERVAL_S: first beside the writer
    (PASSIVE), then, with little left to copy, restarting the log from its start
    (RESTART holds the writer back only for that little), so it does not grow."""
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            try:
                await db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                await db.execute("PRAGMA wal_checkpoint(RESTART)")
            except sqlite3.Error as exc:  # busy or I/O: the next one catches up
                log.warning("WAL checkpoint failed: %s", exc)
    finally:
        await db.close()


@dataclass(slots=True)
class _Job:
    work: Callable[[sqlite3.Connection], Any]
    write: bool
    quick: bool
    future: asyncio.Future[Any]


def _wake(kick: asyncio.Future[None]) -> None:
    if not kick.done():
        kick.set_result(None)


def _run_waiting(db: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[bool, Any]]:
    """_run_batch in the database thread, where waiting for a lock blocks nobody."""
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return _run_batch(db, jobs)


def _run_quick(db: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[bool, Any]] | None:
    """_run_batch on the event loop, never waiting for a lock (busy_timeout 0): None,
    with nothing done, when another connection holds one (a checkpoint, the CLI)."""
    try:
        done = _run_batch(db, jobs)
    except sqlite3.OperationalError as exc:
        if _busy(exc):
            return None
        raise
    # Reads take no lock up front: a read-only batch that met one is run where it may wait.
    met_lock = any(isinstance(v, sqlite3.OperationalError) and _busy(v) for _, v in done)
    return None if met_lock and not any(job.write for job in jobs) else done


def _busy(exc: sqlite3.OperationalError) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _run_batch(db: sqlite3.Connection, jobs: list[_Job]) -> list[tuple[bool, Any]]:
    """Run `jobs`: each write in a savepoint, all of them in one transaction;
    (True, result) or (False, exception) for each job. A lock that cannot be had
    raises from BEGIN, before anything is done."""
    done: list[tuple[bool, Any]] = []
    writing = any(job.write for job in jobs)
    nested = len(jobs) > 1  # a job alone has the transaction for its savepoint
    if writing:
        db.execute("BEGIN IMMEDIATE")
    try:
        for job in jobs:
            if job.write and nested:
                db.execute("SAVEPOINT job")
            try:
                value = job.work(db)
            except Exception as exc:
                if job.write and nested:
                    db.execute("ROLLBACK TO job")
                    db.execute("RELEASE job")
                done.append((False, exc))
                continue
            if job.write and nested:
                db.execute("RELEASE job")
            done.append((True, value))
        if writing:
            db.execute("COMMIT" if nested or done[0][0] else "ROLLBACK")
    except Exception as exc:  # the database itself failed (disk full, I/O): nothing written
        if db.in_transaction:
            db.execute("ROLLBACK")
        return [(False, exc)] * len(jobs)
    return done


class Store:
    """The gateway's state in one SQLite file."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._jobs: list[_Job] = []  # waiting for the next batch
        self._urgent = False  # a job in _jobs has someone waiting on it
        self._kick: asyncio.Future[None] | None = None  # wakes a drainer holding lazy jobs
        self._lock_wait = True  # the connection's busy_timeout: BUSY_TIMEOUT_MS, or 0
        self._drainer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._keys: dict[str, tuple[float, ApiKeyRecord | None]] = {}  # by key hash
        # Verifications that reached each status through this connection, counted
        # after the commit: /metrics reports them.
        self.status_tally: collections.Counter[str] = collections.Counter()

    @classmethod
    async def open(cls, path: str | Path) -> Store:
        """Open (creating if needed) the database at `path` and migrate it."""
        if str(path) != ":memory:":
            _private_files(Path(path))
        # The loop thread uses the connection too (quick batches), never at the same
        # time as aiosqlite's: one batch at a time, whichever runs it.
        db = await aiosqlite.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # Overwrite deleted content instead of leaving it in free pages.
            await db.execute("PRAGMA secure_delete = ON")
            await db.execute("PRAGMA journal_mode = WAL")
            # NORMAL in WAL mode survives a process crash; only a power cut can lose
            # the last commits.
            await db.execute("PRAGMA synchronous = NORMAL")
            await db.execute("PRAGMA foreign_keys = ON")
            store = cls(db)
            await store._migrate()
            if str(path) != ":memory:":
                # Checkpoints (the WAL copied back into the file) run on a connection
                # of their own, in its own thread, instead of inside a commit now and
                # then: a request never waits for one (make bench: p99).
                await db.execute("PRAGMA wal_autocheckpoint = 0")
                await db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
                store._checkpointer = asyncio.create_task(
                    _checkpoints(str(path)), name="store-checkpoints"
                )
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        """Close the connection, once the work already queued is done."""
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        if self._drainer is not None:
            await asyncio.shield(self._drainer)
        await self._db.close()

    async def ping(self) -> None:
        """Raise when the database cannot answer a query."""
        await self._fetchone("SELECT 1")

    # -- running work in the database thread -----------------------------------

    async def _run(
        self,
        work: Callable[[sqlite3.Connection], T],
        write: bool = False,
        lazy: bool = False,
        quick: bool = False,
    ) -> T:
        """`work(connection)` in the database thread; with `write`, in a transaction of
        its own (a savepoint): committed if it returns, rolled back if it raises.

        Work is run in batches: what queued up while the previous batch ran goes to the
        thread in one hand-off, and the writes of a batch share one commit (a group
        commit). A `lazy` job (a record of something that already happened, that no
        request waits on) waits up to LAZY_WRITE_S for company. A caller is answered
        only after its commit. Should the caller be canceled, its work still completes.

        A batch of `quick` jobs only (lookups by key, a few rows written) runs on the
        event loop itself: the hand-off to the thread costs more than such work, in
        wake-ups and in the GIL passed back and forth at every statement. It never
        waits for a lock there: a batch that meets one goes to the thread instead.
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        job = _Job(work, write, quick, future)
        idle = not self._jobs and (self._drainer is None or self._drainer.done())
        if quick and not lazy and idle:
            # Nothing queued and no batch running: run it now, without a task, a
            # wake-up and an event-loop turn on the way.
            done = self._run_now([job])
            if done is not None:
                ok, value = done[0]
                if ok:
                    return value  # type: ignore[no-any-return]
                raise value
        self._jobs.append(job)
        if not lazy:
            self._urgent = True
            if self._kick is not None and not self._kick.done():
                self._kick.set_result(None)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="store")
        return await future

    async def _write(
        self, work: Callable[[sqlite3.Connection], T], lazy: bool = False, quick: bool = False
    ) -> T:
        return await self._run(work, write=True, lazy=lazy, quick=quick)

    async def _drain(self) -> None:
        db = self._db
        loop = asyncio.get_running_loop()
        while self._jobs:
            if not self._urgent:
                self._kick = kick = loop.create_future()
                timer = loop.call_later(LAZY_WRITE_S, _wake, kick)
                try:
                    await kick
                finally:
                    timer.cancel()
                    self._kick = None
            jobs, self._jobs, self._urgent = self._jobs, [], False
            try:
                # aiosqlite has no public call to run a function in its thread, the
                # connection's owner; `_execute` and `_conn` are what its own methods use
                # (aiosqlite is pinned, and every query of the suite runs through here).
                done = self._run_now(jobs) if all(job.quick for job in jobs) else None
                if done is None:
                    self._lock_wait = True
                    done = await db._execute(_run_waiting, db._conn, jobs)  # type: ignore[no-untyped-call]
            except Exception as exc:  # the connection is closed or broken
                done = [(False, exc)] * len(jobs)
            for job, (ok, value) in zip(jobs, done, strict=True):
                if job.future.done():  # its caller was canceled
                    continue
                if ok:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(value)

    def _run_now(self, jobs: list[_Job]) -> list[tuple[bool, Any]] | None:
        """Quick `jobs` on the event loop (see _run_quick); None: a lock was held."""
        conn: sqlite3.Connection = self._db._conn
        if self._lock_wait:
            conn.execute("PRAGMA busy_timeout = 0")
            self._lock_wait = False
        return _run_quick(conn, jobs)

    async def _fetchone(
        self, sql: str, args: tuple[Any, ...] | list[Any] = (), quick: bool = False
    ) -> Any:
        return await self._run(lambda db: db.execute(sql, args).fetchone(), quick=quick)

    async def _fetchall(
        self, sql: str, args: tuple[Any, ...] | list[Any] = (), quick: bool = False
    ) -> list[Any]:
        return await self._run(lambda db: db.execute(sql, args).fetchall(), quick=quick)

    async def _migrate(self) -> None:
        def migrate(db: sqlite3.Connection) -> None:
            version = (db.execute("PRAGMA user_version").fetchone() or (0,))[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

        await self._write(migrate)

    async def schema_version(self) -> int:
        """The number of migrations applied."""
        row = await self._fetchone("PRAGMA user_version")
        return int(row[0]) if row else 0

    # -- API keys --------------------------------------------------------------

    async def add_api_key(self, key: ApiKeyRecord) -> None:
        await self._write(
            lambda db: db.execute(
                f"INSERT INTO api_keys ({_columns(ApiKeyRecord)}) "
                f"VALUES ({_placeholders(ApiKeyRecord)})",
                _values(key),
            )
        )

    async def api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        """The key with this hash. Answers are kept for KEY_CACHE_S: a key revoked by
        another process (the CLI) stops working within that time, by this one at once."""
        now = time.monotonic()
        cached = self._keys.get(key_hash)
        if cached is not None and now - cached[0] < KEY_CACHE_S:
            return cached[1]
        row = await self._fetchone(
            f"SELECT {_columns(ApiKeyRecord)} FROM api_keys WHERE key_hash = ?",
            (key_hash,),
            quick=True,
        )
        record = ApiKeyRecord(*row) if row else None
        if len(self._keys) >= KEY_CACHE_SIZE:  # unknown keys must not fill memory
            self._keys.clear()
        self._keys[key_hash] = (now, record)
        return record

    async def api_keys(self) -> list[ApiKeyRecord]:
        rows = await self._fetchall(
            f"SELECT {_columns(ApiKeyRecord)} FROM api_keys ORDER BY created_at"
        )
        return [ApiKeyRecord(*row) for row in rows]

    async def revoke_api_key(self, id_or_name: str, at: float) -> int:
        """Revoke keys by id or name; return how many were revoked."""
        self._keys.clear()
        return await self._write(
            lambda db: (
                db.execute(
                    "UPDATE api_keys SET revoked_at = ? "
                    "WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                    (at, id_or_name, id_or_name),
                ).rowcount
            )
        )

    # -- verifications ---------------------------------------------------------

    async def create_verification(
        self,
        verification: VerificationRecord,
        call: CallRecord,
        limits: tuple[WindowLimit, ...] = (),
        idempotency: Idempotency | None = None,
        invalid_since: float | None = None,
    ) -> Inserted | Limited | Replayed | KnownInvalid:
        """Insert a verification and its queued call, canceling the phone's pending ones.

        Only those of the same API key: another service's verification is not ours to end.
        The Idempotency-Key and the limits are looked at in the insert's transaction:
        concurrent retries of one key store one verification, and concurrent requests
        cannot both slip under a limit. With `invalid_since`, a number the network called
        invalid after that time is refused (KnownInvalid), in the same transaction.
        """

        def create(db: sqlite3.Connection) -> Inserted | Limited | Replayed | KnownInvalid:
            if idempotency is not None:
                row = db.execute(
                    "SELECT body_hash, status, response FROM idempotency_keys "
                    "WHERE api_key_id = ? AND key = ? AND created_at > ?",
                    (idempotency.api_key_id, idempotency.key, idempotency.since),
                ).fetchone()
                if row is not None:
                    return Replayed(str(row[0]), int(row[1]), str(row[2]))
            if invalid_since is not None:
                row = db.execute(
                    "SELECT last_call_at, last_outcome, last_cause FROM number_health "
                    "WHERE phone = ? AND status = 'invalid' AND last_call_at > ?",
                    (verification.phone, invalid_since),
                ).fetchone()
                if row is not None:
                    return KnownInvalid(*row)
            seqs = None if verification.sandbox else _next_seqs(db, verification.phone_prefix)
            for limit in limits:
                if limit.column == "api_key_id":
                    retry_after = _key_usage_full(db, limit, verification.created_at)
                else:
                    retry_after = _window_full(db, limit, verification.created_at, seqs)
                if retry_after is not None:
                    return Limited(retry_after, _LIMIT_NAMES[limit.column])
            superseded = [
                (vid, cid if status in LIVE_CALL_STATUSES else None)
                for vid, cid, status in db.execute(
                    "SELECT v.id, c.id, c.status FROM verifications v "
                    "INDEXED BY verifications_pending_by_phone "
                    "LEFT JOIN calls c ON c.verification_id = v.id "
                    "WHERE v.phone = ? AND v.api_key_id = ? AND v.status = 'pending'",
                    (verification.phone, verification.api_key_id),
                ).fetchall()
            ]
            for vid, _ in superseded:
                db.execute(
                    "UPDATE verifications SET status = 'canceled', updated_at = ? WHERE id = ?",
                    (verification.created_at, vid),
                )
                _enqueue(db, vid, STATUS_EVENTS["canceled"], verification.created_at)
            db.execute(
                f"INSERT INTO verifications ({_V_COLS}, global_seq, prefix_seq) "
                f"VALUES ({_placeholders(VerificationRecord)}, ?, ?)",
                (*_values(verification), *(seqs or (None, None))),
            )
            db.execute(
                f"INSERT INTO calls ({_C_COLS}) VALUES ({_placeholders(CallRecord)})",
                _values(call),
            )
            if call.status == "dialing":  # placed as soon as stored (Dialer.claim)
                _add_event(db, call.id, call.dialed_at, "dialing")
            if verification.sandbox:  # its call is delivered as it is stored
                _enqueue(db, verification.id, "verification.delivered", call.queued_at)
            else:
                _count_key_usage(db, verification.api_key_id, verification.created_at)
            if idempotency is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency_keys "
                    "(api_key_id, key, body_hash, status, response, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        idempotency.api_key_id,
                        idempotency.key,
                        idempotency.body_hash,
                        idempotency.status,
                        idempotency.response,
                        verification.created_at,
                    ),
                )
            return Inserted(superseded)

        result = await self._write(create, quick=True)
        if isinstance(result, Inserted):
            self.status_tally["pending"] += 1
            self.status_tally["canceled"] += len(result.superseded)
        return result

    async def idempotent_response(self, api_key_id: str, key: str, since: float) -> Replayed | None:
        """The stored response to an Idempotency-Key used since `since`."""
        row = await self._fetchone(
            "SELECT body_hash, status, response FROM idempotency_keys "
            "WHERE api_key_id = ? AND key = ? AND created_at > ?",
            (api_key_id, key, since),
            quick=True,
        )
        return Replayed(str(row[0]), int(row[1]), str(row[2])) if row else None

    async def forget_idempotency_keys(self, before: float) -> int:
        """Drop Idempotency-Keys older than `before`; return how many."""
        return await self._write(
            lambda db: (
                db.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (before,)).rowcount
            )
        )

    async def forget_verifications(
        self, before: float, after: int, limit: int
    ) -> tuple[int, int | None]:
        """Delete, in one transaction, up to `limit` finished verifications created before
        `before`, with their calls, call events and webhooks; the oldest first, from
        the row after `after`. Returns how many, and the row to go on from (None: done).

        One still pending, with a call still live or a webhook still to deliver, is
        passed over. Rows are walked in insertion (creation) order, without an index
        on created_at that every create would have to write."""

        def forget(db: sqlite3.Connection) -> tuple[int, int | None]:
            rows = db.execute(
                "SELECT v.rowid, v.id, v.created_at, v.status = 'pending' "
                "OR EXISTS (SELECT 1 FROM calls c WHERE c.verification_id = v.id "
                "AND c.status IN ('queued', 'dialing', 'ringing')) "
                "OR EXISTS (SELECT 1 FROM webhook_outbox w WHERE w.verification_id = v.id "
                "AND w.delivered_at IS NULL AND w.given_up_at IS NULL) "
                "FROM verifications v WHERE v.rowid > ? ORDER BY v.rowid LIMIT ?",
                (after, limit),
            ).fetchall()
            ids: list[str] = []
            go_on: int | None = rows[-1][0] if len(rows) == limit else None
            for _, verification_id, created_at, kept in rows:
                if created_at >= before:
                    go_on = None  # the rest is younger
                    break
                if not kept:
                    ids.append(verification_id)
            if ids:
                marks = ",".join("?" * len(ids))
                for statement in (
                    "DELETE FROM call_events WHERE call_id IN "
                    f"(SELECT id FROM calls WHERE verification_id IN ({marks}))",
                    f"DELETE FROM webhook_outbox WHERE verification_id IN ({marks})",
                    f"DELETE FROM calls WHERE verification_id IN ({marks})",
                    f"DELETE FROM verifications WHERE id IN ({marks})",
                ):
                    db.execute(statement, ids)
            return len(ids), go_on

        return await self._write(forget)

    async def verification(
        self, verification_id: str
    ) -> tuple[VerificationRecord, CallRecord] | None:
        return await self._verification_where("v.id = ?", (verification_id,))

    async def newest_pending(
        self, phone: str, api_key_id: str
    ) -> tuple[VerificationRecord, CallRecord] | None:
        """The newest pending verification of `phone` made with `api_key_id`."""
        return await self._verification_where(
            "v.phone = ? AND v.api_key_id = ? AND v.status = 'pending' "
            "ORDER BY v.created_at DESC LIMIT 1",
            (phone, api_key_id),
        )

    async def _verification_where(
        self, where: str, args: tuple[Any, ...]
    ) -> tuple[VerificationRecord, CallRecord] | None:
        v_cols = ", ".join(f"v.{f.name}" for f in fields(VerificationRecord))
        c_cols = ", ".join(f"c.{f.name}" for f in fields(CallRecord))
        row = await self._fetchone(
            f"SELECT {v_cols}, {c_cols} FROM verifications v "
            f"JOIN calls c ON c.verification_id = v.id WHERE {where}",
            args,
            quick=True,
        )
        if row is None:
            return None
        split = len(fields(VerificationRecord))
        return VerificationRecord(*row[:split]), CallRecord(*row[split:])

    async def spend_attempt(
        self,
        verification_id: str,
        approve: bool,
        at: float,
        limits: tuple[CheckLimit, ...] = (),
    ) -> VerificationRecord | Limited | None:
        """Record one check of a pending verification; None when it was not pending.

        A right code approves it; a wrong one spends an attempt, and the last wrong
        attempt moves it to max_attempts_reached. One statement, so two concurrent
        checks can never both spend the same attempt.

        When the phone's wrong checks already fill one of `limits`, nothing is spent and
        the check, right or wrong, is refused (Limited). The count is read and the wrong
        check recorded in one transaction: concurrent checks cannot pass a limit together.
        """

        def spend(db: sqlite3.Connection) -> VerificationRecord | Limited | None:
            if limits:
                checked = db.execute(
                    "SELECT phone, api_key_id FROM verifications "
                    "WHERE id = ? AND status = 'pending' AND expires_at > ?",
                    (verification_id, at),
                ).fetchone()
                if checked is None:
                    return None
                refused = _check_limits_full(db, limits, checked[0], checked[1], at)
                if refused is not None:
                    return refused
            row = db.execute(
                "UPDATE verifications SET "
                "attempts_remaining = attempts_remaining - CASE WHEN ? THEN 0 ELSE 1 END, "
                "failed_checks = failed_checks + CASE WHEN ? THEN 0 ELSE 1 END, "
                "status = CASE WHEN ? THEN 'approved' "
                "WHEN attempts_remaining <= 1 THEN 'max_attempts_reached' ELSE status END, "
                "updated_at = ? "
                f"WHERE id = ? AND status = 'pending' AND expires_at > ? RETURNING {_V_COLS}",
                (approve, approve, approve, at, verification_id, at),
            ).fetchone()
            record = VerificationRecord(*row) if row else None
            if record is not None and record.status in STATUS_EVENTS:
                _enqueue(db, verification_id, STATUS_EVENTS[record.status], at)
            if record is not None and not approve:
                db.execute(
                    "INSERT INTO check_failures (phone, api_key_id, at, failures) "
                    "VALUES (?, ?, ?, 1)",
                    (record.phone, record.api_key_id, at),
                )
                if limits:  # what no window looks at any more: every phone's, by index
                    db.execute(
                        "DELETE FROM check_failures WHERE at <= ?",
                        (at - max(limit.seconds for limit in limits),),
                    )
            return record

        record = await self._write(spend, quick=True)
        if isinstance(record, VerificationRecord) and record.status != "pending":
            self.status_tally[record.status] += 1
        return record

    async def reset_check_failures(self, phone: str) -> int:
        """Forget the wrong checks against `phone`, every key's; return how many."""

        def forget(db: sqlite3.Connection) -> int:
            forgotten = db.execute(
                "DELETE FROM check_failures WHERE phone = ? RETURNING failures", (phone,)
            ).fetchall()
            return sum(int(row[0]) for row in forgotten)

        return await self._write(forget)

    async def calls_by_key(self, since: float) -> dict[str, int]:
        """Calls (verifications not in the sandbox) requested since `since`, per API key,
        to the minute."""
        rows = await self._fetchall(
            "SELECT api_key_id, SUM(calls) FROM key_usage WHERE minute >= ? GROUP BY 1",
            (int(since // 60),),
        )
        return {str(key): int(n) for key, n in rows}

    async def replace_code(self, verification_id: str, code_hash: str, at: float) -> bool:
        """A queued call resumed after a restart shows a new caller ID: its code's hash."""
        changed = await self._write(
            lambda db: (
                db.execute(
                    "UPDATE verifications SET code_hash = ?, updated_at = ? "
                    "WHERE id = ? AND status = 'pending'",
                    (code_hash, at, verification_id),
                ).rowcount
            )
        )
        return changed == 1

    async def set_status(self, verification_id: str, status: str, at: float) -> bool:
        """Move a pending verification to `status`; False when it was not pending."""

        def update(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE verifications SET status = ?, updated_at = ? "
                "WHERE id = ? AND status = 'pending'",
                (status, at, verification_id),
            )
            changed = cursor.rowcount == 1
            if changed and status in STATUS_EVENTS:
                _enqueue(db, verification_id, STATUS_EVENTS[status], at)
            return changed

        changed = await self._write(update, quick=True)
        if changed:
            self.status_tally[status] += 1
        return changed

    async def expire_due(self, now: float) -> list[str]:
        """Expire pending verifications past their TTL; return their ids."""

        def expire(db: sqlite3.Connection) -> list[str]:
            expired = [
                str(row[0])
                for row in db.execute(
                    "UPDATE verifications SET status = 'expired', updated_at = ? "
                    "WHERE status = 'pending' AND expires_at <= ? RETURNING id",
                    (now, now),
                ).fetchall()
            ]
            for verification_id in expired:
                _enqueue(db, verification_id, STATUS_EVENTS["expired"], now)
            return expired

        expired = await self._write(expire)
        self.status_tally["expired"] += len(expired)
        return expired

    async def next_expiry(self) -> float | None:
        row = await self._fetchone(
            "SELECT MIN(expires_at) FROM verifications WHERE status = 'pending'"
        )
        return float(row[0]) if row and row[0] is not None else None

    # -- calls -----------------------------------------------------------------

    async def call_progress(
        self, call_id: str, status: str, column: str, at: float, event: str
    ) -> None:
        """A live call reached `status` (dialing or ringing) at `at`, seen as `event`."""
        if column not in ("dialed_at", "ringing_at"):
            raise ValueError(column)

        def progress(db: sqlite3.Connection) -> None:
            db.execute(
                f"UPDATE calls SET status = ?, {column} = COALESCE({column}, ?) "
                "WHERE id = ? AND status IN ('queued', 'dialing', 'ringing')",
                (status, at, call_id),
            )
            _add_event(db, call_id, at, event)

        # Dialing is written before the Originate, which waits for it; ringing is news.
        await self._write(progress, lazy=status == "ringing", quick=True)

    async def add_call_event(self, event: CallEventRecord) -> None:
        await self._write(lambda db: _add_event(db, *_values(event)))

    async def end_call(
        self,
        call_id: str,
        *,
        call_status: str,
        outcome: str,
        cause: int | None,
        sip_code: int | None,
        reason: str | None,
        at: float,
        fail_verification: bool,
        health: str | None = None,
        delivered: bool = False,
        uncertain: bool = False,
    ) -> None:
        """Close a call with its outcome; fail its verification if asked.

        A call that was dialed also updates its number's health: `health` is what the
        outcome says of the number (None: nothing), `delivered` whether it alerted,
        `uncertain` whether it ended with no verdict (the verification stays pending).
        Not a call that says nothing of its number (outcomes.about_number).
        """

        def end(db: sqlite3.Connection) -> bool:
            """True when it failed the verification."""
            row = db.execute(
                "UPDATE calls SET status = ?, outcome = ?, hangup_cause = ?, sip_code = ?, "
                "reason = ?, ended_at = ? "
                "WHERE id = ? AND ended_at IS NULL RETURNING verification_id",
                (call_status, outcome, cause, sip_code, reason, at, call_id),
            ).fetchone()
            if row is None:
                return False
            failed = False
            _add_event(db, call_id, at, f"ended:{outcome}", cause, sip_code)
            if fail_verification:
                failed = (
                    db.execute(
                        "UPDATE verifications SET status = 'failed', updated_at = ? "
                        "WHERE id = ? AND status = 'pending'",
                        (at, row[0]),
                    ).rowcount
                    == 1
                )
                if failed:
                    _enqueue(db, row[0], STATUS_EVENTS["failed"], at)
            elif delivered:
                _enqueue(db, row[0], "verification.delivered", at)
            elif (
                uncertain
                and db.execute(
                    "SELECT 1 FROM verifications WHERE id = ? AND status = 'pending'", (row[0],)
                ).fetchone()
            ):
                # Only news while the code may still be typed (not after approval).
                _enqueue(db, row[0], "verification.delivery_uncertain", at)
            dialed = (
                db.execute(
                    "SELECT v.phone FROM calls c JOIN verifications v ON v.id = c.verification_id "
                    "WHERE c.id = ? AND c.dialed_at IS NOT NULL",
                    (call_id,),
                ).fetchone()
                if about_number(outcome, reason)
                else None
            )
            if dialed is not None:
                db.execute(
                    "INSERT INTO number_health (phone, status, last_outcome, last_cause, "
                    "last_sip_code, last_call_at, last_delivered_at, calls, delivered, "
                    "updated_at) VALUES (?, COALESCE(?, 'unknown'), ?, ?, ?, ?, ?, 1, ?, ?) "
                    "ON CONFLICT (phone) DO UPDATE SET "
                    "status = COALESCE(?, status), last_outcome = excluded.last_outcome, "
                    "last_cause = excluded.last_cause, last_sip_code = excluded.last_sip_code, "
                    "last_call_at = excluded.last_call_at, "
                    "last_delivered_at = COALESCE(excluded.last_delivered_at, last_delivered_at), "
                    "calls = calls + 1, delivered = delivered + excluded.delivered, "
                    "updated_at = excluded.updated_at",
                    (
                        dialed[0],
                        health,
                        outcome,
                        cause,
                        sip_code,
                        at,
                        at if delivered else None,
                        int(delivered),
                        at,
                        health,
                    ),
                )
            return failed

        if await self._write(end, lazy=True, quick=True):
            self.status_tally["failed"] += 1

    # -- webhooks --------------------------------------------------------------

    async def due_webhooks(self, now: float, limit: int) -> list[WebhookRecord]:
        """Undelivered webhooks whose next attempt is due, oldest first."""
        rows = await self._fetchall(
            f"SELECT {_columns(WebhookRecord)} FROM webhook_outbox "
            "WHERE delivered_at IS NULL AND given_up_at IS NULL AND next_attempt_at <= ? "
            "ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        )
        return [WebhookRecord(*row) for row in rows]

    async def pending_webhooks(self) -> int:
        """Webhooks neither delivered nor given up: the sender's backlog."""
        row = await self._fetchone(
            "SELECT COUNT(*) FROM webhook_outbox WHERE delivered_at IS NULL AND given_up_at IS NULL"
        )
        return int(row[0]) if row else 0

    async def next_webhook_at(self) -> float | None:
        row = await self._fetchone(
            "SELECT MIN(next_attempt_at) FROM webhook_outbox "
            "WHERE delivered_at IS NULL AND given_up_at IS NULL"
        )
        return float(row[0]) if row and row[0] is not None else None

    async def fix_webhook_payload(self, webhook_id: str, payload: str) -> str:
        """Set the payload once (the first attempt's); return the one stored."""

        def fix(db: sqlite3.Connection) -> Any:
            db.execute(
                "UPDATE webhook_outbox SET payload = COALESCE(payload, ?) WHERE id = ?",
                (payload, webhook_id),
            )
            return db.execute(
                "SELECT payload FROM webhook_outbox WHERE id = ?", (webhook_id,)
            ).fetchone()

        row = await self._write(fix, quick=True)
        assert row is not None
        return str(row[0])

    async def webhook_attempted(
        self,
        webhook_id: str,
        *,
        at: float,
        status: int | None,
        error: str | None,
        delivered: bool,
        next_attempt_at: float | None,
    ) -> None:
        """Record one delivery attempt: delivered, retried later, or given up (no next)."""
        await self._write(
            lambda db: db.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = ?, "
                "last_error = ?, delivered_at = CASE WHEN ? THEN ? END, "
                "next_attempt_at = COALESCE(?, next_attempt_at), "
                "given_up_at = CASE WHEN NOT ? AND ? IS NULL THEN ? END WHERE id = ?",
                (
                    status,
                    error,
                    delivered,
                    at,
                    next_attempt_at,
                    delivered,
                    next_attempt_at,
                    at,
                    webhook_id,
                ),
            )
        )

    async def webhooks_of(self, verification_id: str) -> list[WebhookRecord]:
        rows = await self._fetchall(
            f"SELECT {_columns(WebhookRecord)} FROM webhook_outbox "
            "WHERE verification_id = ? ORDER BY created_at, rowid",
            (verification_id,),
        )
        return [WebhookRecord(*row) for row in rows]

    # -- number health ---------------------------------------------------------

    async def number_health(self, phone: str) -> NumberHealthRecord | None:
        row = await self._fetchone(
            f"SELECT {_columns(NumberHealthRecord)} FROM number_health WHERE phone = ?",
            (phone,),
            quick=True,
        )
        return NumberHealthRecord(*row) if row else None

    async def number_health_many(self, phones: list[str]) -> dict[str, NumberHealthRecord]:
        """Health of each of `phones` that has any, by phone."""

        def read(db: sqlite3.Connection) -> list[Any]:
            rows: list[Any] = []
            # SQLite allows 32766 parameters; a lookup batch is at most 1,000.
            for start in range(0, len(phones), 500):
                chunk = phones[start : start + 500]
                rows += db.execute(
                    f"SELECT {_columns(NumberHealthRecord)} FROM number_health "
                    f"WHERE phone IN ({', '.join('?' for _ in chunk)})",
                    chunk,
                ).fetchall()
            return rows

        records = [NumberHealthRecord(*row) for row in await self._run(read)]
        return {record.phone: record for record in records}

    async def numbers_by_health(
        self, status: str, after: str, limit: int
    ) -> list[NumberHealthRecord]:
        """Numbers with `status`, in phone order after `after` (a cursor), at most `limit`."""
        rows = await self._fetchall(
            f"SELECT {_columns(NumberHealthRecord)} FROM number_health "
            "WHERE status = ? AND phone > ? ORDER BY phone LIMIT ?",
            (status, after, limit),
        )
        return [NumberHealthRecord(*row) for row in rows]

    async def reset_number_health(self, phone: str) -> bool:
        """Forget what calls taught about `phone`; False if nothing was known."""
        deleted = await self._write(
            lambda db: db.execute("DELETE FROM number_health WHERE phone = ?", (phone,)).rowcount
        )
        return deleted == 1

    async def call_stats(self, since: float, until: float) -> list[tuple[str, str, int]]:
        """(carrier, outcome, calls) for dialed calls that ended in [since, until); not
        those the gateway itself canceled before they alerted (CANCELED)."""
        rows = await self._fetchall(
            "SELECT COALESCE(v.carrier, 'unknown'), c.outcome, COUNT(*) "
            "FROM calls c JOIN verifications v ON v.id = c.verification_id "
            "WHERE c.ended_at >= ? AND c.ended_at < ? AND c.dialed_at IS NOT NULL "
            "AND c.reason IS NOT ? GROUP BY 1, 2 ORDER BY 1, 2",
            (since, until, CANCELED),
        )
        return [(str(carrier), str(outcome), int(n)) for carrier, outcome, n in rows]

    async def call_events(self, call_id: str) -> list[CallEventRecord]:
        rows = await self._fetchall(
            f"SELECT {_columns(CallEventRecord)} FROM call_events "
            "WHERE call_id = ? ORDER BY at, rowid",
            (call_id,),
            quick=True,
        )
        return [CallEventRecord(*row) for row in rows]

    async def live_calls(self) -> list[CallRecord]:
        """Calls not yet ended (queued, dialing or ringing), oldest first."""
        rows = await self._fetchall(
            f"SELECT {_C_COLS} FROM calls WHERE status IN "
            f"({', '.join('?' for _ in LIVE_CALL_STATUSES)}) ORDER BY queued_at",
            LIVE_CALL_STATUSES,
        )
        return [CallRecord(*row) for row in rows]

    # -- dashboard -------------------------------------------------------------

    async def calls_dialed(self, since: float, until: float, step: float) -> list[int]:
        """Calls dialed in each `step` seconds from `since` to `until`, oldest first."""
        buckets = [0] * max(0, math.ceil((until - since) / step))
        # A call ends after it is dialed, so one dialed since `since` has not ended
        # or ended since then: that condition lets calls_by_end do the search.
        rows = await self._fetchall(
            "SELECT CAST((dialed_at - ?) / ? AS INTEGER), COUNT(*) FROM calls "
            "WHERE (ended_at >= ? OR ended_at IS NULL) AND dialed_at >= ? AND dialed_at < ? "
            "GROUP BY 1",
            (since, step, since, since, until),
        )
        for bucket, n in rows:
            if 0 <= bucket < len(buckets):
                buckets[bucket] = int(n)
        return buckets

    async def ended_by_cause(self, since: float, until: float) -> list[tuple[str, int | None, int]]:
        """(outcome, hangup cause, calls) for dialed calls that ended in [since, until),
        the most frequent first; not those the gateway canceled before they alerted."""
        rows = await self._fetchall(
            "SELECT outcome, hangup_cause, COUNT(*) FROM calls "
            "WHERE ended_at >= ? AND ended_at < ? AND dialed_at IS NOT NULL "
            "AND reason IS NOT ? GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
            (since, until, CANCELED),
        )
        return [
            (str(outcome), None if cause is None else int(cause), int(n))
            for outcome, cause, n in rows
        ]


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit our transaction)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete statement in migration: {buffer.strip()[:60]}")
    return statements
