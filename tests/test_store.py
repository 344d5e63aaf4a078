"""The SQLite store: WAL, migrations, verifications, attempts, calls, expiry and API keys."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.store import (
    CLAIMED,
    NOT_PENDING,
    TAKEN,
    ApiKeyRecord,
    CallEventRecord,
    CallRecord,
    CallStatus,
    Channel,
    CheckLimit,
    Inserted,
    KnownInvalid,
    Limited,
    Replayed,
    Snapshot,
    Store,
    VerificationRecord,
    WindowLimit,
    open_store,
    sqlite_path,
)
from gateway.store.postgres import DEFAULT_POOL_SIZE, PostgresStore
from gateway.store.schema import POSTGRESQL as PG_MIGRATIONS
from gateway.store.schema import SQLITE as MIGRATIONS
from gateway.store.sqlite import SqliteStore
from tests.conftest import (
    INTEGRITY_ERRORS,
    TEST_PHONE,
    TEST_T0,
    NewDatabase,
    make_call,
    make_verification,
    raw_query,
)
from tests.pg import DevPostgres

T0 = TEST_T0  # when make_verification's and make_call's records are made, unless told
TTL = 300.0  # how long make_verification's verifications live
PHONE = TEST_PHONE  # whom they call, unless told
OTHER_PHONE = "+6281298765432"
# An EXPLAIN QUERY PLAN line that seeks rows in an index of verifications by its columns.
INDEX_SEEK = re.compile(r"SEARCH verifications USING (COVERING )?INDEX verifications_\w+ \(.+\)")
_NO_TABLE = re.compile(r"SCAN CONSTANT ROW|SCALAR SUBQUERY \d+")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.sqlite3"


@pytest.fixture
async def store(database: str) -> AsyncIterator[Store]:
    """A store on each backend."""
    opened = await open_store(database)
    yield opened
    await opened.close()


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[Store]:
    """A store on the SQLite file at db_path, for what only SQLite has (WAL, its planner)."""
    opened = await open_store(db_path)
    yield opened
    await opened.close()


@contextlib.contextmanager
def statements_run(store: SqliteStore) -> Iterator[list[tuple[str, Sequence[Any]]]]:
    """Each statement the store runs meanwhile, with the arguments it binds: what its
    query plans are to be taken with (a trace's expanded SQL hides a bound value)."""
    ran: list[tuple[str, Sequence[Any]]] = []
    connection = store._db

    class Recording:
        """The store's connection, noting each statement and its arguments."""

        in_transaction = property(lambda self: connection.in_transaction)

        def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
            ran.append((sql, args))
            return connection.execute(sql, args)

    store._db = Recording()  # type: ignore[assignment]
    try:
        yield ran
    finally:
        store._db = connection


def raw_file(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the file with a second, plain connection: what is really on disk."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchall()


def verification(vid: str = "vrf_1", **fields: Any) -> VerificationRecord:
    """make_verification's, with a reference and a callback URL: every column filled,
    and a webhook when it ends."""
    return make_verification(
        vid, reference="order-123", callback_url="https://example.test/hook", **fields
    )


async def create(
    store: Store, n: int, *, phone: str = PHONE, attempts: int = 5, expires_at: float | None = None
) -> VerificationRecord:
    """Store verification vrf_<n> with its queued call call_<n>."""
    record = verification(
        f"vrf_{n}",
        phone=phone,
        attempts_remaining=attempts,
        created_at=T0 + n,
        expires_at=T0 + n + TTL if expires_at is None else expires_at,
    )
    await store.create_verification(record, make_call(f"call_{n}", record.id, queued_at=T0 + n))
    return record


async def status_of(store: Store, vid: str) -> str:
    found = await store.verification(vid)
    assert found is not None
    return found[0].status


async def end(store: Store, cid: str, *, fail_verification: bool, outcome: str = "busy") -> None:
    await store.end_call(
        cid,
        call_status="failed" if fail_verification else "completed",
        outcome=outcome,
        cause=17,
        sip_code=486,
        reason="callee busy",
        at=T0 + 20,
        fail_verification=fail_verification,
    )


# -- opening, WAL, migrations ------------------------------------------------


async def test_database_is_in_wal_mode(sqlite_store: Store, db_path: Path) -> None:
    assert raw_file(db_path, "PRAGMA journal_mode") == [("wal",)]


async def test_open_creates_missing_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "var" / "deep" / "gateway.sqlite3"
    opened = await open_store(path)
    try:
        await opened.ping()
    finally:
        await opened.close()
    assert path.is_file()


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_the_database_is_created_for_its_owner_alone(tmp_path: Path) -> None:
    umask = os.umask(0o022)  # a usual umask: without care, files come out 0644
    try:
        path = tmp_path / "state" / "gateway.sqlite3"
        opened = await open_store(path)
        try:
            await create(opened, 1)  # something in the -wal
            files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
            assert mode(path.parent) == 0o700
        finally:
            await opened.close()
    finally:
        os.umask(umask)


async def test_an_existing_database_readable_by_others_is_made_private(
    db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = await open_store(db_path)
    await first.close()
    os.chmod(db_path, 0o644)
    reopened = await open_store(db_path)
    try:
        assert mode(db_path) == 0o600
    finally:
        await reopened.close()
    assert f"{db_path} was mode 644: made it 600" in caplog.text


async def test_migrations_are_applied_once_and_reopening_keeps_data(db_path: Path) -> None:
    first = await open_store(db_path)
    try:
        assert await first.schema_version() == len(MIGRATIONS)
        await create(first, 1)
    finally:
        await first.close()
    second = await open_store(db_path)
    try:
        assert await second.schema_version() == len(MIGRATIONS)
        assert await second.verification("vrf_1") is not None
    finally:
        await second.close()
    assert raw_file(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    tables = {row[0] for row in raw_file(db_path, "SELECT name FROM sqlite_master")}
    assert {"api_keys", "verifications", "calls", "call_events"} <= tables


async def test_two_stores_on_one_file_see_each_others_writes(db_path: Path) -> None:
    gateway, cli = await open_store(db_path), await open_store(db_path)
    try:
        await cli.add_api_key(ApiKeyRecord("key_1", "billing", "hash-1", T0, None))
        found = await gateway.api_key_by_hash("hash-1")
        assert found is not None
        assert found.name == "billing"
    finally:
        await cli.close()
        await gateway.close()


async def test_foreign_keys_are_enforced(store: Store) -> None:
    with pytest.raises(INTEGRITY_ERRORS):
        await store.add_call_event(CallEventRecord("no-such-call", T0, "ringing", None, None))


async def test_sqlite_counts_the_cpu_of_its_transactions_postgresql_cannot(store: Store) -> None:
    before = store.cpu_seconds
    if isinstance(store, SqliteStore):
        assert before is not None
        for i in range(20):
            await create(store, i + 1)
        assert store.cpu_seconds is not None
        assert store.cpu_seconds > before
    else:
        assert before is None  # asyncpg's work is not told apart from the loop's


# -- create_verification -----------------------------------------------------


async def test_created_verification_and_call_read_back_unchanged(store: Store) -> None:
    record, queued = verification(), make_call()
    assert (await store.create_verification(record, queued)) == Inserted([])
    assert await store.verification("vrf_1") == (record, queued)
    assert await store.newest_pending(PHONE, "key_1") == (record, queued)
    assert await store.verification("vrf_missing") is None
    assert await store.newest_pending(OTHER_PHONE, "key_1") is None
    assert await store.newest_pending(PHONE, "key_2") is None  # only the key's own


async def test_create_cancels_the_phones_pending_verification_and_names_its_live_call(
    store: Store,
) -> None:
    await create(store, 1)
    other = await create(store, 2, phone=OTHER_PHONE)
    newer = verification("vrf_3", created_at=T0 + 3)
    superseded = await store.create_verification(newer, make_call("call_3", "vrf_3"))
    assert superseded == Inserted([("vrf_1", "call_1")])
    found = await store.verification("vrf_1")
    assert found is not None
    assert found[0].status == "canceled"
    assert found[0].updated_at == newer.created_at
    assert await status_of(store, "vrf_3") == "pending"
    assert await status_of(store, other.id) == "pending"
    newest = await store.newest_pending(PHONE, "key_1")
    assert newest is not None
    assert newest[0].id == "vrf_3"


async def test_create_reports_no_call_id_when_the_old_call_has_ended(store: Store) -> None:
    await create(store, 1)
    await end(store, "call_1", fail_verification=False, outcome="delivered")
    superseded = await store.create_verification(
        verification("vrf_2", created_at=T0 + 2), make_call("call_2", "vrf_2")
    )
    assert superseded == Inserted([("vrf_1", None)])
    assert await status_of(store, "vrf_1") == "canceled"


async def test_create_leaves_finished_verifications_alone(store: Store) -> None:
    await create(store, 1)
    assert await store.spend_attempt("vrf_1", approve=True, at=T0 + 5)
    superseded = await store.create_verification(
        verification("vrf_2", created_at=T0 + 10), make_call("call_2", "vrf_2")
    )
    assert superseded == Inserted([])
    assert await status_of(store, "vrf_1") == "approved"


async def test_a_failed_create_rolls_back_the_cancellation(store: Store) -> None:
    await create(store, 1)
    duplicate_call_id = make_call("call_1", "vrf_2")
    with pytest.raises(INTEGRITY_ERRORS):
        await store.create_verification(verification("vrf_2", created_at=T0 + 2), duplicate_call_id)
    assert await status_of(store, "vrf_1") == "pending"
    assert await store.verification("vrf_2") is None
    await store.ping()  # the connection is usable after the rollback


async def test_in_a_shared_commit_a_failed_write_leaves_the_others(store: Store) -> None:
    """Writes queued together share one transaction; one that fails is undone alone."""
    await create(store, 1)
    results = await asyncio.gather(
        # A lazy write first: the creates queue behind it and all three share a batch.
        store.call_progress("call_1", CallStatus.RINGING, "ringing_at", T0 + 1, "ringing"),
        store.create_verification(
            verification("vrf_2", created_at=T0 + 2), make_call("call_1", "vrf_2")
        ),
        store.create_verification(
            verification("vrf_3", phone=OTHER_PHONE, created_at=T0 + 3),
            make_call("call_3", "vrf_3"),
        ),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], INTEGRITY_ERRORS)
    assert isinstance(results[2], Inserted)
    found = await store.verification("vrf_1")
    assert found is not None
    assert found[0].status == "pending"  # vrf_2's cancellation undone
    assert found[1].ringing_at == T0 + 1
    assert await store.verification("vrf_2") is None
    assert await status_of(store, "vrf_3") == "pending"


async def test_a_shared_commit_with_no_failure_takes_no_savepoint_per_write(
    sqlite_store: Store,
) -> None:
    """A batch's writes run as one (a savepoint each only once one of them has failed):
    the statements SQLite ran, captured on the store's own connection."""
    await create(sqlite_store, 1)
    assert isinstance(sqlite_store, SqliteStore)
    ran: list[str] = []
    sqlite_store._db.set_trace_callback(ran.append)
    try:
        await asyncio.gather(
            # Lazy: the create queues behind it, and they share a batch.
            sqlite_store.call_progress(
                "call_1", CallStatus.RINGING, "ringing_at", T0 + 1, "ringing"
            ),
            sqlite_store.create_verification(
                verification("vrf_3", phone=OTHER_PHONE, created_at=T0 + 3),
                make_call("call_3", "vrf_3"),
            ),
        )
    finally:
        sqlite_store._db.set_trace_callback(None)
    assert [sql for sql in ran if sql.split()[0] in ("BEGIN", "COMMIT", "SAVEPOINT")] == [
        "BEGIN IMMEDIATE",
        "SAVEPOINT batch",
        "COMMIT",
    ]
    found = await sqlite_store.verification("vrf_1")
    assert found is not None and found[1].ringing_at == T0 + 1
    assert await status_of(sqlite_store, "vrf_3") == "pending"


# -- spend_attempt -----------------------------------------------------------


async def test_right_code_approves_without_spending_an_attempt(store: Store) -> None:
    await create(store, 1)
    after = await store.spend_attempt("vrf_1", approve=True, at=T0 + 10)
    assert after is not None
    assert after.status == "approved"
    assert after.attempts_remaining == 5
    assert after.updated_at == T0 + 10
    assert await store.spend_attempt("vrf_1", approve=True, at=T0 + 11) is None
    assert await store.spend_attempt("vrf_1", approve=False, at=T0 + 12) is None


async def test_wrong_codes_spend_attempts_until_max_attempts_reached(store: Store) -> None:
    await create(store, 1, attempts=3)
    seen = []
    for i in range(3):
        after = await store.spend_attempt("vrf_1", approve=False, at=T0 + 10 + i)
        assert after is not None
        seen.append((after.status, after.attempts_remaining))
    assert seen == [("pending", 2), ("pending", 1), ("max_attempts_reached", 0)]
    assert await store.spend_attempt("vrf_1", approve=False, at=T0 + 20) is None
    assert await store.spend_attempt("vrf_1", approve=True, at=T0 + 21) is None
    found = await store.verification("vrf_1")
    assert found is not None
    assert (found[0].status, found[0].attempts_remaining) == ("max_attempts_reached", 0)


async def test_right_code_on_the_last_attempt_still_approves(store: Store) -> None:
    await create(store, 1, attempts=1)
    after = await store.spend_attempt("vrf_1", approve=True, at=T0 + 10)
    assert after is not None
    assert (after.status, after.attempts_remaining) == ("approved", 1)


async def test_expired_verification_spends_nothing(store: Store) -> None:
    await create(store, 1, expires_at=T0 + 100)
    assert await store.spend_attempt("vrf_1", approve=True, at=T0 + 100) is None
    assert await store.spend_attempt("vrf_1", approve=False, at=T0 + 150) is None
    found = await store.verification("vrf_1")
    assert found is not None
    assert found[0].attempts_remaining == 5
    just_in_time = await store.spend_attempt("vrf_1", approve=True, at=T0 + 99.999)
    assert just_in_time is not None
    assert just_in_time.status == "approved"


async def test_unknown_verification_spends_nothing(store: Store) -> None:
    assert await store.spend_attempt("vrf_missing", approve=False, at=T0) is None


async def test_concurrent_wrong_checks_never_spend_more_attempts_than_exist(store: Store) -> None:
    await create(store, 1, attempts=5)
    results = await asyncio.gather(
        *(store.spend_attempt("vrf_1", approve=False, at=T0 + 10) for _ in range(25))
    )
    spent = [r for r in results if r is not None]
    assert sorted(r.attempts_remaining for r in spent) == [0, 1, 2, 3, 4]
    assert [r.status for r in spent].count("max_attempts_reached") == 1
    found = await store.verification("vrf_1")
    assert found is not None
    assert (found[0].status, found[0].attempts_remaining) == ("max_attempts_reached", 0)


async def test_concurrent_mixed_checks_end_in_one_final_state(store: Store) -> None:
    await create(store, 1, attempts=3)
    approves = [False, False, True, False, True, False, False]
    results = await asyncio.gather(
        *(store.spend_attempt("vrf_1", approve=a, at=T0 + 10) for a in approves)
    )
    finals = [r for r in results if r is not None and r.status != "pending"]
    assert len(finals) == 1  # exactly one check closed it; nothing counted after that
    wrong_spent = sum(1 for a, r in zip(approves, results, strict=True) if r and not a)
    found = await store.verification("vrf_1")
    assert found is not None
    assert found[0] == finals[0]
    assert found[0].attempts_remaining == 3 - wrong_spent >= 0


# -- wrong checks per phone: by key, across keys, in the transaction that spends -

DAY = 86400.0
PER_KEY = CheckLimit(3, DAY, per_key=True, name="failed_checks")
ALL_KEYS = CheckLimit(5, DAY, per_key=False, name="failed_checks_all_keys")


async def create_for(store: Store, n: int, key: str, *, attempts: int = 20) -> VerificationRecord:
    """Store vrf_<n> to PHONE for API key `key`, with room for many checks."""
    record = verification(
        f"vrf_{n}", attempts_remaining=attempts, created_at=T0 + n, api_key_id=key
    )
    await store.create_verification(record, make_call(f"call_{n}", record.id, queued_at=T0 + n))
    return record


async def call_columns(database: str) -> list[str]:
    sql = (
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'calls'"
        if database.startswith("postgresql://")
        else "SELECT name FROM pragma_table_info('calls')"
    )
    return [str(row[0]) for row in await raw_query(database, sql)]


async def failures(database: str) -> int:
    """Wrong checks recorded, every phone and key."""
    rows = await raw_query(database, "SELECT COALESCE(SUM(failures), 0) FROM check_failures")
    return int(rows[0][0])


async def test_the_failed_check_limit_holds_against_concurrent_checks(
    store: Store, database: str
) -> None:
    """Nine wrong checks recorded, five more at once: one is spent, four are refused."""
    await create_for(store, 1, "key_1")
    limits = (CheckLimit(10, DAY, per_key=True, name="failed_checks"),)
    for i in range(9):
        spent = await store.spend_attempt("vrf_1", approve=False, at=T0 + 10 + i, limits=limits)
        assert isinstance(spent, VerificationRecord)

    results = await asyncio.gather(
        *(store.spend_attempt("vrf_1", approve=False, at=T0 + 20, limits=limits) for _ in range(5))
    )

    assert sum(isinstance(r, VerificationRecord) for r in results) == 1
    # The oldest wrong check (T0 + 10) leaves the day's window first.
    assert [r for r in results if isinstance(r, Limited)] == [
        Limited(DAY - 10, "failed_checks")
    ] * 4
    assert await failures(database) == 10
    # Even the right code is refused now, and the verification keeps its attempts.
    assert await store.spend_attempt("vrf_1", True, T0 + 21, limits) == Limited(
        DAY - 11, "failed_checks"
    )
    found = await store.verification("vrf_1")
    assert found is not None
    assert (found[0].status, found[0].attempts_remaining, found[0].failed_checks) == (
        "pending", 10, 10,
    )  # fmt: skip


async def test_wrong_checks_count_per_key_under_a_ceiling_across_keys(store: Store) -> None:
    for n, key in enumerate(("key_1", "key_2", "key_3"), start=1):
        await create_for(store, n, key)
    limits = (PER_KEY, ALL_KEYS)

    async def wrong(vid: str, at: float) -> VerificationRecord | Limited | None:
        return await store.spend_attempt(vid, approve=False, at=at, limits=limits)

    for i in range(3):
        assert isinstance(await wrong("vrf_1", T0 + 10 + i), VerificationRecord)
    assert await wrong("vrf_1", T0 + 20) == Limited(DAY - 10, "failed_checks")
    # Another key still checks the same phone: key_1's guesses are key_1's.
    for i in range(2):
        assert isinstance(await wrong("vrf_2", T0 + 30 + i), VerificationRecord)
    # Five across keys: the ceiling holds for every key, one that never guessed too.
    assert await wrong("vrf_2", T0 + 40) == Limited(DAY - 30, "failed_checks_all_keys")
    right = await store.spend_attempt("vrf_3", approve=True, at=T0 + 41, limits=limits)
    assert right == Limited(DAY - 31, "failed_checks_all_keys")
    # Another phone is another count.
    other = verification("vrf_9", phone=OTHER_PHONE, api_key_id="key_1")
    await store.create_verification(other, make_call("call_9", "vrf_9"))
    assert isinstance(await wrong("vrf_9", T0 + 42), VerificationRecord)


async def test_wrong_checks_leave_the_window_and_a_reset_forgets_them(
    store: Store, database: str
) -> None:
    long_window = (CheckLimit(2, 30 * DAY, per_key=True, name="failed_checks_30_days"),)
    await create_for(store, 1, "key_1")
    for at in (T0 + 10, T0 + 11):
        assert isinstance(
            await store.spend_attempt("vrf_1", False, at, long_window), VerificationRecord
        )
    assert await store.spend_attempt("vrf_1", False, T0 + 12, long_window) == Limited(
        30 * DAY - 2, "failed_checks_30_days"
    )

    assert await store.reset_check_failures(PHONE) == 2
    assert await store.reset_check_failures(PHONE) == 0
    assert isinstance(
        await store.spend_attempt("vrf_1", False, T0 + 13, long_window), VerificationRecord
    )
    assert isinstance(
        await store.spend_attempt("vrf_1", False, T0 + 14, long_window), VerificationRecord
    )
    assert isinstance(await store.spend_attempt("vrf_1", False, T0 + 15, long_window), Limited)
    # The window passes; what it no longer counts is forgotten at the next wrong check.
    later = T0 + 13 + 30 * DAY
    record = verification("vrf_3", created_at=later, api_key_id="key_1")
    await store.create_verification(record, make_call("call_3", "vrf_3", queued_at=later))
    assert isinstance(
        await store.spend_attempt("vrf_3", False, later, long_window), VerificationRecord
    )
    assert await raw_query(database, "SELECT at FROM check_failures ORDER BY at") == [
        (T0 + 14,), (later,),
    ]  # fmt: skip


async def test_keys_from_before_scopes_become_admin_and_keep_their_wrong_checks(
    db_path: Path,
) -> None:
    """A database from before migration 9: its keys keep every right (admin), and the
    wrong checks of the last 30 days still count, by key."""
    now = time.time()
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        for number, script in enumerate(MIGRATIONS[:8], start=1):
            db.executescript(script)
            db.execute(f"PRAGMA user_version = {number}")
        db.execute(
            "INSERT INTO api_keys (id, name, key_hash, created_at) VALUES "
            "('key_old', 'billing', 'hash-old', ?)",
            (now - 90 * DAY,),
        )
        for vid, failed, age in (("vrf_recent", 4, DAY), ("vrf_old", 5, 31 * DAY)):
            db.execute(
                "INSERT INTO verifications (id, api_key_id, phone, region, status, code_hash, "
                "pool, cli_prefix, cli_length, cli_pattern, attempts_remaining, created_at, "
                "expires_at, updated_at, failed_checks) VALUES "
                "(?, 'key_old', ?, 'ID', 'failed', 'h', 'p', '+6221500', 4, 'x', 1, ?, ?, ?, ?)",
                (vid, PHONE, now - age, now - age + TTL, now - age, failed),
            )
    store = await open_store(db_path)
    try:
        old = await store.api_key_by_hash("hash-old")
        assert old is not None and old.scope == "admin"
        new = ApiKeyRecord("key_new", "login", "hash-new", now, None)
        await store.add_api_key(new)
        assert new.scope == "verify"
        assert await store.api_key_by_hash("hash-new") == new
        pending = verification("vrf_1", created_at=now, api_key_id="key_old")
        await store.create_verification(pending, make_call("call_1", "vrf_1", queued_at=now))
        limits = (CheckLimit(5, 30 * DAY, per_key=True, name="failed_checks_30_days"),)
        assert isinstance(
            await store.spend_attempt("vrf_1", False, now, limits), VerificationRecord
        )
        refused = await store.spend_attempt("vrf_1", False, now + 1, limits)
        assert isinstance(refused, Limited) and refused.limit == "failed_checks_30_days"
    finally:
        await store.close()


# -- set_status, expiry ------------------------------------------------------


async def test_set_status_moves_only_a_pending_verification(store: Store) -> None:
    await create(store, 1)
    assert await store.set_status("vrf_1", "canceled", T0 + 5) is True
    assert await store.set_status("vrf_1", "approved", T0 + 6) is False
    assert await status_of(store, "vrf_1") == "canceled"
    assert await store.set_status("vrf_missing", "canceled", T0) is False


async def test_expire_due_expires_only_pending_verifications_past_their_ttl(store: Store) -> None:
    await create(store, 1, expires_at=T0 + 100)
    await create(store, 2, phone=OTHER_PHONE, expires_at=T0 + 200)
    await create(store, 3, phone="+6281311112222", expires_at=T0 + 50)
    assert await store.set_status("vrf_3", "approved", T0 + 10)
    assert await store.next_expiry() == T0 + 100
    assert await store.expire_due(T0 + 99) == []
    assert await store.expire_due(T0 + 100) == ["vrf_1"]
    assert await store.expire_due(T0 + 150) == []
    assert await status_of(store, "vrf_1") == "expired"
    assert await status_of(store, "vrf_2") == "pending"
    assert await status_of(store, "vrf_3") == "approved"
    found = await store.verification("vrf_1")
    assert found is not None
    assert found[0].updated_at == T0 + 100
    assert await store.next_expiry() == T0 + 200
    assert sorted(await store.expire_due(T0 + 1000)) == ["vrf_2"]
    assert await store.next_expiry() is None


# -- calls -------------------------------------------------------------------


async def test_end_call_records_the_outcome_and_forgets_the_full_caller_id(
    store: Store, database: str
) -> None:
    await create(store, 1)
    await end(store, "call_1", fail_verification=True)
    found = await store.verification("vrf_1")
    assert found is not None
    record, ended = found
    assert (ended.status, ended.outcome, ended.hangup_cause, ended.sip_code) == (
        "failed",
        "busy",
        17,
        486,
    )
    assert ended.reason == "callee busy"
    assert ended.ended_at == T0 + 20
    assert record.status == "failed"
    assert record.updated_at == T0 + 20
    # The full caller ID carries the code: it has no column at all.
    assert "cli" not in await call_columns(database)
    events = await store.call_events("call_1")
    assert [(e.kind, e.cause, e.sip_code) for e in events] == [("ended:busy", 17, 486)]


async def test_end_call_without_failing_leaves_the_verification_pending(store: Store) -> None:
    await create(store, 1)
    await end(store, "call_1", fail_verification=False, outcome="delivered")
    found = await store.verification("vrf_1")
    assert found is not None
    assert found[0].status == "pending"
    assert found[1].outcome == "delivered"


async def test_end_call_fails_only_a_pending_verification(store: Store) -> None:
    await create(store, 1)
    assert await store.spend_attempt("vrf_1", approve=True, at=T0 + 5)
    await end(store, "call_1", fail_verification=True)
    assert await status_of(store, "vrf_1") == "approved"


async def test_a_call_ends_once(store: Store) -> None:
    await create(store, 1)
    await end(store, "call_1", fail_verification=False, outcome="delivered")
    await end(store, "call_1", fail_verification=True, outcome="error")
    found = await store.verification("vrf_1")
    assert found is not None
    assert found[1].outcome == "delivered"
    assert found[0].status == "pending"
    assert len(await store.call_events("call_1")) == 1


async def test_end_call_of_an_unknown_call_changes_nothing(store: Store) -> None:
    await create(store, 1)
    await end(store, "call_missing", fail_verification=True)
    assert await status_of(store, "vrf_1") == "pending"


async def test_live_calls_are_the_unended_ones_oldest_first(store: Store) -> None:
    for n in (3, 1, 2):
        await create(store, n, phone=f"+62812000000{n}")
    await create(store, 4, phone="+628120000004")
    await store.call_progress("call_2", "ringing", "ringing_at", T0 + 10, "ringing")
    await end(store, "call_3", fail_verification=True)
    live = await store.live_calls()
    assert [c.id for c in live] == ["call_1", "call_2", "call_4"]
    assert [c.status for c in live] == ["queued", "ringing", "queued"]


async def test_call_progress_keeps_the_first_time_and_logs_each_event(store: Store) -> None:
    await create(store, 1)
    await store.call_progress("call_1", "dialing", "dialed_at", T0 + 1, "originate")
    await store.call_progress("call_1", "ringing", "ringing_at", T0 + 2, "newstate_ringing")
    await store.call_progress("call_1", "ringing", "ringing_at", T0 + 3, "dialstate_progress")
    found = await store.verification("vrf_1")
    assert found is not None
    progressed = found[1]
    assert (progressed.status, progressed.dialed_at, progressed.ringing_at) == (
        "ringing",
        T0 + 1,
        T0 + 2,
    )
    kinds = [e.kind for e in await store.call_events("call_1")]
    assert kinds == ["originate", "newstate_ringing", "dialstate_progress"]


async def test_call_progress_does_not_revive_an_ended_call(store: Store) -> None:
    await create(store, 1)
    await end(store, "call_1", fail_verification=False, outcome="delivered")
    await store.call_progress("call_1", "ringing", "ringing_at", T0 + 30, "late_event")
    found = await store.verification("vrf_1")
    assert found is not None
    assert (found[1].status, found[1].ringing_at) == ("completed", None)
    assert await store.live_calls() == []


async def test_call_progress_refuses_other_columns(store: Store) -> None:
    await create(store, 1)
    with pytest.raises(ValueError, match="ended_at"):
        await store.call_progress("call_1", "ringing", "ended_at", T0, "x")


async def test_call_events_come_back_in_time_order(store: Store) -> None:
    await create(store, 1)
    for at, kind in ((T0 + 3, "c"), (T0 + 1, "a"), (T0 + 2, "b")):
        await store.add_call_event(CallEventRecord("call_1", at, kind, None, None))
    assert [e.kind for e in await store.call_events("call_1")] == ["a", "b", "c"]


# -- API keys ----------------------------------------------------------------


async def test_api_key_lookup_by_hash(store: Store) -> None:
    key = ApiKeyRecord("key_1", "billing", "hash-1", T0, None)
    await store.add_api_key(key)
    assert await store.api_key_by_hash("hash-1") == key
    assert await store.api_key_by_hash("hash-unknown") is None


async def test_api_key_hashes_are_unique(store: Store) -> None:
    await store.add_api_key(ApiKeyRecord("key_1", "billing", "hash-1", T0, None))
    with pytest.raises(INTEGRITY_ERRORS):
        await store.add_api_key(ApiKeyRecord("key_2", "login", "hash-1", T0, None))
    assert [k.id for k in await store.api_keys()] == ["key_1"]


async def test_api_keys_are_listed_oldest_first(store: Store) -> None:
    for kid, at in (("key_b", T0 + 2), ("key_a", T0 + 1), ("key_c", T0 + 3)):
        await store.add_api_key(ApiKeyRecord(kid, kid, f"hash-{kid}", at, None))
    assert [k.id for k in await store.api_keys()] == ["key_a", "key_b", "key_c"]


async def test_revoke_api_key_by_id(store: Store) -> None:
    await store.add_api_key(ApiKeyRecord("key_1", "billing", "hash-1", T0, None))
    await store.add_api_key(ApiKeyRecord("key_2", "login", "hash-2", T0, None))
    assert await store.revoke_api_key("key_1", T0 + 5) == 1
    revoked = await store.api_key_by_hash("hash-1")
    assert revoked is not None
    assert revoked.revoked_at == T0 + 5
    kept = await store.api_key_by_hash("hash-2")
    assert kept is not None
    assert kept.revoked_at is None
    assert await store.revoke_api_key("key_1", T0 + 6) == 0
    again = await store.api_key_by_hash("hash-1")
    assert again == revoked  # the first revocation time stands


async def test_revoke_api_key_by_name_revokes_every_key_of_that_name(store: Store) -> None:
    await store.add_api_key(ApiKeyRecord("key_1", "billing", "hash-1", T0, None))
    await store.add_api_key(ApiKeyRecord("key_2", "billing", "hash-2", T0 + 1, None))
    await store.add_api_key(ApiKeyRecord("key_3", "login", "hash-3", T0 + 2, None))
    assert await store.revoke_api_key("billing", T0 + 5) == 2
    assert [(k.id, k.revoked_at) for k in await store.api_keys()] == [
        ("key_1", T0 + 5),
        ("key_2", T0 + 5),
        ("key_3", None),
    ]
    assert await store.revoke_api_key("nobody", T0 + 6) == 0


async def test_key_daily_budget_counts_by_minute_and_says_when_it_frees(store: Store) -> None:
    budget = (WindowLimit("api_key_id", "key_1", 2, 86400),)

    async def attempt(n: int, at: float) -> object:
        record = verification(f"vrf_{n}", phone=f"+62812345678{n:02d}", created_at=at)
        return await store.create_verification(record, make_call(f"call_{n}", record.id), budget)

    start = 1_700_000_050.0  # ten seconds into a minute
    assert isinstance(await attempt(1, start), Inserted)
    assert isinstance(await attempt(2, start + 30), Inserted)
    refused = await attempt(3, start + 3600)
    assert isinstance(refused, Limited) and refused.limit == "api_key_daily"
    # Both calls fall in one minute; the window frees when that minute leaves it.
    assert refused.retry_after == pytest.approx(86400 - 3600 + 50)
    assert isinstance(await attempt(4, start + 86400 + 50), Inserted)
    assert await store.calls_by_key(start + 60) == {"key_1": 1}


async def test_sandbox_verifications_do_not_spend_the_budget(store: Store) -> None:
    budget = (WindowLimit("api_key_id", "key_1", 1, 86400),)
    sandbox = verification("vrf_s", sandbox=True)
    assert isinstance(
        await store.create_verification(sandbox, make_call("call_s", "vrf_s")), Inserted
    )
    real = verification("vrf_r", phone=OTHER_PHONE)
    assert isinstance(
        await store.create_verification(real, make_call("call_r", "vrf_r"), budget), Inserted
    )
    assert await store.calls_by_key(T0 - 60) == {"key_1": 1}


# -- window limits (global and per prefix by number, per phone by walk) --------


async def attempt_at(
    store: Store, n: int, at: float, limits: tuple[WindowLimit, ...], *, sandbox: bool = False
) -> Inserted | Limited:
    """Create vrf_<n> to a phone of its own (prefix +62812345) at `at` under `limits`."""
    record = verification(
        f"vrf_{n}",
        phone=f"+62812345{n:05d}",
        created_at=at,
        phone_prefix="+62812345",
        sandbox=sandbox,
    )
    result = await store.create_verification(record, make_call(f"call_{n}", record.id), limits)
    assert not isinstance(result, Replayed)
    return result


async def test_global_window_refuses_the_count_plus_first_and_says_when_it_frees(
    store: Store,
) -> None:
    ceiling = (WindowLimit(None, None, 3, 60),)
    for n, at in enumerate((T0, T0 + 10, T0 + 20)):
        assert isinstance(await attempt_at(store, n, at, ceiling), Inserted)
    refused = await attempt_at(store, 3, T0 + 30, ceiling)
    assert refused == Limited(30.0, "global")  # the oldest (T0) leaves at T0 + 60
    assert isinstance(await attempt_at(store, 4, T0 + 60.5, ceiling), Inserted)
    # A refused create took no number: the next window check counts only stored rows.
    refused = await attempt_at(store, 5, T0 + 61, ceiling)
    assert refused == Limited(9.0, "global")


async def test_prefix_window_counts_only_its_prefix(store: Store) -> None:
    per_prefix = (WindowLimit("phone_prefix", "+62812345", 2, 3600),)
    other = verification("vrf_o", phone=OTHER_PHONE, phone_prefix="+62812987")
    await store.create_verification(other, make_call("call_o", "vrf_o"))
    assert isinstance(await attempt_at(store, 1, T0 + 1, per_prefix), Inserted)
    assert isinstance(await attempt_at(store, 2, T0 + 2, per_prefix), Inserted)
    refused = await attempt_at(store, 3, T0 + 3, per_prefix)
    assert refused == Limited(3598.0, "phone_prefix")  # vrf_1 leaves at T0 + 3601


async def test_sandbox_verifications_count_in_no_window(store: Store) -> None:
    limits = (WindowLimit(None, None, 1, 60), WindowLimit("phone_prefix", "+62812345", 1, 60))
    for n in range(3):
        assert isinstance(await attempt_at(store, n, T0 + n, (), sandbox=True), Inserted)
    assert isinstance(await attempt_at(store, 10, T0 + 5, limits), Inserted)
    assert isinstance(await attempt_at(store, 11, T0 + 6, limits), Limited)


async def test_the_window_check_does_not_walk_the_window(
    sqlite_store: Store, db_path: Path
) -> None:
    """The statements the store really runs to check the global and per-prefix windows,
    captured on its own connection, are index lookups (their query plans say so): no
    walk over the window's rows, however many calls it counts."""
    for n in range(5):
        assert isinstance(await attempt_at(sqlite_store, n, T0 + n, ()), Inserted)
    # Each window's 3rd latest call (vrf_2, at T0 + 2) is looked up: the global window
    # (1 s) has room, the prefix window (an hour) is full and refuses, so the create
    # runs both checks and nothing after them.
    windows = (
        WindowLimit(None, None, 3, 1),
        WindowLimit("phone_prefix", "+62812345", 3, 3600),
    )
    assert isinstance(sqlite_store, SqliteStore)
    connection = sqlite_store._db
    ran: list[str] = []  # each statement as SQLite ran it, its arguments filled in
    connection.set_trace_callback(ran.append)
    try:
        refused = await attempt_at(sqlite_store, 5, T0 + 5, windows)
    finally:
        connection.set_trace_callback(None)
    assert refused == Limited(3597.0, "phone_prefix")
    reads = [sql for sql in ran if sql.startswith("SELECT") and "FROM verifications" in sql]
    assert any("global_seq" in sql for sql in reads), ran
    assert any("prefix_seq" in sql for sql in reads), ran
    for sql in reads:
        plan = [str(row[-1]) for row in raw_file(db_path, f"EXPLAIN QUERY PLAN {sql}")]
        # A SEARCH of an index with the columns it seeks by in brackets. SQLite calls a
        # MIN or MAX that walks a whole index a SEARCH too, but without the brackets.
        # Both numbers are read in one statement: a subquery each, over no table.
        reading = [step for step in plan if not _NO_TABLE.fullmatch(step)]
        assert reading and all(INDEX_SEEK.fullmatch(step) for step in reading), (sql, plan)


async def test_migration_numbers_the_verifications_already_stored(db_path: Path) -> None:
    """A database from before migration 8: its dialed verifications are numbered in
    creation order, overall and per prefix, and its windows count them."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as db:
        for number, script in enumerate(MIGRATIONS[:7], start=1):
            db.executescript(script)
            db.execute(f"PRAGMA user_version = {number}")
        for n, (prefix, sandbox) in enumerate(
            [("+62812345", 0), ("+62812999", 0), ("+62812345", 1), ("+62812345", 0)]
        ):
            db.execute(
                "INSERT INTO verifications (id, api_key_id, phone, region, status, code_hash, "
                "pool, cli_prefix, cli_length, cli_pattern, attempts_remaining, created_at, "
                "expires_at, updated_at, phone_prefix, sandbox) VALUES "
                "(?, 'key_1', ?, 'ID', 'failed', 'h', 'p', '+6221500', 4, 'x', 3, ?, ?, ?, ?, ?)",
                (f"vrf_{n}", f"{prefix}{n:05d}", T0 + n, T0 + n + TTL, T0 + n, prefix, sandbox),
            )
    store = await open_store(db_path)
    try:
        refused = await attempt_at(
            store, 9, T0 + 10, (WindowLimit("phone_prefix", "+62812345", 2, 60),)
        )
        assert refused == Limited(50.0, "phone_prefix")  # vrf_0 (T0) and vrf_3 (T0 + 3)
        refused = await attempt_at(store, 9, T0 + 10, (WindowLimit(None, None, 3, 60),))
        assert refused == Limited(50.0, "global")  # vrf_0, vrf_1, vrf_3
    finally:
        await store.close()
    assert raw_file(
        db_path, "SELECT id, global_seq, prefix_seq FROM verifications ORDER BY id"
    ) == [("vrf_0", 1, 1), ("vrf_1", 2, 1), ("vrf_2", None, None), ("vrf_3", 3, 2)]


# Columns migrations 12 and 13 added (to verifications, and to calls: channel and
# step): a row written at schema 11 has none of them.
ADDED_BY_12 = frozenset(
    {"channels", "locale", "fallback_after", "step", "next_at", "next_asked_at", "code_sealed"}
    | {"channel"}
    | {"check_source", "watch_seconds"}
)


def columns_at_11(record: VerificationRecord | CallRecord) -> dict[str, Any]:
    """A record's columns as a gateway of schema 11 wrote them."""
    return {
        f.name: getattr(record, f.name)
        for f in dataclasses.fields(record)
        if f.name not in ADDED_BY_12
    }


async def raw_insert(database: str, table: str, row: dict[str, Any]) -> None:
    """Insert `row` on a second, plain connection, foreign keys enforced."""
    columns = ", ".join(row)
    if database.startswith("postgresql://"):
        marks = ", ".join(f"${n}" for n in range(1, len(row) + 1))
        conn = await asyncpg.connect(database)
        try:
            await conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", *row.values())
        finally:
            await conn.close()
        return
    with contextlib.closing(sqlite3.connect(sqlite_path(database))) as db:
        db.execute("PRAGMA foreign_keys = ON")
        with db:
            marks = ", ".join("?" for _ in row)
            db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values()))


async def make_schema(database: str, version: int) -> None:
    """Bring the empty `database` to schema `version`, as a gateway of that time left it."""
    if database.startswith("postgresql://"):
        conn = await asyncpg.connect(database)
        try:
            async with conn.transaction():
                await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                for script in PG_MIGRATIONS[:version]:
                    await conn.execute(script)
        finally:
            await conn.close()
        return
    with contextlib.closing(sqlite3.connect(sqlite_path(database), isolation_level=None)) as db:
        for number, script in enumerate(MIGRATIONS[:version], start=1):
            db.executescript(script)
            db.execute(f"PRAGMA user_version = {number}")


async def test_migration_15_drops_calls_live_and_keeps_the_live_calls(database: str) -> None:
    """A schema-14 database with a live call and an ended one: after migration 15 the
    calls_live index is gone, and the live calls read as before (calls_live_by_owner)."""
    await make_schema(database, 14)
    for n, status in ((1, "ringing"), (2, "completed")):
        await raw_insert(database, "verifications", dataclasses.asdict(verification(f"vrf_{n}")))
        call = make_call(f"call_{n}", f"vrf_{n}", status=status, owner="gw-a")
        await raw_insert(database, "calls", dataclasses.asdict(call))
    store = await open_store(database)
    try:
        assert await store.schema_version() == len(MIGRATIONS) >= 15
        assert [call.id for call in await store.live_calls("gw-a")] == ["call_1"]
        assert await store.live_calls_by_owner() == {"gw-a": 1}
    finally:
        await store.close()
    names = (
        "SELECT indexname FROM pg_indexes WHERE tablename = 'calls'"
        if database.startswith("postgresql://")
        else "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'calls'"
    )
    indexes = {str(row[0]) for row in await raw_query(database, names)}
    assert "calls_live" not in indexes and "calls_live_by_owner" in indexes


async def test_a_gateways_live_calls_are_read_through_the_live_index(
    sqlite_store: Store, db_path: Path
) -> None:
    """The statements that read the live calls (the stray check's, the dashboard's,
    adoption's), as the store runs them, with their bound values, use
    calls_live_by_owner: none reads every call kept, ended ones and all."""
    await create(sqlite_store, 1)
    assert isinstance(sqlite_store, SqliteStore)
    with statements_run(sqlite_store) as ran:
        await sqlite_store.live_calls("gw-a")
        await sqlite_store.live_calls()
        await sqlite_store.live_calls_by_owner()
        await sqlite_store.adopt_calls("gw-a", T0)
    reads = [(sql, args) for sql, args in ran if "FROM calls" in sql or "UPDATE calls" in sql]
    assert len(reads) == 4, ran
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        for sql, args in reads:
            plan = [str(row[-1]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
            assert any("USING INDEX calls_live_by_owner" in step for step in plan), (sql, plan)


async def test_migration_12_keeps_each_call_as_its_verifications_first_step(
    database: str,
) -> None:
    """A database from before steps (schema 11) holding a verification, its delivered
    flash call and the call's timeline: each call becomes step 0, a flash call, with
    its id, outcome and events; the verification tries one channel, flashcall; a
    second step's call may now be stored, a second call of one step still may not."""
    await make_schema(database, 11)  # before steps
    before = verification("vrf_1", carrier="Telkomsel", phone_prefix="+62812")
    call = make_call(
        "call_1",
        "vrf_1",
        status="completed",
        outcome="delivered",
        hangup_cause=16,
        dialed_at=T0 + 1,
        ringing_at=T0 + 2,
        ended_at=T0 + 9,
        owner="gw-a",
        node="a",
    )
    # Two events at one instant: their order is the order they were written in.
    events = [
        CallEventRecord("call_1", T0 + 1, "dialing", None, None),
        CallEventRecord("call_1", T0 + 2, "ringing", None, None),
        CallEventRecord("call_1", T0 + 9, "hangup", 16, None),
        CallEventRecord("call_1", T0 + 9, "ended:delivered", 16, None),
    ]
    await raw_insert(database, "verifications", columns_at_11(before))
    await raw_insert(database, "calls", columns_at_11(call))
    for event in events:
        await raw_insert(database, "call_events", dataclasses.asdict(event))

    store = await open_store(database)
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        found = await store.verification("vrf_1")
        assert found is not None
        assert found == (before, call)
        migrated, its_call = found
        assert (migrated.channels, migrated.step, migrated.next_at) == ("flashcall", 0, None)
        assert (its_call.channel, its_call.step) == ("flashcall", 0)
        assert await store.calls_of("vrf_1") == [call]
        assert await store.call_events("call_1") == events

        # Not checked after its delivered flash call: the voice call, step 1.
        voice = make_call("call_2", "vrf_1", queued_at=T0 + 60, channel=Channel.VOICE, step=1)
        moved = await store.start_step("vrf_1", voice, T0 + 60)
        assert isinstance(moved, VerificationRecord) and moved.step == 1
        assert await store.calls_of("vrf_1") == [call, voice]
        for step in (0, 1):  # one call per step
            with pytest.raises(INTEGRITY_ERRORS):
                await raw_insert(
                    database,
                    "calls",
                    columns_at_11(make_call(f"call_x{step}", "vrf_1")) | {"step": step},
                )
        # The references hold, to the tables made anew.
        with pytest.raises(INTEGRITY_ERRORS):
            await store.add_call_event(CallEventRecord("no-such-call", T0, "ringing", None, None))
        with pytest.raises(INTEGRITY_ERRORS):
            await raw_insert(database, "calls", columns_at_11(make_call("call_y", "vrf_none")))
        await store.add_call_event(CallEventRecord("call_2", T0 + 61, "dialing", None, None))
    finally:
        await store.close()
    if database.startswith("sqlite"):
        path = sqlite_path(database)
        assert raw_file(Path(path), "PRAGMA foreign_key_check") == []
        assert [
            row[2:5] for row in raw_file(Path(path), "PRAGMA foreign_key_list(call_events)")
        ] == [("calls", "call_id", "id")]
        assert {
            str(row[0])
            for row in raw_file(
                Path(path),
                "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                "AND tbl_name IN ('calls', 'call_events')",
            )
        } == {"calls_by_end", "calls_live_by_owner", "call_events_by_call"}


async def test_the_write_ahead_log_is_checkpointed_while_it_runs(
    sqlite_store: Store, db_path: Path
) -> None:
    for n in range(200):
        await create(sqlite_store, n, phone=f"+6281234{n:06d}")
    await asyncio.sleep(2.5)  # two checkpoint intervals
    # The database file alone, without its log, already holds every row.
    alone = db_path.with_name("copy.sqlite3")
    shutil.copyfile(db_path, alone)
    assert raw_file(alone, "SELECT COUNT(*) FROM verifications") == [(200,)]


# -- many gateways on one database ---------------------------------------------


def owned_call(cid: str, vid: str, owner: str, *, status: str = "queued") -> CallRecord:
    return make_call(
        cid, vid, owner=owner, status=status, dialed_at=None if status == "queued" else T0
    )


async def create_owned(
    store: Store, n: int, owner: str, *, status: str = "queued"
) -> VerificationRecord:
    record = verification(f"vrf_{n}", phone=f"+6281234{n:06d}", created_at=T0 + n)
    await store.create_verification(
        record, owned_call(f"call_{n}", record.id, owner, status=status)
    )
    return record


async def test_a_queued_call_is_claimed_for_dialing_once_and_only_by_its_owner(
    store: Store,
) -> None:
    await create_owned(store, 1, "gw-a")
    assert await store.claim_call("call_1", "gw-b", T0 + 2) == TAKEN
    assert await store.claim_call("call_1", "gw-a", T0 + 2) == CLAIMED
    assert await store.claim_call("call_1", "gw-a", T0 + 3) == TAKEN  # dialing already
    found = await store.verification("vrf_1")
    assert found is not None
    assert (found[1].status, found[1].dialed_at, found[1].owner) == ("dialing", T0 + 2, "gw-a")
    assert [e.kind for e in await store.call_events("call_1")] == ["dialing"]


async def test_a_call_whose_verification_was_canceled_is_not_claimed(store: Store) -> None:
    await create_owned(store, 1, "gw-a")
    assert await store.set_status("vrf_1", "canceled", T0 + 1)  # through another gateway
    assert await store.claim_call("call_1", "gw-a", T0 + 2) == NOT_PENDING
    found = await store.verification("vrf_1")
    assert found is not None and found[1].status == "queued"


async def test_calls_of_a_lapsed_lease_are_adopted_by_one_instance(store: Store) -> None:
    await store.register_instance("gw-a", "inc-a", T0, lease_until=T0 + 10)
    await store.register_instance("gw-b", "inc-b", T0, lease_until=T0 + 10)
    await create_owned(store, 1, "gw-a")
    await create_owned(store, 2, "gw-a", status="ringing")
    await create_owned(store, 3, "gw-b")
    await end(store, "call_2", fail_verification=False)
    await create_owned(store, 4, "gw-a", status="dialing")

    # gw-a's lease runs: nobody takes its calls.
    assert await store.adopt_calls("gw-b", T0 + 5) == []
    # It lapses (gw-a died at T0): gw-b takes the live ones, once.
    adopted = await store.adopt_calls("gw-b", T0 + 11)
    assert [(c.id, c.status, c.owner) for c in adopted] == [
        ("call_1", "queued", "gw-b"),
        ("call_4", "dialing", "gw-b"),
    ]
    assert await store.adopt_calls("gw-b", T0 + 12) == []
    # What gw-b adopted is gw-b's now: gw-a's old process may no longer dial it.
    assert await store.claim_call("call_1", "gw-a", T0 + 12) == TAKEN
    assert await store.claim_call("call_1", "gw-b", T0 + 12) == CLAIMED


async def test_at_start_an_instance_takes_back_its_own_calls_and_unowned_ones(
    store: Store,
) -> None:
    previous = await store.register_instance("gw-a", "inc-1", T0, lease_until=T0 + 10)
    assert previous is None
    await create_owned(store, 1, "gw-a", status="dialing")
    await store.create_verification(
        verification("vrf_2", phone=OTHER_PHONE), make_call("call_2", "vrf_2")
    )
    # The process is killed and started again at once, within its own lease.
    previous = await store.register_instance("gw-a", "inc-2", T0 + 3, lease_until=T0 + 13)
    assert previous is not None and previous.incarnation == "inc-1"
    assert await store.adopt_calls("gw-a", T0 + 3) == [
        dataclasses.replace(c, owner="gw-a") for c in await store.live_calls() if c.id == "call_2"
    ]
    adopted = await store.adopt_calls("gw-a", T0 + 3, own=True)
    assert [c.id for c in adopted] == ["call_1", "call_2"]


async def test_a_lease_is_renewed_only_by_its_incarnation_and_ends_at_stop(store: Store) -> None:
    await store.register_instance("gw-a", "inc-1", T0, lease_until=T0 + 10)
    assert await store.renew_lease("gw-a", "inc-1", T0 + 20)
    await store.register_instance("gw-a", "inc-2", T0 + 5, lease_until=T0 + 15)
    assert not await store.renew_lease("gw-a", "inc-1", T0 + 25)  # a second process took it
    await create_owned(store, 1, "gw-a")
    await create_owned(store, 2, "gw-a", status="ringing")

    assert await store.release_queued("gw-a") == 1  # handed over at once
    assert [c.id for c in await store.adopt_calls("gw-b", T0 + 6)] == ["call_1"]
    await store.end_lease("gw-a", "inc-2", T0 + 7)
    (record,) = await store.instances()
    assert (record.lease_until, record.stopped_at) == (T0 + 7, T0 + 7)
    assert [c.id for c in await store.adopt_calls("gw-b", T0 + 7)] == ["call_2"]


async def test_a_webhook_is_claimed_by_one_sender_and_falls_due_again_after_the_hold(
    store: Store,
) -> None:
    await create(store, 1)  # callback_url set: the cancellation below is reported
    await create(store, 2)  # supersedes vrf_1: one verification.canceled row
    first = await store.claim_webhooks(T0 + 5, limit=10, hold=30)
    assert [(w.verification_id, w.type, w.next_attempt_at) for w in first] == [
        ("vrf_1", "verification.canceled", T0 + 35)
    ]
    assert await store.claim_webhooks(T0 + 6, limit=10, hold=30) == []
    # Its sender died without recording the attempt: due again after the hold.
    again = await store.claim_webhooks(T0 + 36, limit=10, hold=30)
    assert [w.id for w in again] == [first[0].id]


async def test_two_stores_on_one_database_keep_a_limit_exact(new_database: NewDatabase) -> None:
    """Two gateways' stores, ten concurrent creates for one phone with room for three:
    exactly three are stored, whichever store takes them."""
    database = new_database()
    stores = [await open_store(database), await open_store(database)]
    try:
        limit = (WindowLimit("phone", PHONE, 3, 600),)

        async def attempt(n: int) -> Inserted | Limited:
            record = verification(f"vrf_{n}", created_at=T0 + n / 100, api_key_id=f"key_{n}")
            result = await stores[n % 2].create_verification(
                record, make_call(f"call_{n}", record.id), limit
            )
            assert not isinstance(result, Replayed | KnownInvalid)
            return result

        results = await asyncio.gather(*(attempt(n) for n in range(10)))
        assert sum(isinstance(r, Inserted) for r in results) == 3
        assert sum(isinstance(r, Limited) for r in results) == 7
    finally:
        for store in stores:
            await store.close()


# -- steps: a verification tries its channels in order, one call each ----------

PHONES = ("+6281200000001", "+6281200000002", "+6281200000003", "+6281200000004", "+6281200000005")


async def create_steps(
    store: Store,
    n: int,
    *,
    phone: str = PHONE,
    key: str = "key_1",
    channels: str = "flashcall,voice",
) -> tuple[VerificationRecord, CallRecord]:
    """Store vrf_<n>, trying `channels`, with its first call call_<n>, a flash call."""
    record = verification(
        f"vrf_{n}", phone=phone, api_key_id=key, channels=channels, created_at=T0 + n
    )
    call = make_call(f"call_{n}", record.id, phone=phone, queued_at=T0 + n)
    assert await store.create_verification(record, call) == Inserted([])
    return record, call


def step_call(
    n: int, step: int, at: float, *, phone: str = PHONE, channel: Channel = Channel.VOICE
) -> CallRecord:
    """The queued call of vrf_<n>'s step `step`: call_<n>_<step>."""
    return make_call(
        f"call_{n}_{step}", f"vrf_{n}", phone=phone, queued_at=at, channel=channel, step=step
    )


async def end_step(
    store: Store, cid: str, at: float, *, next_at: float | None = None, fail: bool = True
) -> None:
    """End call `cid` busy at `at`: failing its verification, or with `next_at`, making
    its next step due then instead."""
    await store.end_call(
        cid,
        call_status="failed",
        outcome="busy",
        cause=17,
        sip_code=486,
        reason="callee busy",
        at=at,
        fail_verification=fail,
        next_at=next_at,
    )


async def current(store: Store, vid: str) -> tuple[VerificationRecord, CallRecord]:
    found = await store.verification(vid)
    assert found is not None
    return found


async def test_a_step_moves_the_verification_on_and_queues_its_call(store: Store) -> None:
    record, _ = await create_steps(store, 1)
    voice = step_call(1, 1, T0 + 30)
    moved = await store.start_step("vrf_1", voice, T0 + 30)
    assert moved == dataclasses.replace(record, step=1, updated_at=T0 + 30)
    assert await current(store, "vrf_1") == (moved, voice)
    assert (voice.status, voice.channel, voice.step) == ("queued", "voice", 1)
    assert await store.call_events(voice.id) == [
        CallEventRecord(voice.id, T0 + 30, "step:voice", None, None)
    ]
    assert [c.id for c in await store.live_calls()] == ["call_1", "call_1_1"]


async def test_a_step_starts_only_after_the_current_one_of_a_pending_verification(
    store: Store,
) -> None:
    record, first = await create_steps(store, 1, channels="flashcall,voice,voice")
    assert await store.start_step("vrf_1", step_call(1, 2, T0 + 30), T0 + 30) is None
    assert await store.start_step("vrf_1", step_call(1, 0, T0 + 30), T0 + 30) is None
    await create_steps(store, 2, phone=OTHER_PHONE)
    assert await store.set_status("vrf_2", "canceled", T0 + 10)
    assert (
        await store.start_step("vrf_2", step_call(2, 1, T0 + 30, phone=OTHER_PHONE), T0 + 30)
        is None
    )
    assert await store.start_step("vrf_missing", step_call(9, 1, T0 + 30), T0 + 30) is None
    assert await current(store, "vrf_1") == (record, first)
    assert [c.id for c in await store.calls_of("vrf_2")] == ["call_2"]
    assert await store.call_events("call_1_2") == []


async def test_of_two_gateways_starting_one_step_at_once_exactly_one_does(
    new_database: NewDatabase,
) -> None:
    database = new_database()
    stores = [await open_store(database), await open_store(database)]
    try:
        await create_steps(stores[0], 1)

        async def attempt(n: int) -> VerificationRecord | Limited | None:
            call = dataclasses.replace(step_call(1, 1, T0 + 30), id=f"call_1_1_{n}")
            return await stores[n % 2].start_step("vrf_1", call, T0 + 30)

        results = await asyncio.gather(*(attempt(n) for n in range(6)))
        moved = [r for r in results if r is not None]
        assert len(moved) == 1 and isinstance(moved[0], VerificationRecord)
        assert moved[0].step == 1
        winner = f"call_1_1_{results.index(moved[0])}"
        assert [c.id for c in await stores[1].calls_of("vrf_1")] == ["call_1", winner]
    finally:
        for store in stores:
            await store.close()


async def test_a_second_ask_within_the_gap_is_refused_and_a_due_step_is_not(
    store: Store,
) -> None:
    await create_steps(store, 1, channels="flashcall,voice,flashcall,voice")
    asked = await store.start_step("vrf_1", step_call(1, 1, T0 + 30), T0 + 30, min_gap=60)
    assert isinstance(asked, VerificationRecord)
    assert (asked.step, asked.next_asked_at) == (1, T0 + 30)
    again = step_call(1, 2, T0 + 50, channel=Channel.FLASHCALL)
    assert await store.start_step("vrf_1", again, T0 + 50, min_gap=60) == Limited(40.0, "next_gap")
    assert (await current(store, "vrf_1"))[0] == asked
    assert [c.id for c in await store.calls_of("vrf_1")] == ["call_1", "call_1_1"]
    # Started by the gateway itself (no gap): the client's last ask stays the last.
    due = await store.start_step("vrf_1", again, T0 + 50)
    assert isinstance(due, VerificationRecord)
    assert (due.step, due.next_asked_at) == (2, T0 + 30)
    # The gap is counted from the last ask: past it, the client may ask again.
    assert await store.start_step(
        "vrf_1", step_call(1, 3, T0 + 89), T0 + 89, min_gap=60
    ) == Limited(1.0, "next_gap")
    last = await store.start_step("vrf_1", step_call(1, 3, T0 + 90), T0 + 90, min_gap=60)
    assert isinstance(last, VerificationRecord)
    assert (last.step, last.next_asked_at) == (3, T0 + 90)


async def test_voice_calls_to_a_phone_are_limited_across_keys(store: Store) -> None:
    per_phone = (WindowLimit("voice_phone", PHONE, 1, 3600),)
    await create_steps(store, 1, key="key_1")
    await create_steps(store, 2, key="key_2")  # another key's: vrf_1 stays pending
    await create_steps(store, 3, phone=OTHER_PHONE)
    # The flash calls to the phone are not voice calls: room for one.
    first = await store.start_step("vrf_1", step_call(1, 1, T0 + 30), T0 + 30, per_phone)
    assert isinstance(first, VerificationRecord)
    second = step_call(2, 1, T0 + 60)
    assert await store.start_step("vrf_2", second, T0 + 60, per_phone, min_gap=60) == Limited(
        3570.0, "voice_phone"
    )  # the first leaves the hour at T0 + 3630
    assert [c.id for c in await store.calls_of("vrf_2")] == ["call_2"]
    assert (await current(store, "vrf_2"))[0].step == 0
    # Another phone counts its own.
    other = (WindowLimit("voice_phone", OTHER_PHONE, 1, 3600),)
    third = step_call(3, 1, T0 + 60, phone=OTHER_PHONE)
    assert isinstance(await store.start_step("vrf_3", third, T0 + 60, other), VerificationRecord)
    later = dataclasses.replace(second, queued_at=T0 + 3630)
    assert isinstance(
        await store.start_step("vrf_2", later, T0 + 3630, per_phone), VerificationRecord
    )


async def test_voice_calls_of_a_key_are_counted_from_its_creates_and_its_steps(
    store: Store,
) -> None:
    def budget(key: str) -> tuple[WindowLimit, ...]:
        return (WindowLimit("voice_api_key_id", key, 2, 86400),)

    # vrf_1's first call is a voice call: its create counts one.
    voice_first = verification("vrf_1", channels="voice")
    assert await store.create_verification(
        voice_first, make_call("call_1", "vrf_1", channel=Channel.VOICE), budget("key_1")
    ) == Inserted([])
    for n in (2, 3):  # flash calls first: their creates count none
        await create_steps(store, n, phone=PHONES[n])
    await create_steps(store, 4, phone=PHONES[4], key="key_2")
    step = step_call(2, 1, T0 + 30, phone=PHONES[2])
    assert isinstance(
        await store.start_step("vrf_2", step, T0 + 30, budget("key_1")), VerificationRecord
    )
    refused = await store.start_step(
        "vrf_3", step_call(3, 1, T0 + 60, phone=PHONES[3]), T0 + 60, budget("key_1")
    )
    # Both voice calls fell in the minute that ends at T0 + 40: room once it leaves the day.
    assert refused == Limited(86400 - 20, "voice_api_key_daily")
    other_key = step_call(4, 1, T0 + 60, phone=PHONES[4])
    assert isinstance(
        await store.start_step("vrf_4", other_key, T0 + 60, budget("key_2")), VerificationRecord
    )


async def test_a_due_step_a_limit_refuses_is_not_due_again_an_asked_one_stays_due(
    store: Store,
) -> None:
    per_phone = (WindowLimit("voice_phone", PHONE, 1, 3600),)
    await create_steps(store, 1, key="key_1")
    await create_steps(store, 2, key="key_2")
    assert isinstance(
        await store.start_step("vrf_1", step_call(1, 1, T0 + 10), T0 + 10, per_phone),
        VerificationRecord,
    )
    await end_step(store, "call_2", T0 + 20, next_at=T0 + 25)
    voice = step_call(2, 1, T0 + 30)
    asked = await store.start_step("vrf_2", voice, T0 + 30, per_phone, min_gap=60)
    assert isinstance(asked, Limited) and asked.limit == "voice_phone"
    assert (await current(store, "vrf_2"))[0].next_at == T0 + 25
    assert [v.id for v, _ in await store.due_steps(T0 + 30, 10)] == ["vrf_2"]
    due = await store.start_step("vrf_2", voice, T0 + 30, per_phone)
    assert isinstance(due, Limited) and due.limit == "voice_phone"
    record, call = await current(store, "vrf_2")
    assert (record.status, record.step, record.next_at) == ("pending", 0, None)
    assert call.id == "call_2"
    assert await store.due_steps(T0 + 30, 10) == []


async def test_only_the_current_steps_call_is_claimed_for_dialing(store: Store) -> None:
    await create_steps(store, 1)
    voice = step_call(1, 1, T0 + 10)
    assert isinstance(await store.start_step("vrf_1", voice, T0 + 10), VerificationRecord)
    # The flash call was still queued (its gateway restarting): it is not placed now.
    assert await store.claim_call("call_1", "gw-a", T0 + 11) == NOT_PENDING
    assert await store.claim_call(voice.id, "gw-a", T0 + 11) == CLAIMED
    first, second = await store.calls_of("vrf_1")
    assert (first.status, second.status) == ("queued", "dialing")


async def test_a_new_code_is_stored_with_its_sealed_copy_while_pending(store: Store) -> None:
    record = verification("vrf_1", channels="flashcall,voice", code_sealed="sealed-first-code")
    call = make_call("call_1", "vrf_1")
    assert await store.create_verification(record, call) == Inserted([])
    assert await store.replace_code("vrf_1", "hmac-of-new-code", "sealed-new-code", T0 + 5)
    expected = dataclasses.replace(
        record, code_hash="hmac-of-new-code", code_sealed="sealed-new-code", updated_at=T0 + 5
    )
    assert await store.verification("vrf_1") == (expected, call)
    assert await store.set_status("vrf_1", "canceled", T0 + 6)
    assert not await store.replace_code("vrf_1", "hmac-of-other", None, T0 + 7)
    found, _ = await current(store, "vrf_1")
    assert (found.code_hash, found.code_sealed) == ("hmac-of-new-code", "sealed-new-code")


async def test_a_failed_call_with_a_step_to_come_leaves_its_verification_pending(
    store: Store,
) -> None:
    await create_steps(store, 1)
    await create_steps(store, 2, phone=OTHER_PHONE)
    await end_step(store, "call_1", T0 + 20, next_at=T0 + 25)
    await end_step(store, "call_2", T0 + 20)
    record, call = await current(store, "vrf_1")
    assert (record.status, record.next_at, record.updated_at) == ("pending", T0 + 25, T0 + 20)
    assert (call.status, call.outcome, call.ended_at) == ("failed", "busy", T0 + 20)
    assert await store.webhooks_of("vrf_1") == []
    record, _ = await current(store, "vrf_2")
    assert (record.status, record.next_at) == ("failed", None)
    assert [w.type for w in await store.webhooks_of("vrf_2")] == ["verification.failed"]


async def test_the_end_of_a_call_moved_past_changes_nothing_on_its_verification(
    store: Store,
) -> None:
    now: dict[int, tuple[VerificationRecord, CallRecord]] = {}
    for n, phone in ((1, PHONE), (2, OTHER_PHONE)):
        await create_steps(store, n, phone=phone)
        await store.call_progress(f"call_{n}", "ringing", "ringing_at", T0 + 5, "ringing")
        # The client asked for the voice call while the flash call still rang.
        voice = step_call(n, 1, T0 + 10, phone=phone)
        moved = await store.start_step(f"vrf_{n}", voice, T0 + 10, min_gap=60)
        assert isinstance(moved, VerificationRecord)
        now[n] = (moved, voice)
    await end_step(store, "call_1", T0 + 20)  # would fail vrf_1 were it current
    await end_step(store, "call_2", T0 + 20, next_at=T0 + 25)  # would make a step due
    for n in (1, 2):
        assert await current(store, f"vrf_{n}") == now[n]
        first = (await store.calls_of(f"vrf_{n}"))[0]
        assert (first.status, first.ended_at) == ("failed", T0 + 20)  # the call itself ended
        assert await store.webhooks_of(f"vrf_{n}") == []
    assert await store.due_steps(T0 + 30, 10) == []


async def test_due_steps_are_the_pending_ones_whose_time_came_with_their_current_calls(
    store: Store,
) -> None:
    for n in range(5):
        await create_steps(store, n, phone=PHONES[n], channels="flashcall,voice,voice")
    await end_step(store, "call_0", T0 + 20, next_at=T0 + 25)
    await end_step(store, "call_1", T0 + 20, next_at=T0 + 100)  # not yet
    await end_step(store, "call_2", T0 + 20, next_at=T0 + 21)
    assert await store.set_status("vrf_2", "canceled", T0 + 22)  # not pending
    # call_3 has not ended: nothing is due. vrf_4 is at its second step, due first.
    assert isinstance(
        await store.start_step("vrf_4", step_call(4, 1, T0 + 5, phone=PHONES[4]), T0 + 5),
        VerificationRecord,
    )
    await end_step(store, "call_4_1", T0 + 20, next_at=T0 + 22)

    due = await store.due_steps(T0 + 30, 10)
    assert [(v.id, c.id) for v, c in due] == [("vrf_4", "call_4_1"), ("vrf_0", "call_0")]
    assert due == [await current(store, "vrf_4"), await current(store, "vrf_0")]
    assert due[0][0].next_at == T0 + 22
    assert await store.due_steps(T0 + 30, 1) == due[:1]
    assert await store.due_steps(T0 + 22, 10) == due[:1]
    assert await store.due_steps(T0 + 21.5, 10) == []
    # Started, a step is due no more.
    moved = await store.start_step("vrf_0", step_call(0, 1, T0 + 30, phone=PHONES[0]), T0 + 30)
    assert isinstance(moved, VerificationRecord) and moved.next_at is None
    assert await store.due_steps(T0 + 30, 10) == due[:1]


async def test_a_verification_that_leaves_pending_drops_its_due_step(store: Store) -> None:
    """Approved, canceled, expired, superseded or out of attempts: its next step will
    never start, and no sweep reads it again (the partial index keeps only due rows)."""
    for n in range(5):
        await create_steps(store, n, phone=PHONES[n], channels="flashcall,voice")
        await end_step(store, f"call_{n}", T0 + 20, next_at=T0 + 25)
    assert await store.spend_attempt("vrf_0", True, T0 + 21) is not None  # approved
    assert await store.set_status("vrf_1", "canceled", T0 + 21)
    for _ in range(5):  # max_attempts_reached at the last wrong code
        await store.spend_attempt("vrf_2", False, T0 + 21)
    assert await store.spend_attempt("vrf_3", False, T0 + 21) is not None  # still pending
    newer = verification("vrf_9", phone=PHONES[4], api_key_id="key_1", created_at=T0 + 22)
    superseding = await store.create_verification(newer, make_call("call_9", "vrf_9"))
    assert superseding == Inserted([("vrf_4", None)])  # its call had ended

    ids = ("vrf_0", "vrf_1", "vrf_2", "vrf_3", "vrf_4")
    rows = {v: await store.verification(v) for v in ids}
    assert {v: (r[0].status, r[0].next_at) for v, r in rows.items() if r} == {
        "vrf_0": ("approved", None),
        "vrf_1": ("canceled", None),
        "vrf_2": ("max_attempts_reached", None),
        "vrf_3": ("pending", T0 + 25),
        "vrf_4": ("canceled", None),
    }
    assert await store.expire_due(T0 + 10_000) == ["vrf_3", "vrf_9"]
    assert await store.due_steps(T0 + 10_000, 10) == []
    found = await store.verification("vrf_3")
    assert found is not None and (found[0].status, found[0].next_at) == ("expired", None)


async def test_a_verification_is_read_with_its_latest_steps_call(store: Store) -> None:
    _, first = await create_steps(store, 1, channels="flashcall,voice,flashcall")
    second = step_call(1, 1, T0 + 30)
    third = step_call(1, 2, T0 + 60, channel=Channel.FLASHCALL)
    for call in (second, third):
        moved = await store.start_step("vrf_1", call, call.queued_at)
        assert isinstance(moved, VerificationRecord)
        assert await store.verification("vrf_1") == (moved, call)
        assert await store.newest_pending(PHONE, "key_1") == (moved, call)
    assert await store.calls_of("vrf_1") == [first, second, third]
    assert await store.calls_of("vrf_missing") == []


async def test_a_webhook_snapshot_carries_every_step_so_far(store: Store) -> None:
    await create_steps(store, 1)
    await end_step(store, "call_1", T0 + 20, next_at=T0 + 20)
    voice = step_call(1, 1, T0 + 30)
    assert isinstance(await store.start_step("vrf_1", voice, T0 + 30), VerificationRecord)
    await store.call_progress(voice.id, "dialing", "dialed_at", T0 + 31, "dialing")
    await end_step(store, voice.id, T0 + 40)  # the last step: the verification fails
    (webhook,) = await store.webhooks_of("vrf_1")
    assert webhook.type == "verification.failed" and webhook.snapshot is not None
    snapshot = Snapshot.decode(webhook.snapshot)
    record, call = await current(store, "vrf_1")
    assert (snapshot.verification, snapshot.call) == (record, call)
    assert call.id == voice.id and record.status == "failed"
    assert snapshot.steps == await store.calls_of("vrf_1")
    assert [(c.id, c.channel, c.step) for c in snapshot.steps] == [
        ("call_1", "flashcall", 0),
        ("call_1_1", "voice", 1),
    ]
    assert snapshot.events == await store.call_events(voice.id)  # the current call's
    # A verification still at its first step: its one call.
    await create_steps(store, 2, phone=OTHER_PHONE)
    assert await store.set_status("vrf_2", "canceled", T0 + 50)
    (webhook,) = await store.webhooks_of("vrf_2")
    assert webhook.snapshot is not None
    assert Snapshot.decode(webhook.snapshot).steps == await store.calls_of("vrf_2")


def sandbox_call(cid: str, vid: str, at: float, channel: Channel, step: int = 0) -> CallRecord:
    """A sandbox verification's call, as Verifications makes it: never dialed, shown
    delivered (a voice call: spoken) as it is stored."""
    return make_call(
        cid,
        vid,
        queued_at=at,
        channel=channel,
        step=step,
        status="completed",
        outcome="spoken" if channel is Channel.VOICE else "delivered",
        reason="sandbox",
        ended_at=at,
    )


async def test_a_sandbox_verifications_voice_calls_spend_no_voice_budget(store: Store) -> None:
    per_key = (WindowLimit("voice_api_key_id", "key_1", 1, 86400),)
    per_phone = (WindowLimit("voice_phone", PHONE, 1, 3600),)
    first = verification("vrf_s", channels="voice,voice", sandbox=True)
    assert await store.create_verification(
        first, sandbox_call("call_s", "vrf_s", T0, Channel.VOICE), per_key + per_phone
    ) == Inserted([])
    voice = sandbox_call("call_s_1", "vrf_s", T0 + 10, Channel.VOICE, step=1)
    assert isinstance(await store.start_step("vrf_s", voice, T0 + 10), VerificationRecord)
    # The phone's one voice call of the hour, and key_1's of the day, are still to come.
    await create_steps(store, 1, key="key_2")
    to_phone = await store.start_step("vrf_1", step_call(1, 1, T0 + 20), T0 + 20, per_phone)
    assert isinstance(to_phone, VerificationRecord), to_phone
    await create_steps(store, 2, phone=PHONES[2])
    of_key = await store.start_step(
        "vrf_2", step_call(2, 1, T0 + 30, phone=PHONES[2]), T0 + 30, per_key
    )
    assert isinstance(of_key, VerificationRecord), of_key
    await create_steps(store, 3, phone=PHONES[3])
    refused = await store.start_step(
        "vrf_3", step_call(3, 1, T0 + 40, phone=PHONES[3]), T0 + 40, per_key
    )
    assert isinstance(refused, Limited) and refused.limit == "voice_api_key_daily"


async def test_the_reads_by_end_time_use_the_index_of_ended_calls(
    sqlite_store: Store, db_path: Path
) -> None:
    """calls_by_end holds ended calls only (no entry made at a call's create and moved
    at its end): the reads of calls by the time they ended, and the dashboard's count of
    calls dialed (those ended since, and the live ones), still seek an index each, with
    the values the store binds; none reads every call kept."""
    for n, phone in ((1, PHONE), (2, OTHER_PHONE)):  # both dialed; the second ends
        record = verification(f"vrf_{n}", phone=phone, created_at=T0 + n)
        dialed = make_call(
            f"call_{n}", record.id, queued_at=T0 + n, status="dialing", dialed_at=T0 + n
        )
        await sqlite_store.create_verification(record, dialed)
    await end(sqlite_store, "call_2", fail_verification=False, outcome="delivered")
    assert isinstance(sqlite_store, SqliteStore)
    with statements_run(sqlite_store) as ran:
        assert await sqlite_store.calls_dialed(T0, T0 + 120, 60) == [2, 0]
        await sqlite_store.ended_by_cause(T0, T0 + 120)
    reads = [(sql, args) for sql, args in ran if "FROM calls" in sql]
    assert len(reads) == 2, ran
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        for sql, args in reads:
            plan = [str(row[-1]) for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args)]
            assert not any(re.fullmatch(r"SCAN c(alls)?", step) for step in plan), (sql, plan)
            assert any("INDEX calls_by_end" in step for step in plan), (sql, plan)
        partial = db.execute("SELECT sql FROM sqlite_master WHERE name = 'calls_by_end'")
        assert "WHERE ended_at IS NOT NULL" in partial.fetchone()[0]


async def test_a_slow_job_leaves_the_quick_ones_queued_before_it_on_the_loop(
    sqlite_store: Store,
) -> None:
    """A batch runs its quick jobs ahead of the first slow one on the event loop, and
    only the rest in the store's thread: a sweep queued behind a call's writes does not
    take them into the thread, where each statement waits for the loop's GIL."""
    assert isinstance(sqlite_store, SqliteStore)
    where: dict[str, str] = {}

    def noting(name: str) -> Any:
        async def operation(tx: Any) -> None:
            await tx.execute("SELECT 1")
            where[name] = threading.current_thread().name

        return operation

    # Queued in one turn of the loop: the lazy one starts the batch, the others join it.
    await asyncio.gather(
        sqlite_store._write(noting("ringing"), lazy=True, quick=True),
        sqlite_store._write(noting("end"), lazy=True, quick=True),
        sqlite_store._write(noting("sweep")),
        sqlite_store._write(noting("after the sweep"), quick=True),
    )
    loop_thread = threading.current_thread().name
    assert where["ringing"] == where["end"] == loop_thread
    assert where["sweep"] != loop_thread
    assert where["after the sweep"] == where["sweep"]  # the order kept: behind it


@contextlib.contextmanager
def postgresql_statements(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Each statement any asyncpg connection sends meanwhile, as sent."""
    sent: list[str] = []
    with monkeypatch.context() as patch:
        for name in ("execute", "fetch", "fetchrow", "fetchval"):
            method = getattr(asyncpg.connection.Connection, name)

            async def recording(conn: Any, query: str, *a: Any, _m: Any = method, **k: Any) -> Any:
                sent.append(query)
                return await _m(conn, query, *a, **k)

            patch.setattr(asyncpg.connection.Connection, name, recording)
        yield sent


async def test_a_postgresql_call_takes_few_round_trips_and_no_reset(
    dev_postgres: DevPostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a dialed create's rows and counts go in one statement, a call's
    ringing is one statement without BEGIN and COMMIT, its end, its timeline entry and
    its verification's read one; a connection goes back to the pool without a statement
    (asyncpg's default reset query was a round trip per operation), and nothing of an
    operation stays on it: no advisory lock (a create takes one), no open transaction."""
    name = f"test_{os.getpid()}_round_trips"
    url = dev_postgres.create_database(name, replace=True)
    try:
        store = await open_store(url)
        assert isinstance(store, PostgresStore)
        try:
            record = verification(phone_prefix=PHONE[:-3])  # counted in its block's conversion
            dialing = make_call(status=CallStatus.DIALING, dialed_at=T0 + 1, owner="gw-a")
            with postgresql_statements(monkeypatch) as created:
                await store.create_verification(record, dialing)
            with postgresql_statements(monkeypatch) as rang:
                await store.call_progress("call_1", CallStatus.RINGING, "ringing_at", T0 + 2, "180")
            with postgresql_statements(monkeypatch) as ended:
                await end(store, "call_1", fail_verification=True)
                await end(store, "call_1", fail_verification=True)  # once only
            rows = ("INTO verifications", "INTO calls", "INTO call_events", "INTO conversion")
            rows += ("INTO key_usage",)
            inserts = [q for q in created if any(insert in q for insert in rows)]
            assert len(inserts) == 1 and inserts[0].startswith("WITH ")
            tables = ("verifications", "calls (", "call_events", "conversion", "key_usage")
            assert all(table in inserts[0] for table in tables)
            assert len(rang) == 1 and "UPDATE calls" in rang[0] and "call_events" in rang[0]
            closing = [q for q in ended if "UPDATE calls" in q]
            assert len(closing) == 2 and all("INSERT INTO call_events" in q for q in closing)
            assert not [q for q in ended if q.startswith("INSERT INTO call_events")]
            assert "JOIN verifications" in closing[0]  # what the rest needs, read with it
            assert not [q for q in ended if "FROM verifications WHERE id" in q]
            events = [(e.at, e.kind) for e in await store.call_events("call_1")]
            assert events == [(T0 + 1, "dialing"), (T0 + 2, "180"), (T0 + 20, "ended:busy")]
            assert await status_of(store, "vrf_1") == "failed"
            for sent in (created, rang, ended):
                assert not [q for q in sent if "unlock_all" in q or "RESET ALL" in q], sent
            for _ in range(DEFAULT_POOL_SIZE):  # whichever connection the pool lends
                async with store._pool.acquire() as conn:
                    assert not conn.is_in_transaction()
                    assert not await conn.fetchval(
                        "SELECT count(*) FROM pg_locks "
                        "WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
                    )
        finally:
            await store.close()
    finally:
        dev_postgres.drop_database(name)
