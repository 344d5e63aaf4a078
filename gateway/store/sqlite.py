"""The embedded backend: one SQLite file in WAL mode, one connection, one thread.

Each operation (a query, or a whole transaction) is queued; the queue is run in batches,
one batch at a time, so a transaction never interleaves with another's statements. A
batch of short operations (lookups by key, a call's few rows) runs on the event loop and
never waits for a lock; any other batch, or one that meets a lock, runs in the store's
own thread, the only other user of the connection.

Operations are coroutines over a Tx (gateway.store.sql); SQLite's Tx never suspends, so
each runs to its end in one step wherever the batch runs (_complete).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

import aiosqlite

from gateway.store import schema
from gateway.store.sql import SQLITE, Operation, Row, SqlStore, Tx
from gateway.tasks import cancel_and_wait, event_loop

T = TypeVar("T")
log = logging.getLogger(__name__)
# aiosqlite logs each operation at debug level with its arguments and, once done, its
# result: rows with phone numbers. Like the AMI wire, it is never logged, at any level.
logging.getLogger("aiosqlite").setLevel(logging.WARNING)

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


class SqliteTx:
    """A Tx on the connection, in whichever thread runs the batch; it never suspends."""

    __slots__ = ("_db",)
    dialect = SQLITE

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, args).rowcount

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = self._db.execute(sql, args).fetchone()
        return row

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, args).fetchall()

    async def lock(self, name: str) -> None:
        """Nothing to take: a write batch holds SQLite's one write lock (BEGIN IMMEDIATE)."""


def _complete(operation: Operation[T], db: sqlite3.Connection) -> T:
    """Run `operation` to its end at once: SQLite's Tx never suspends."""
    coroutine = operation(SqliteTx(db))
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("a store operation waited on something other than its Tx")


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


def _settle(jobs: list[_Job], done: list[tuple[bool, Any]]) -> None:
    """Give each job's caller its result or exception (none to a canceled caller)."""
    for job, (ok, value) in zip(jobs, done, strict=True):
        if job.future.done():  # its caller was canceled
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)


def _run_waiting(db: sqlite3.Connection, jobs: list[_Job]) -> tuple[list[tuple[bool, Any]], float]:
    """_run_batch in the store's thread, where waiting for a lock blocks nobody; with
    the thread's CPU seconds it took."""
    started = time.thread_time()
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return _run_batch(db, jobs), time.thread_time() - started


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
    """Run `jobs`, all of them in one transaction; (True, result) or (False, exception)
    for each job. A write that raises leaves nothing of its own behind and no other job
    undone. A lock that cannot be had raises from BEGIN, before anything is done."""
    writing = any(job.write for job in jobs)
    nested = len(jobs) > 1  # a job alone has the transaction for itself
    if writing:
        db.execute("BEGIN IMMEDIATE")
    try:
        if writing and nested:
            # Writes almost never raise: the batch runs as one, and only when one of its
            # writes does is it run again from its start, each write in a savepoint.
            db.execute("SAVEPOINT batch")
            done = _run_jobs(db, jobs, give_up=True)
            if done is None:
                db.execute("ROLLBACK TO batch")
                done = _run_jobs(db, jobs, savepoints=True)
            db.execute("RELEASE batch")
        else:  # reads only, or a write alone: the transaction is its own
            done = _run_jobs(db, jobs)
        if writing:
            db.execute("COMMIT" if nested or done[0][0] else "ROLLBACK")
    except Exception as exc:  # the database itself failed (disk full, I/O): nothing written
        if db.in_transaction:
            db.execute("ROLLBACK")
        return [(False, exc)] * len(jobs)
    return done


@overload
def _run_jobs(
    db: sqlite3.Connection, jobs: list[_Job], *, savepoints: bool = False
) -> list[tuple[bool, Any]]: ...
@overload
def _run_jobs(
    db: sqlite3.Connection, jobs: list[_Job], *, give_up: Literal[True]
) -> list[tuple[bool, Any]] | None: ...
def _run_jobs(
    db: sqlite3.Connection, jobs: list[_Job], *, savepoints: bool = False, give_up: bool = False
) -> list[tuple[bool, Any]] | None:
    """Each job's (ok, result or exception), in the open transaction; with `savepoints`,
    a write that raises is undone alone. With `give_up`, None as soon as a write raises,
    its work not undone: the caller rolls the batch back."""
    done: list[tuple[bool, Any]] = []
    for job in jobs:
        if job.write and savepoints:
            db.execute("SAVEPOINT job")
        try:
            value = job.work(db)
        except Exception as exc:
            if job.write and give_up:
                return None
            if job.write and savepoints:
                db.execute("ROLLBACK TO job")
                db.execute("RELEASE job")
            done.append((False, exc))
            continue
        if job.write and savepoints:
            db.execute("RELEASE job")
        done.append((True, value))
    return done


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


async def _migrate(tx: Tx) -> None:
    row = await tx.fetchone("PRAGMA user_version")
    version = int(row[0]) if row else 0
    for number, script in enumerate(schema.SQLITE[version:], start=version + 1):
        for statement in _statements(script):
            await tx.execute(statement)
        await tx.execute(f"PRAGMA user_version = {number}")


def _connect(path: str) -> sqlite3.Connection:
    # The loop thread uses the connection too (quick batches), never at the same time
    # as the store's thread: one batch at a time, whichever runs it.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Overwrite deleted content instead of leaving it in free pages.
        db.execute("PRAGMA secure_delete = ON")
        db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash; only a power cut can lose the
        # last commits.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        # A batch's savepoint keeps the pages it changes in a sub-journal, and some
        # queries sort in a temporary B-tree: in memory, not in a file that is created,
        # written and unlinked for nearly every call (make bench: 5% of the gateway's
        # CPU per call). Both are small here.
        db.execute("PRAGMA temp_store = MEMORY")
    except BaseException:
        db.close()
        raise
    return db


class SqliteStore(SqlStore):
    """The gateway's state in one SQLite file."""

    cpu_seconds: float

    def __init__(self, db: sqlite3.Connection, thread: concurrent.futures.Executor) -> None:
        super().__init__()
        self._db = db
        self._thread = thread  # the store's own: every batch that may wait runs there
        self._jobs: list[_Job] = []  # waiting for the next batch
        self._urgent = False  # a job in _jobs has someone waiting on it
        self._kick: asyncio.Future[None] | None = None  # wakes a drainer holding lazy jobs
        self._lock_wait = True  # the connection's busy_timeout: BUSY_TIMEOUT_MS, or 0
        self._drainer: asyncio.Task[None] | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        # The batches' CPU, on the loop or in the store's thread (/metrics); not the
        # checkpoints' (their own thread: about 3% of the store's in make bench).
        self.cpu_seconds = 0.0

    _loop = event_loop  # the loop it runs on, asked for once

    @classmethod
    async def open(cls, path: str | Path) -> SqliteStore:
        """Open (creating if needed) the database at `path` and migrate it."""
        if str(path) != ":memory:":
            _private_files(Path(path))
        loop = asyncio.get_running_loop()
        thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        try:
            db = await loop.run_in_executor(thread, _connect, str(path))
        except BaseException:
            thread.shutdown(wait=False)
            raise
        store = cls(db, thread)
        try:
            await store._write(_migrate)
            if str(path) != ":memory:":
                # Checkpoints (the WAL copied back into the file) run on a connection
                # of their own, in its own thread, instead of inside a commit now and
                # then: a request never waits for one (make bench: p99).
                await store._run(_stop_autocheckpoint)
                store._checkpointer = asyncio.create_task(
                    _checkpoints(str(path)), name="store-checkpoints"
                )
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Close the connection, once the work already queued is done."""
        await cancel_and_wait(self._checkpointer)
        if self._drainer is not None:
            await asyncio.shield(self._drainer)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown(wait=False)

    async def schema_version(self) -> int:
        row = await self._fetchone("PRAGMA user_version")
        return int(row[0]) if row else 0

    async def _run(
        self,
        operation: Operation[T],
        write: bool = False,
        lazy: bool = False,
        quick: bool = False,
        single: bool = False,  # every write is in a batch's transaction here
    ) -> T:
        """`operation` in a transaction of its own (a savepoint): committed if it
        returns, rolled back if it raises.

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
        future: asyncio.Future[T] = self._loop.create_future()
        job = _Job(functools.partial(_complete, operation), write, quick, future)
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
            self._drainer = self._loop.create_task(self._drain(), name="store")
        return await future

    async def _drain(self) -> None:
        loop = self._loop
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
            # The quick jobs ahead of the first that is not run now, on the loop; the
            # rest, in order, in the thread. One slow job (a sweep) no longer takes the
            # calls' writes queued before it into the thread, where each of their
            # statements would wait for the loop to give the GIL back.
            head = next((i for i, job in enumerate(jobs) if not job.quick), len(jobs))
            if head:
                try:
                    done = self._run_now(jobs[:head])
                except Exception as exc:  # the connection is closed or broken
                    done = [(False, exc)] * head
                if done is None:  # a lock was held: the thread waits for it
                    head = 0
                else:
                    _settle(jobs[:head], done)
            if head < len(jobs):
                rest = jobs[head:]
                self._lock_wait = True
                try:
                    waited = await loop.run_in_executor(self._thread, _run_waiting, self._db, rest)
                except Exception as exc:  # the connection is closed or broken
                    waited = [(False, exc)] * len(rest), 0.0
                self.cpu_seconds += waited[1]
                _settle(rest, waited[0])

    def _run_now(self, jobs: list[_Job]) -> list[tuple[bool, Any]] | None:
        """Quick `jobs` on the event loop (see _run_quick); None: a lock was held."""
        started = time.thread_time()
        try:
            if self._lock_wait:
                self._db.execute("PRAGMA busy_timeout = 0")
                self._lock_wait = False
            return _run_quick(self._db, jobs)
        finally:
            self.cpu_seconds += time.thread_time() - started


async def _stop_autocheckpoint(tx: Tx) -> None:
    await tx.execute("PRAGMA wal_autocheckpoint = 0")
    await tx.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
