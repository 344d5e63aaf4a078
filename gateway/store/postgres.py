"""The shared backend: PostgreSQL through an asyncpg pool, for many gateways at once.

Every operation is one transaction on a pooled connection, READ COMMITTED; the ones that
decide from counts (limits, Idempotency-Keys) serialise on an advisory lock (Tx.lock),
so the answer is the one a single gateway would give. A lost server makes operations
raise StoreUnavailable; the pool connects again on the next one, so work resumes by
itself when the server is back (or fails over behind the same address).
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections.abc import Sequence
from typing import Any, TypeAlias, TypeVar
from urllib.parse import urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from gateway.store import schema
from gateway.store.records import StoreUnavailable
from gateway.store.sql import POSTGRESQL, Operation, Row, SqlStore

T = TypeVar("T")
log = logging.getLogger(__name__)

# A pooled connection (what the pool lends) or one of its own.
Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"

# Connections per gateway: the API's concurrent transactions beyond it wait for one.
# Each is a server process; PostgreSQL's default max_connections is 100.
DEFAULT_POOL_SIZE = 10
# Connecting (a TCP handshake, TLS, authentication) and each statement: a server that
# does not answer within these is treated as lost, and the request answered 503.
CONNECT_TIMEOUT_S = 5.0
STATEMENT_TIMEOUT_S = 10.0
# Waiting for a free pooled connection when all are busy.
ACQUIRE_TIMEOUT_S = 5.0

# Advisory-lock names are hashed to a bigint; the prefix keeps them apart from the locks
# of other applications sharing the database.
LOCK_PREFIX = "otp-gateway:"

_PLACEHOLDER = re.compile(r"\?")
_INDEX_HINT = re.compile(r"\s+INDEXED BY \w+")  # SQLite's planner hint; PostgreSQL has none

# What a lost or unreachable server raises, from connect to the middle of a statement.
_LOST = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
)


@functools.lru_cache(maxsize=1024)
def _translate(sql: str) -> str:
    """SQL of gateway.store.sql in PostgreSQL's words: $1, $2... for each `?`."""
    numbers = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", _INDEX_HINT.sub("", sql))


def _rowcount(status: str) -> int:
    """Rows changed, from a command tag ("UPDATE 3", "INSERT 0 1")."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def where(url: str) -> str:
    """The server and database of `url`, without its user or password, for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


class PostgresTx:
    """A Tx on one pooled connection, inside its transaction."""

    __slots__ = ("_conn",)
    dialect = POSTGRESQL

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return _rowcount(await self._conn.execute(_translate(sql), *args))

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None:
        row: Row | None = await self._conn.fetchrow(_translate(sql), *args)
        return row

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        return list(await self._conn.fetch(_translate(sql), *args))

    async def lock(self, name: str) -> None:
        await self._conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", LOCK_PREFIX + name
        )


async def _migrate(conn: Connection) -> None:
    """Apply the migrations this database lacks; gateways starting together take turns."""
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", LOCK_PREFIX + "migrate"
        )
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT version FROM schema_version")
        if version is None:
            version = 0
            await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        if version > len(schema.POSTGRESQL):
            raise RuntimeError(
                f"the database has {version} migrations, this gateway knows "
                f"{len(schema.POSTGRESQL)}: a newer gateway wrote it"
            )
        for number, script in enumerate(schema.POSTGRESQL[version:], start=version + 1):
            await conn.execute(script)
            await conn.execute("UPDATE schema_version SET version = $1", number)
            log.info("database migrated to version %d", number)


class PostgresStore(SqlStore):
    """The gateway's state in a PostgreSQL database that other gateways share."""

    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        super().__init__()
        self._pool = pool

    @classmethod
    async def open(cls, url: str, pool_size: int = DEFAULT_POOL_SIZE) -> PostgresStore:
        """Connect to the database at `url` and migrate it; StoreUnavailable when the
        server cannot be reached or refuses the login."""
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                timeout=CONNECT_TIMEOUT_S,
                command_timeout=STATEMENT_TIMEOUT_S,
                # Short statements: planning with JIT costs more than it saves.
                server_settings={"application_name": "otp-gateway", "jit": "off"},
                reset=_keep_session,
            )
        except (*_LOST, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"cannot connect to {where(url)}: {_describe(exc)}") from None
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await _migrate(conn)
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def schema_version(self) -> int:
        row = await self._fetchone("SELECT version FROM schema_version")
        return int(row[0]) if row else 0

    async def _run(
        self,
        operation: Operation[T],
        write: bool = False,
        lazy: bool = False,
        quick: bool = False,
        single: bool = False,
    ) -> T:
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                if not write or single:  # one statement is a transaction by itself
                    return await operation(PostgresTx(conn))
                async with conn.transaction():
                    return await operation(PostgresTx(conn))
        except _LOST as exc:
            raise StoreUnavailable(_describe(exc)) from exc


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """What the pool runs on a connection given back, beyond rolling back a transaction
    left open (asyncpg does that whatever this is): nothing.

    The store leaves no session state to undo: its locks are its transactions' own
    (pg_advisory_xact_lock), and it sets no setting, listens to no channel and keeps no
    cursor. asyncpg's default (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET ALL)
    was a round trip at each release: 5.5 a call, a sixth of a call's statements."""


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
