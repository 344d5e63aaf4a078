"""Every SQL statement, written once for both backends.

An operation is a coroutine over a `Tx`: the backend's transaction (one SQLite
connection in its thread, or one PostgreSQL connection from the pool). Statements use
`?` placeholders and the SQL both engines read alike; the PostgreSQL Tx numbers the
placeholders. Where the engines differ (rounding down, an index hint) the Tx's
`dialect` says which words to use.

Writes that must see every other writer's last commit before deciding (the limits, an
Idempotency-Key, the numbering of verifications) take `Tx.lock` first: SQLite has one
writer at a time anyway; PostgreSQL takes a transaction-scoped advisory lock, so two
gateways on one database decide one after the other, exactly as one would.

Statuses are SQL literals here ('pending'), the same words as the enums of
gateway.store.records: a partial index (`WHERE status = 'pending'`) serves only a
statement that names its literal, never a placeholder.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import functools
import math
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import fields
from typing import Any, Protocol, TypeVar

from gateway.caller_health import (
    PoolChange,
    PoolHealthRecord,
    PoolState,
    RouteReport,
    after_call,
)
from gateway.outcomes import CANCELED, DELIVERED_OUTCOMES, about_number
from gateway.store.records import (
    LIVE_CALL_STATUSES,
    STATUS_EVENTS,
    AlertKind,
    AlertRecord,
    ApiKeyRecord,
    CallEventRecord,
    CallRecord,
    CallStatus,
    CheckLimit,
    Idempotency,
    Inserted,
    InstanceRecord,
    KnownInvalid,
    Limited,
    NumberHealthRecord,
    Replayed,
    Snapshot,
    VerificationRecord,
    VerificationStatus,
    WebhookRecord,
    WindowLimit,
    values_of,
)

T = TypeVar("T")
Row = Sequence[Any]

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

# API keys looked up within this many seconds are not looked up again (one query per
# request was a tenth of the API's cost); KEY_CACHE_SIZE bounds the answers kept.
KEY_CACHE_S = 1.0
KEY_CACHE_SIZE = 10_000

# What Tx.lock serialises: every create (limits, Idempotency-Keys, numbering), and the
# wrong checks of one phone.
CREATE_LOCK = "create"
# What claim_call says of a queued call.
CLAIMED = "claimed"
NOT_PENDING = "not_pending"
TAKEN = "taken"
CHECKS_LOCK = "checks:"


class Tx(Protocol):
    """One backend transaction; for a read, one connection."""

    dialect: str

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run a statement; the number of rows it changed."""

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def lock(self, name: str) -> None:
        """Wait until no other transaction holds `name`; hold it until this one ends."""


Operation = Callable[[Tx], Coroutine[Any, Any, T]]

_LIMIT_NAMES = {
    "phone": "phone",
    "phone_prefix": "phone_prefix",
    "api_key_id": "api_key_daily",
    "voice_phone": "voice_phone",
    "voice_api_key_id": "voice_api_key_daily",
    None: "global",
}
# The per-minute counts each key budget reads (WindowLimit.column).
_USAGE_TABLES = {"api_key_id": "key_usage", "voice_api_key_id": "voice_usage"}
# A verification and its current call (the step it is at).
_CURRENT_CALL = "c.verification_id = v.id AND c.step = v.step"
# The live call statuses, as SQL (calls_live_by_owner's condition).
_LIVE = "(" + ", ".join(f"'{status}'" for status in LIVE_CALL_STATUSES) + ")"


@functools.cache
def _columns(record_type: type[Any]) -> str:
    return ", ".join(f.name for f in fields(record_type))


@functools.cache
def _placeholders(record_type: type[Any]) -> str:
    return ", ".join("?" for _ in fields(record_type))


_V_COLS = _columns(VerificationRecord)
_C_COLS = _columns(CallRecord)
_V_COLS_OF_V = ", ".join(f"v.{f.name}" for f in fields(VerificationRecord))
_C_COLS_OF_C = ", ".join(f"c.{f.name}" for f in fields(CallRecord))


# idempotency_keys.status of a row whose response is a Snapshot; a row written by a
# gateway older than schema 11 holds the HTTP status (201) of the JSON body it holds.
_SNAPSHOT_STATUS = 0


def _replayed(row: Row) -> Replayed:
    body_hash, status, response = str(row[0]), int(row[1]), str(row[2])
    if status == _SNAPSHOT_STATUS:
        return Replayed(body_hash, Snapshot.decode(response))
    return Replayed(body_hash, None, response)


async def _enqueue(tx: Tx, verification_id: str, kind: str, at: float) -> None:
    """An outbox row for `kind` if the verification asked for webhooks; in the caller's
    transaction, so the event exists exactly when the change does, and carries the
    verification, its call and the call's timeline as they are now (a Snapshot)."""
    row = await tx.fetchone(
        f"SELECT {_V_COLS_OF_V}, {_C_COLS_OF_C} FROM verifications v "
        f"JOIN calls c ON {_CURRENT_CALL} "
        "WHERE v.id = ? AND v.callback_url IS NOT NULL",
        (verification_id,),
    )
    if row is None:
        return
    split = len(fields(VerificationRecord))
    verification, call = VerificationRecord(*row[:split]), CallRecord(*row[split:])
    steps = await _calls_of(tx, verification_id) if verification.step else [call]
    events = [
        CallEventRecord(*event)
        for event in await tx.fetchall(
            f"SELECT {_columns(CallEventRecord)} FROM call_events "
            "WHERE call_id = ? ORDER BY at, rowid",
            (call.id,),
        )
    ]
    await tx.execute(
        "INSERT INTO webhook_outbox (id, verification_id, url, type, created_at, "
        "next_attempt_at, snapshot) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            "msg_" + secrets.token_hex(16),
            verification_id,
            verification.callback_url,
            kind,
            at,
            at,
            Snapshot(verification, call, events, steps).encode(),
        ),
    )


async def _calls_of(tx: Tx, verification_id: str) -> list[CallRecord]:
    """A verification's calls, one per step, the first first."""
    rows = await tx.fetchall(
        f"SELECT {_C_COLS} FROM calls WHERE verification_id = ? ORDER BY step",
        (verification_id,),
    )
    return [CallRecord(*row) for row in rows]


_EVENT_INSERT = (
    f"INSERT INTO call_events ({_columns(CallEventRecord)}) "
    f"VALUES ({_placeholders(CallEventRecord)})"
)


def _event(
    call_id: str,
    at: float | None,
    kind: str,
    cause: int | None = None,
    sip_code: int | None = None,
) -> tuple[str, Sequence[Any]]:
    """The statement of one entry of a call's timeline (CallEventRecord)."""
    return _EVENT_INSERT, (call_id, at, kind, cause, sip_code)


async def _add_event(
    tx: Tx,
    call_id: str,
    at: float | None,
    kind: str,
    cause: int | None = None,
    sip_code: int | None = None,
) -> None:
    """One entry of a call's timeline, in the caller's transaction."""
    await tx.execute(*_event(call_id, at, kind, cause, sip_code))


async def _together(tx: Tx, *statements: tuple[str, Sequence[Any]]) -> Row | None:
    """Run writes in order and return the last one's row (what its RETURNING gives, or
    None): on PostgreSQL as one statement (each but the last a WITH query), one round
    trip instead of one each.

    They must not depend on each other: in one statement, no part sees what another
    writes, and none may change a row another changes (a foreign key to a row another
    inserts holds: it is checked at the statement's end)."""
    *first, (last, last_args) = statements
    if tx.dialect != POSTGRESQL or not first:
        for sql, args in first:
            await tx.execute(sql, args)
        return await tx.fetchone(last, last_args)
    with_queries = ", ".join(f"w{n} AS ({sql})" for n, (sql, _) in enumerate(first))
    return await tx.fetchone(
        f"WITH {with_queries} {last}", [value for _, args in statements for value in args]
    )


async def _next_seqs(tx: Tx, prefix: str | None) -> tuple[int, int | None]:
    """The numbers a new dialed verification takes: overall, and within `prefix`."""
    # IS NOT NULL lets the planner read the maximum off the partial index.
    row = await tx.fetchone(
        "SELECT (SELECT MAX(global_seq) FROM verifications WHERE global_seq IS NOT NULL), "
        "(SELECT MAX(prefix_seq) FROM verifications "
        "WHERE phone_prefix = ? AND prefix_seq IS NOT NULL)",
        (prefix,),
    )
    latest, in_prefix = row if row else (None, None)
    return (latest or 0) + 1, None if prefix is None else (in_prefix or 0) + 1


async def _window_full(
    tx: Tx, limit: WindowLimit, at: float, seqs: tuple[int, int | None] | None
) -> float | None:
    """Seconds until `limit` has room for one more verification, or None when it has.

    The window is full when the `count`-th latest verification it counts is inside it;
    the global and per-prefix windows find that one by its number (`seqs`: what the new
    one would take), a phone's voice window by walking its few latest calls (its other
    windows: _limited)."""
    row = None
    if limit.column == "voice_phone":
        row = await tx.fetchone(
            "SELECT c.queued_at FROM verifications v JOIN calls c ON c.verification_id = v.id "
            "WHERE v.phone = ? AND NOT v.sandbox AND c.channel = 'voice' "
            "ORDER BY c.queued_at DESC LIMIT 1 OFFSET ?",
            (limit.value, limit.count - 1),
        )
    elif seqs is not None:
        overall, in_prefix = seqs
        if limit.column is None and overall > limit.count:
            row = await tx.fetchone(
                "SELECT created_at FROM verifications WHERE global_seq = ?",
                (overall - limit.count,),
            )
        elif limit.column == "phone_prefix" and in_prefix is not None and in_prefix > limit.count:
            row = await tx.fetchone(
                "SELECT created_at FROM verifications WHERE phone_prefix = ? AND prefix_seq = ?",
                (limit.value, in_prefix - limit.count),
            )
    return _room_after(None if row is None else float(row[0]), limit, at)


def _room_after(oldest: float | None, limit: WindowLimit, at: float) -> float | None:
    """Seconds until `limit` has room, its `count`-th latest verification made at
    `oldest` (None: it has fewer); None when it has room now."""
    if oldest is None or oldest <= at - limit.seconds:
        return None
    # `count` already in the window: room once the oldest of them leaves it.
    return max(1.0, oldest + limit.seconds - at)


async def _key_usage_full(tx: Tx, limit: WindowLimit, at: float) -> float | None:
    """Seconds until the key may call again (any call, or a voice call: the limit's
    column), or None when its window has room.

    Counted by minute: a call made in the window's first minute counts for the whole
    minute, so the budget errs by at most a minute's calls towards refusing."""
    first = int((at - limit.seconds) // 60) + 1
    table = _USAGE_TABLES[str(limit.column)]
    rows = await tx.fetchall(
        f"SELECT minute, calls FROM {table} WHERE api_key_id = ? AND minute >= ? ORDER BY minute",
        (limit.value, first),
    )
    used = sum(calls for _, calls in rows)
    if used < limit.count:
        return None
    for minute, calls in rows:  # the oldest minutes leave the window first
        used -= calls
        if used < limit.count:
            return max(1.0, float((minute + 1) * 60 + limit.seconds - at))
    return float(limit.seconds)


async def _check_limits_full(
    tx: Tx,
    limits: tuple[CheckLimit, ...],
    phone: str,
    api_key_id: str,
    at: float,
) -> Limited | None:
    """The first of `limits` that the wrong checks against `phone` already fill, with
    the seconds until it has room; None when each has room. A phone has few rows: the
    limits refuse its checks long before they could grow."""
    rows = await tx.fetchall(
        "SELECT at, failures, api_key_id = ? FROM check_failures "
        "WHERE phone = ? AND at > ? ORDER BY at",
        (api_key_id, phone, at - max(limit.seconds for limit in limits)),
    )
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


async def _count_key_usage(tx: Tx, api_key_id: str, at: float, table: str = "key_usage") -> None:
    """One more call of the key this minute, in `table` (key_usage: every call;
    voice_usage: voice calls)."""
    row = await tx.fetchone(*_key_usage_count(api_key_id, at, table))
    await _forget_old_usage(tx, row, api_key_id, at, table)


def _key_usage_count(api_key_id: str, at: float, table: str) -> tuple[str, Sequence[Any]]:
    """The statement of _count_key_usage: its row is the minute's count."""
    return (
        f"INSERT INTO {table} (api_key_id, minute, calls) VALUES (?, ?, 1) "
        f"ON CONFLICT (api_key_id, minute) DO UPDATE SET calls = {table}.calls + 1 "
        "RETURNING calls",
        (api_key_id, int(at // 60)),
    )


async def _forget_old_usage(
    tx: Tx, counted: Row | None, api_key_id: str, at: float, table: str
) -> None:
    """Once a minute per key (the first count of a minute): forget the minutes no window
    looks at (a day)."""
    if counted is not None and counted[0] == 1:
        await tx.execute(
            f"DELETE FROM {table} WHERE api_key_id = ? AND minute < ?",
            (api_key_id, int(at // 60) - 2 * 1440),
        )


_POOL_HEALTH_COLS = _columns(PoolHealthRecord)
POOL_HEALTH_LOCK = "pool_health:"


def _pool_health(row: Row) -> PoolHealthRecord:
    pool, carrier, state, since, failures, recent, held, probe_at, updated_at = row
    return PoolHealthRecord(
        pool=pool,
        carrier=carrier,
        state=PoolState(state),
        since=since,
        failures=failures,
        recent=recent,
        held=bool(held),
        probe_at=probe_at,
        updated_at=updated_at,
    )


async def _judge_route(tx: Tx, route: RouteReport, at: float) -> list[PoolChange]:
    """Apply what a call's end says of its pool's route (caller_health.after_call),
    holding the carrier's lock: every gateway judges one carrier's pools in turn."""
    await tx.lock(POOL_HEALTH_LOCK + route.carrier)
    rows = {
        record.pool: record
        for record in map(
            _pool_health,
            await tx.fetchall(
                f"SELECT {_POOL_HEALTH_COLS} FROM pool_health WHERE carrier = ?",
                (route.carrier,),
            ),
        )
    }
    written, changes = after_call(rows, route, at)
    for record in written:
        await tx.execute(
            f"INSERT INTO pool_health ({_POOL_HEALTH_COLS}) "
            f"VALUES ({_placeholders(PoolHealthRecord)}) ON CONFLICT (carrier, pool) DO UPDATE SET "
            "state = excluded.state, since = excluded.since, failures = excluded.failures, "
            "recent = excluded.recent, held = excluded.held, probe_at = excluded.probe_at, "
            "updated_at = excluded.updated_at",
            values_of(record),
        )
    return changes


# The conversion watch counts verifications per destination block and minute of creation.
CONVERSION_MINUTE_S = 60
# Each kind of conversion target: what names it in the conversion table. A carrier is
# named with its country ("ID:Telkomsel"): phonenumbers gives one name to carriers of
# several countries.
_CONVERSION_TARGETS = {
    AlertKind.BLOCK: "block",
    AlertKind.CARRIER: "region || ':' || carrier",
    AlertKind.COUNTRY: "region",
}
_ALERT_COLS = _columns(AlertRecord)
# Verifications the conversion watch leaves out once they end so: canceled by the client
# (or superseded by its new request), and failed (never delivered: pool health's matter).
_LEFT_OUT_OF_CONVERSION = (VerificationStatus.CANCELED, VerificationStatus.FAILED)
_COUNTED = "CASE WHEN created > 0 THEN created ELSE 0 END"
_DELIVERED = ", ".join(f"'{outcome}'" for outcome in sorted(DELIVERED_OUTCOMES))


def _alert(row: Row) -> AlertRecord:
    return AlertRecord(row[0], AlertKind(row[1]), *row[2:])


async def _count_conversion(
    tx: Tx, verification: VerificationRecord, created: int, approved: int = 0
) -> None:
    """Add to the conversion counts of `verification`'s block and creation minute; a
    sandbox verification is left out."""
    statement = _conversion_count(verification, created, approved)
    if statement is not None:
        await tx.execute(*statement)


def _conversion_count(
    verification: VerificationRecord, created: int, approved: int = 0
) -> tuple[str, Sequence[Any]] | None:
    """The statement of _count_conversion; None for a verification left out."""
    if verification.sandbox or verification.phone_prefix is None:
        return None
    return (
        "INSERT INTO conversion (block, minute, carrier, region, created, approved) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (block, minute) DO UPDATE SET "
        "created = conversion.created + excluded.created, "
        "approved = conversion.approved + excluded.approved",
        (
            verification.phone_prefix,
            int(verification.created_at // CONVERSION_MINUTE_S),
            verification.carrier or "",
            verification.region,
            created,
            approved,
        ),
    )


async def _leave_out(tx: Tx, verification: VerificationRecord) -> None:
    """Take a verification that ended canceled or failed out of its conversion counts.
    A failed one only if no call of it delivered the code: one that never reached the
    user is a matter for pool health; one that did, and was never checked, converts no
    better than a pumped one."""
    if verification.status is VerificationStatus.FAILED and await tx.fetchone(
        f"SELECT 1 FROM calls WHERE verification_id = ? AND outcome IN ({_DELIVERED})",
        (verification.id,),
    ):
        return
    await _count_conversion(tx, verification, -1)


async def _limited(
    tx: Tx, limits: tuple[WindowLimit, ...], at: float, seqs: tuple[int, int | None] | None
) -> Limited | None:
    """The first of `limits` with no room for one more at `at`, else None."""
    # A phone's windows all walk its few latest verifications: read once, for the widest.
    by_phone = [limit for limit in limits if limit.column == "phone"]
    latest: list[float] = []
    if by_phone:
        rows = await tx.fetchall(
            "SELECT created_at FROM verifications WHERE phone = ? AND NOT sandbox "
            "ORDER BY created_at DESC LIMIT ?",
            (by_phone[0].value, max(limit.count for limit in by_phone)),
        )
        latest = [float(row[0]) for row in rows]
    for limit in limits:
        if limit.column in _USAGE_TABLES:
            retry_after = await _key_usage_full(tx, limit, at)
        elif limit.column == "phone":
            # Full when the `count`-th latest is inside the window.
            oldest = latest[limit.count - 1] if len(latest) >= limit.count else None
            retry_after = _room_after(oldest, limit, at)
        else:
            retry_after = await _window_full(tx, limit, at, seqs)
        if retry_after is not None:
            return Limited(retry_after, _LIMIT_NAMES[limit.column])
    return None


class SqlStore(abc.ABC):
    """The gateway's state: every operation, on the backend a subclass connects to."""

    def __init__(self) -> None:
        self._keys: dict[str, tuple[float, ApiKeyRecord | None]] = {}  # by key hash
        # Verifications that reached each status through this store, counted after the
        # commit: /metrics reports them.
        self.status_tally: collections.Counter[VerificationStatus] = collections.Counter()
        self.cpu_seconds: float | None = None  # see Store.cpu_seconds

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connections, once the work already queued is done."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The number of migrations applied."""

    @abc.abstractmethod
    async def _run(
        self,
        operation: Operation[T],
        write: bool = False,
        lazy: bool = False,
        quick: bool = False,
        single: bool = False,
    ) -> T:
        """`operation` in a transaction of its own: committed if it returns, rolled back
        if it raises. `lazy`: nobody waits on it (it may wait a little for company);
        `quick`: a lookup by key or a few rows written (SQLite may run it on the loop);
        `single`: on PostgreSQL it is one statement, atomic without BEGIN and COMMIT."""

    async def _write(
        self, operation: Operation[T], lazy: bool = False, quick: bool = False, single: bool = False
    ) -> T:
        return await self._run(operation, write=True, lazy=lazy, quick=quick, single=single)

    async def _fetchone(self, sql: str, args: Sequence[Any] = (), quick: bool = False) -> Any:
        return await self._run(lambda tx: tx.fetchone(sql, args), quick=quick)

    async def _fetchall(self, sql: str, args: Sequence[Any] = (), quick: bool = False) -> list[Row]:
        return await self._run(lambda tx: tx.fetchall(sql, args), quick=quick)

    async def _fetchall_write(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """The rows a write returns (UPDATE ... RETURNING), in a transaction of its own."""
        return await self._write(lambda tx: tx.fetchall(sql, args))

    async def ping(self) -> None:
        """Raise when the database cannot answer a query."""
        await self._fetchone("SELECT 1")

    # -- API keys --------------------------------------------------------------

    async def add_api_key(self, key: ApiKeyRecord) -> None:
        await self._write(
            lambda tx: tx.execute(
                f"INSERT INTO api_keys ({_columns(ApiKeyRecord)}) "
                f"VALUES ({_placeholders(ApiKeyRecord)})",
                values_of(key),
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
            lambda tx: tx.execute(
                "UPDATE api_keys SET revoked_at = ? "
                "WHERE (id = ? OR name = ?) AND revoked_at IS NULL",
                (at, id_or_name, id_or_name),
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
        The Idempotency-Key and the limits are looked at in the insert's transaction,
        under CREATE_LOCK: concurrent retries of one key store one verification, and
        concurrent requests (on any gateway) cannot both slip under a limit. With
        `invalid_since`, a number the network called invalid after that time is refused
        (KnownInvalid), in the same transaction.
        """

        async def create(tx: Tx) -> Inserted | Limited | Replayed | KnownInvalid:
            await tx.lock(CREATE_LOCK)
            if idempotency is not None:
                row = await tx.fetchone(
                    "SELECT body_hash, status, response FROM idempotency_keys "
                    "WHERE api_key_id = ? AND key = ? AND created_at > ?",
                    (idempotency.api_key_id, idempotency.key, idempotency.since),
                )
                if row is not None:
                    return _replayed(row)
            if invalid_since is not None:
                row = await tx.fetchone(
                    "SELECT last_call_at, last_outcome, last_cause FROM number_health "
                    "WHERE phone = ? AND status = 'invalid' AND last_call_at > ?",
                    (verification.phone, invalid_since),
                )
                if row is not None:
                    return KnownInvalid(*row)
            seqs = None if verification.sandbox else await _next_seqs(tx, verification.phone_prefix)
            limited = await _limited(tx, limits, verification.created_at, seqs)
            if limited is not None:
                return limited
            rows = await tx.fetchall(
                "SELECT v.id, c.id, c.status, v.created_at, v.sandbox, "
                "v.callback_url IS NOT NULL FROM verifications v "
                "INDEXED BY verifications_pending_by_phone "
                f"LEFT JOIN calls c ON {_CURRENT_CALL} "
                "WHERE v.phone = ? AND v.api_key_id = ? AND v.status = 'pending'",
                (verification.phone, verification.api_key_id),
            )
            superseded = [
                (vid, cid if status in LIVE_CALL_STATUSES else None)
                for vid, cid, status, _, _, _ in rows
            ]
            for vid, _, _, created_at, sandbox, hooks in rows:
                await tx.execute(
                    "UPDATE verifications SET status = 'canceled', updated_at = ?, next_at = NULL "
                    "WHERE id = ?",
                    (verification.created_at, vid),
                )
                # The client asked again: the earlier one is no unconverted verification.
                if not sandbox:
                    earlier = dataclasses.replace(
                        verification, created_at=created_at, sandbox=False
                    )
                    await _count_conversion(tx, earlier, -1)
                if hooks:
                    await _enqueue(
                        tx, vid, STATUS_EVENTS[VerificationStatus.CANCELED], verification.created_at
                    )
            inserts: list[tuple[str, Sequence[Any]]] = [
                (
                    f"INSERT INTO verifications ({_V_COLS}, global_seq, prefix_seq) "
                    f"VALUES ({_placeholders(VerificationRecord)}, ?, ?)",
                    (*values_of(verification), *(seqs or (None, None))),
                ),
                (
                    f"INSERT INTO calls ({_C_COLS}) VALUES ({_placeholders(CallRecord)})",
                    values_of(call),
                ),
            ]
            if call.status is CallStatus.DIALING:  # placed as soon as stored (Dialer.reserve)
                inserts.append(_event(call.id, call.dialed_at, "dialing"))
            if not verification.sandbox:  # counted: its block's conversion, its key's calls
                conversion = _conversion_count(verification, 1)
                if conversion is not None:
                    inserts.append(conversion)
                usage = (verification.api_key_id, verification.created_at, "key_usage")
                inserts.append(_key_usage_count(*usage))  # last: its count comes back
            # Under CREATE_LOCK: on PostgreSQL one round trip, not five.
            counted = await _together(tx, *inserts)
            if verification.sandbox:  # its call is delivered as it is stored
                if verification.callback_url is not None:
                    await _enqueue(tx, verification.id, "verification.delivered", call.queued_at)
            else:
                await _forget_old_usage(tx, counted, *usage)
                if call.channel == "voice":
                    await _count_key_usage(
                        tx, verification.api_key_id, verification.created_at, "voice_usage"
                    )
            if idempotency is not None:
                await tx.execute(
                    "INSERT INTO idempotency_keys "
                    "(api_key_id, key, body_hash, status, response, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (api_key_id, key) DO UPDATE SET "
                    "body_hash = excluded.body_hash, status = excluded.status, "
                    "response = excluded.response, created_at = excluded.created_at",
                    (
                        idempotency.api_key_id,
                        idempotency.key,
                        idempotency.body_hash,
                        _SNAPSHOT_STATUS,
                        Snapshot(verification, call, []).encode(),
                        verification.created_at,
                    ),
                )
            return Inserted(superseded)

        result = await self._write(create, quick=True)
        if isinstance(result, Inserted):
            self.status_tally[VerificationStatus.PENDING] += 1
            self.status_tally[VerificationStatus.CANCELED] += len(result.superseded)
        return result

    async def idempotent_response(self, api_key_id: str, key: str, since: float) -> Replayed | None:
        """The stored response to an Idempotency-Key used since `since`."""
        row = await self._fetchone(
            "SELECT body_hash, status, response FROM idempotency_keys "
            "WHERE api_key_id = ? AND key = ? AND created_at > ?",
            (api_key_id, key, since),
            quick=True,
        )
        return _replayed(row) if row else None

    async def forget_idempotency_keys(self, before: float) -> int:
        """Drop Idempotency-Keys older than `before`; return how many."""
        return await self._write(
            lambda tx: tx.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (before,))
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

        async def forget(tx: Tx) -> tuple[int, int | None]:
            rows = await tx.fetchall(
                "SELECT v.rowid, v.id, v.created_at, v.status = 'pending' "
                "OR EXISTS (SELECT 1 FROM calls c WHERE c.verification_id = v.id "
                "AND c.status IN ('queued', 'dialing', 'ringing')) "
                "OR EXISTS (SELECT 1 FROM webhook_outbox w WHERE w.verification_id = v.id "
                "AND w.delivered_at IS NULL AND w.given_up_at IS NULL) "
                "FROM verifications v WHERE v.rowid > ? ORDER BY v.rowid LIMIT ?",
                (after, limit),
            )
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
                    await tx.execute(statement, ids)
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
        row = await self._fetchone(
            f"SELECT {_V_COLS_OF_V}, {_C_COLS_OF_C} FROM verifications v "
            f"JOIN calls c ON {_CURRENT_CALL} WHERE {where}",
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
        source: str | None = None,
    ) -> VerificationRecord | Limited | None:
        """Record one check of a pending verification; None when it was not pending.

        A right code approves it, keeping the check's `source` (how the code was
        obtained); a wrong one spends an attempt, and the last wrong attempt moves it to
        max_attempts_reached. One statement, so two concurrent
        checks can never both spend the same attempt.

        When the phone's wrong checks already fill one of `limits`, nothing is spent and
        the check, right or wrong, is refused (Limited). The count is read and the wrong
        check recorded in one transaction holding the phone's lock: concurrent checks,
        on any gateway, cannot pass a limit together.
        """

        async def spend(tx: Tx) -> VerificationRecord | Limited | None:
            if limits:
                checked = await tx.fetchone(
                    "SELECT phone, api_key_id FROM verifications "
                    "WHERE id = ? AND status = 'pending' AND expires_at > ?",
                    (verification_id, at),
                )
                if checked is None:
                    return None
                await tx.lock(CHECKS_LOCK + checked[0])
                refused = await _check_limits_full(tx, limits, checked[0], checked[1], at)
                if refused is not None:
                    return refused
            row = await tx.fetchone(
                "UPDATE verifications SET "
                "attempts_remaining = attempts_remaining - CASE WHEN ? THEN 0 ELSE 1 END, "
                "failed_checks = failed_checks + CASE WHEN ? THEN 0 ELSE 1 END, "
                "status = CASE WHEN ? THEN 'approved' "
                "WHEN attempts_remaining <= 1 THEN 'max_attempts_reached' ELSE status END, "
                "next_at = CASE WHEN ? OR attempts_remaining <= 1 THEN NULL ELSE next_at END, "
                "check_source = CASE WHEN ? THEN ? ELSE check_source END, "
                "updated_at = ? "
                f"WHERE id = ? AND status = 'pending' AND expires_at > ? RETURNING {_V_COLS}",
                (approve, approve, approve, approve, approve, source, at, verification_id, at),
            )
            record = VerificationRecord(*row) if row else None
            if record is not None and record.status in STATUS_EVENTS:
                await _enqueue(tx, verification_id, STATUS_EVENTS[record.status], at)
            if record is not None and record.status is VerificationStatus.APPROVED:
                await _count_conversion(tx, record, 0, approved=1)
            if record is not None and not approve:
                await tx.execute(
                    "INSERT INTO check_failures (phone, api_key_id, at, failures) "
                    "VALUES (?, ?, ?, 1)",
                    (record.phone, record.api_key_id, at),
                )
                if limits:  # what no window looks at any more: every phone's, by index
                    await tx.execute(
                        "DELETE FROM check_failures WHERE at <= ?",
                        (at - max(limit.seconds for limit in limits),),
                    )
            return record

        record = await self._write(spend, quick=True)
        if (
            isinstance(record, VerificationRecord)
            and record.status is not VerificationStatus.PENDING
        ):
            self.status_tally[record.status] += 1
        return record

    async def reset_check_failures(self, phone: str) -> int:
        """Forget the wrong checks against `phone`, every key's; return how many."""

        async def forget(tx: Tx) -> int:
            forgotten = await tx.fetchall(
                "DELETE FROM check_failures WHERE phone = ? RETURNING failures", (phone,)
            )
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

    async def replace_code(
        self, verification_id: str, code_hash: str, code_sealed: str | None, at: float
    ) -> bool:
        """A queued call resumed after a restart shows a new caller ID: its code's hash
        (and the code sealed, for a verification a voice step may speak)."""
        changed = await self._write(
            lambda tx: tx.execute(
                "UPDATE verifications SET code_hash = ?, code_sealed = ?, updated_at = ? "
                "WHERE id = ? AND status = 'pending'",
                (code_hash, code_sealed, at, verification_id),
            )
        )
        return changed == 1

    async def start_step(
        self,
        verification_id: str,
        call: CallRecord,
        at: float,
        limits: tuple[WindowLimit, ...] = (),
        min_gap: float | None = None,
    ) -> VerificationRecord | Limited | None:
        """Move a pending verification on to `call.step` (the step after its current
        one), storing `call`, queued; the verification as it is then. None when it is
        no longer pending or another gateway moved it on first.

        With `min_gap` the client asked (`next`): refused (Limited) when it asked less
        than `min_gap` seconds ago. `limits` are looked at as a create's are, under
        CREATE_LOCK."""

        async def start(tx: Tx) -> VerificationRecord | Limited | None:
            await tx.lock(CREATE_LOCK)
            row = await tx.fetchone(
                "SELECT step, next_asked_at, api_key_id FROM verifications "
                "WHERE id = ? AND status = 'pending'",
                (verification_id,),
            )
            if row is None or row[0] != call.step - 1:
                return None
            if min_gap is not None and row[1] is not None and at - row[1] < min_gap:
                return Limited(row[1] + min_gap - at, "next_gap")
            limited = await _limited(tx, limits, at, None)
            if limited is not None:
                if min_gap is None:  # due by itself: it will not be, again
                    await tx.execute(
                        "UPDATE verifications SET next_at = NULL WHERE id = ?", (verification_id,)
                    )
                return limited
            await tx.execute(
                f"INSERT INTO calls ({_C_COLS}) VALUES ({_placeholders(CallRecord)})",
                values_of(call),
            )
            await _add_event(tx, call.id, at, f"step:{call.channel}")
            if call.channel == "voice" and call.reason != "sandbox":  # a test number's: free
                await _count_key_usage(tx, row[2], at, "voice_usage")
            await tx.execute(
                "UPDATE verifications SET step = ?, next_at = NULL, updated_at = ?, "
                "next_asked_at = COALESCE(?, next_asked_at) WHERE id = ?",
                (call.step, at, at if min_gap is not None else None, verification_id),
            )
            found = await tx.fetchone(
                f"SELECT {_V_COLS} FROM verifications WHERE id = ?", (verification_id,)
            )
            assert found is not None
            return VerificationRecord(*found)

        return await self._write(start, quick=True)

    async def due_steps(
        self, now: float, limit: int
    ) -> list[tuple[VerificationRecord, CallRecord]]:
        """Pending verifications whose next step is due (next_at passed), the most
        overdue first, with their current calls."""
        rows = await self._fetchall(
            f"SELECT {_V_COLS_OF_V}, {_C_COLS_OF_C} FROM verifications v "
            f"JOIN calls c ON {_CURRENT_CALL} "
            "WHERE v.next_at <= ? AND v.status = 'pending' ORDER BY v.next_at LIMIT ?",
            (now, limit),
            quick=True,
        )
        split = len(fields(VerificationRecord))
        return [(VerificationRecord(*row[:split]), CallRecord(*row[split:])) for row in rows]

    async def calls_of(self, verification_id: str) -> list[CallRecord]:
        """A verification's calls, one per step tried, the first first."""
        return await self._run(lambda tx: _calls_of(tx, verification_id), quick=True)

    async def set_status(self, verification_id: str, status: VerificationStatus, at: float) -> bool:
        """Move a pending verification to `status`; False when it was not pending."""

        async def update(tx: Tx) -> bool:
            row = await tx.fetchone(
                "UPDATE verifications SET status = ?, updated_at = ?, next_at = NULL "
                f"WHERE id = ? AND status = 'pending' RETURNING {_V_COLS}",
                (status, at, verification_id),
            )
            if row is not None and status in STATUS_EVENTS:
                await _enqueue(tx, verification_id, STATUS_EVENTS[status], at)
            if row is not None and status in _LEFT_OUT_OF_CONVERSION:
                await _leave_out(tx, VerificationRecord(*row))
            return row is not None

        changed = await self._write(update, quick=True)
        if changed:
            self.status_tally[status] += 1
        return changed

    async def expire_due(self, now: float) -> list[str]:
        """Expire pending verifications past their TTL; return their ids."""

        async def expire(tx: Tx) -> list[str]:
            expired = [
                str(row[0])
                for row in await tx.fetchall(
                    "UPDATE verifications SET status = 'expired', updated_at = ?, next_at = NULL "
                    "WHERE status = 'pending' AND expires_at <= ? RETURNING id",
                    (now, now),
                )
            ]
            for verification_id in expired:
                await _enqueue(tx, verification_id, STATUS_EVENTS[VerificationStatus.EXPIRED], now)
            return expired

        expired = await self._write(expire)
        self.status_tally[VerificationStatus.EXPIRED] += len(expired)
        return expired

    async def next_expiry(self) -> float | None:
        row = await self._fetchone(
            "SELECT MIN(expires_at) FROM verifications WHERE status = 'pending'", quick=True
        )
        return float(row[0]) if row and row[0] is not None else None

    # -- calls -----------------------------------------------------------------

    async def call_progress(
        self, call_id: str, status: CallStatus, column: str, at: float, event: str
    ) -> None:
        """A live call reached `status` (dialing or ringing) at `at`, seen as `event`."""
        if column not in ("dialed_at", "ringing_at"):
            raise ValueError(column)

        async def progress(tx: Tx) -> None:
            await _together(
                tx,
                (
                    f"UPDATE calls SET status = ?, {column} = COALESCE({column}, ?) "
                    "WHERE id = ? AND status IN ('queued', 'dialing', 'ringing')",
                    (status, at, call_id),
                ),
                _event(call_id, at, event),
            )

        # Dialing is written before the Originate, which waits for it; ringing is news.
        await self._write(progress, lazy=status is CallStatus.RINGING, quick=True, single=True)

    async def add_call_event(self, event: CallEventRecord) -> None:
        await self._write(lambda tx: _add_event(tx, *values_of(event)), quick=True)

    async def end_call(
        self,
        call_id: str,
        *,
        call_status: CallStatus,
        outcome: str,
        cause: int | None,
        sip_code: int | None,
        reason: str | None,
        at: float,
        fail_verification: bool,
        health: str | None = None,
        delivered: bool = False,
        uncertain: bool = False,
        next_at: float | None = None,
        route: RouteReport | None = None,
    ) -> list[PoolChange]:
        """Close a call with its outcome; fail its verification if asked, or with
        `next_at`, have its next step start then instead (Verifications.start_due).

        With `route`, a call that was dialed also judges its pool's route to the carrier
        (gateway.caller_health) in the same transaction; the pool states it changed are
        returned, for the caller to tell.

        Only the verification's current step decides its fate: a call the client moved
        past (`next`) ends without changing it.

        A call that was dialed also updates its number's health: `health` is what the
        outcome says of the number (None: nothing), `delivered` whether it alerted,
        `uncertain` whether it ended with no verdict (the verification stays pending).
        Not a call that says nothing of its number (outcomes.about_number).
        """

        async def end(tx: Tx) -> tuple[bool, list[PoolChange]]:
            """Whether it failed the verification, and the pool states it changed."""
            closing = (
                "UPDATE calls SET status = ?, outcome = ?, hangup_cause = ?, sip_code = ?, "
                "reason = ?, ended_at = ? "
                "WHERE id = ? AND ended_at IS NULL RETURNING verification_id, step, dialed_at"
            )
            args = (call_status, outcome, cause, sip_code, reason, at, call_id)
            noted = (call_id, at, f"ended:{outcome}", cause, sip_code)
            # What the rest needs of the verification, read with it: its step, whether
            # it is pending, its phone, whether it asked for webhooks.
            if tx.dialect == POSTGRESQL:  # the call's end, its timeline entry, that: one trip
                row = await tx.fetchone(
                    f"WITH ended AS ({closing}), noted AS ("
                    f"INSERT INTO call_events ({_columns(CallEventRecord)}) SELECT ?::text, "
                    "?::double precision, ?::text, ?::integer, ?::integer FROM ended) "
                    "SELECT e.verification_id, e.step, e.dialed_at, v.step, "
                    "COALESCE(v.status = 'pending', FALSE), v.phone, "
                    "v.callback_url IS NOT NULL FROM ended e "
                    "LEFT JOIN verifications v ON v.id = e.verification_id",
                    (*args, *noted),
                )
            else:
                row = await tx.fetchone(closing, args)
                if row is not None:
                    await _add_event(tx, *noted)
                    found = await tx.fetchone(
                        "SELECT step, status = 'pending', phone, callback_url IS NOT NULL "
                        "FROM verifications WHERE id = ?",
                        (row[0],),
                    )
                    row = (*row, *(found or (None, False, None, False)))
            if row is None:
                return False, []
            failed = False
            verification_id, step, dialed_at, current_step, pending, phone, hooks = row
            if next_at is not None:
                await tx.execute(
                    "UPDATE verifications SET next_at = ?, updated_at = ? "
                    "WHERE id = ? AND status = 'pending' AND step = ?",
                    (next_at, at, verification_id, step),
                )
            if fail_verification and next_at is None:
                ended = await tx.fetchone(
                    "UPDATE verifications SET status = 'failed', updated_at = ?, "
                    "next_at = NULL WHERE id = ? AND status = 'pending' AND step = ? "
                    f"RETURNING {_V_COLS}",
                    (at, verification_id, step),
                )
                failed = ended is not None
                if ended is not None:
                    if hooks:
                        kind = STATUS_EVENTS[VerificationStatus.FAILED]
                        await _enqueue(tx, verification_id, kind, at)
                    await _leave_out(tx, VerificationRecord(*ended))
            elif hooks and current_step == step:
                # News of the current step only: a call the client moved past (`next`)
                # would report the next step's call as delivered.
                if delivered:
                    await _enqueue(tx, verification_id, "verification.delivered", at)
                elif uncertain and pending:
                    # Only news while the code may still be typed (not after approval).
                    kind = "verification.delivery_uncertain"
                    await _enqueue(tx, verification_id, kind, at)
            if dialed_at is not None and phone is not None and about_number(outcome, reason):
                await tx.execute(
                    "INSERT INTO number_health (phone, status, last_outcome, last_cause, "
                    "last_sip_code, last_call_at, last_delivered_at, calls, delivered, "
                    "updated_at) VALUES (?, COALESCE(?, 'unknown'), ?, ?, ?, ?, ?, 1, ?, ?) "
                    "ON CONFLICT (phone) DO UPDATE SET "
                    "status = COALESCE(?, number_health.status), "
                    "last_outcome = excluded.last_outcome, "
                    "last_cause = excluded.last_cause, last_sip_code = excluded.last_sip_code, "
                    "last_call_at = excluded.last_call_at, last_delivered_at = "
                    "COALESCE(excluded.last_delivered_at, number_health.last_delivered_at), "
                    "calls = number_health.calls + 1, "
                    "delivered = number_health.delivered + excluded.delivered, "
                    "updated_at = excluded.updated_at",
                    (
                        phone,
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
            changes: list[PoolChange] = []
            if route is not None and dialed_at is not None:
                # Last: the carrier's lock, which every gateway's call ends to that
                # carrier take, is held for no more than this and the commit.
                changes = await _judge_route(tx, route, at)
            return failed, changes

        failed, changes = await self._write(end, lazy=True, quick=True)
        if failed:
            self.status_tally[VerificationStatus.FAILED] += 1
        return changes

    async def claim_call(self, call_id: str, owner: str, at: float, node: str | None = None) -> str:
        """Mark a queued call of `owner` (or of nobody) dialing on `node`, before its Originate,
        if its verification is still pending: CLAIMED. NOT_PENDING: the verification
        was canceled meanwhile (perhaps through another gateway); TAKEN: the call is not
        queued or not `owner`'s any more (another gateway adopted it). Only a claimed
        call may be dialed."""

        async def claim(tx: Tx) -> str:
            claimed = await tx.execute(
                "UPDATE calls SET status = 'dialing', dialed_at = ?, owner = ?, node = ? "
                "WHERE id = ? AND status = 'queued' AND (owner = ? OR owner IS NULL) "
                "AND EXISTS (SELECT 1 FROM verifications v WHERE v.id = calls.verification_id "
                "AND v.status = 'pending' AND v.step = calls.step)",
                (at, owner, node, call_id, owner),
            )
            if claimed == 1:
                await _add_event(tx, call_id, at, "dialing")
                return CLAIMED
            row = await tx.fetchone(
                "SELECT 1 FROM calls WHERE id = ? AND status = 'queued' "
                "AND (owner = ? OR owner IS NULL)",
                (call_id, owner),
            )
            return NOT_PENDING if row else TAKEN

        return await self._write(claim, quick=True)

    async def move_call(self, call_id: str, node: str) -> None:
        """Record that a dialing call is placed on `node` after all (its first node could
        not take it)."""

        async def move(tx: Tx) -> None:
            await tx.execute(
                "UPDATE calls SET node = ? WHERE id = ? AND status = 'dialing'", (node, call_id)
            )

        await self._write(move, quick=True)

    # -- instances -------------------------------------------------------------

    async def register_instance(
        self, name: str, incarnation: str, at: float, lease_until: float
    ) -> InstanceRecord | None:
        """Start `name`'s lease for this `incarnation`; the record of the one it replaces
        (the same name's previous process), if any."""

        async def register(tx: Tx) -> InstanceRecord | None:
            row = await tx.fetchone(
                f"SELECT {_columns(InstanceRecord)} FROM instances WHERE name = ?", (name,)
            )
            await tx.execute(
                "INSERT INTO instances (name, incarnation, started_at, lease_until) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "incarnation = excluded.incarnation, started_at = excluded.started_at, "
                "lease_until = excluded.lease_until, stopped_at = NULL",
                (name, incarnation, at, lease_until),
            )
            return InstanceRecord(*row) if row else None

        return await self._write(register)

    async def renew_lease(self, name: str, incarnation: str, lease_until: float) -> bool:
        """Extend the lease; False when another process has taken the name since."""
        renewed = await self._write(
            lambda tx: tx.execute(
                "UPDATE instances SET lease_until = ? WHERE name = ? AND incarnation = ?",
                (lease_until, name, incarnation),
            ),
            quick=True,
        )
        return renewed == 1

    async def end_lease(self, name: str, incarnation: str, at: float) -> None:
        """The instance stops: its lease ends now, and what it still owns is anyone's."""
        await self._write(
            lambda tx: tx.execute(
                "UPDATE instances SET lease_until = ?, stopped_at = ? "
                "WHERE name = ? AND incarnation = ?",
                (at, at, name, incarnation),
            )
        )

    async def instances(self) -> list[InstanceRecord]:
        rows = await self._fetchall(
            f"SELECT {_columns(InstanceRecord)} FROM instances ORDER BY name"
        )
        return [InstanceRecord(*row) for row in rows]

    async def live_calls_by_owner(self) -> dict[str | None, int]:
        """Live calls (queued, dialing or ringing) per owning gateway (None: nobody's)."""
        rows = await self._fetchall(
            f"SELECT owner, COUNT(*) FROM calls WHERE status IN {_LIVE} GROUP BY owner"
        )
        return {owner: int(n) for owner, n in rows}

    async def release_queued(self, owner: str) -> int:
        """Give up `owner`'s calls not yet dialed (a graceful stop hands them over at
        once); return how many."""
        return await self._write(
            lambda tx: tx.execute(
                "UPDATE calls SET owner = NULL WHERE owner = ? AND status = 'queued'", (owner,)
            )
        )

    async def adopt_calls(self, owner: str, at: float, own: bool = False) -> list[CallRecord]:
        """Make `owner` the owner of every live call whose owner has no lease running at
        `at` (it died, or stopped), or none; with `own`, of `owner`'s own too (its
        previous process's, at start). Each call goes to one adopter."""
        rows = await self._fetchall_write(
            f"UPDATE calls SET owner = ? WHERE status IN {_LIVE} "
            "AND (owner IS NULL OR owner = ? OR (owner <> ? AND owner NOT IN "
            "(SELECT name FROM instances WHERE lease_until > ?))) "
            f"RETURNING {_C_COLS}",
            (owner, owner if own else None, owner, at),
        )
        return sorted((CallRecord(*row) for row in rows), key=lambda call: call.queued_at)

    # -- webhooks --------------------------------------------------------------

    async def claim_webhooks(self, now: float, limit: int, hold: float) -> list[WebhookRecord]:
        """Undelivered webhooks whose next attempt is due, oldest first, claimed for
        `hold` seconds: their next attempt moves to `now + hold`, so no other instance
        (nor this one) takes them meanwhile; one that dies holding them lets them fall
        due again. The records show the claimed next attempt."""

        async def claim(tx: Tx) -> list[Row]:
            skip = " FOR UPDATE SKIP LOCKED" if tx.dialect == POSTGRESQL else ""
            return await tx.fetchall(
                "UPDATE webhook_outbox SET next_attempt_at = ? WHERE id IN ("
                "SELECT id FROM webhook_outbox WHERE delivered_at IS NULL "
                "AND given_up_at IS NULL AND next_attempt_at <= ? "
                f"ORDER BY next_attempt_at LIMIT ?{skip}) "
                f"RETURNING {_columns(WebhookRecord)}",
                (now + hold, now, limit),
            )

        records = [WebhookRecord(*row) for row in await self._write(claim, quick=True)]
        return sorted(records, key=lambda record: (record.created_at, record.id))

    async def pending_webhooks(self) -> int:
        """Webhooks neither delivered nor given up: the sender's backlog."""
        row = await self._fetchone(
            "SELECT COUNT(*) FROM webhook_outbox WHERE delivered_at IS NULL AND given_up_at IS NULL"
        )
        return int(row[0]) if row else 0

    async def next_webhook_at(self) -> float | None:
        row = await self._fetchone(
            "SELECT MIN(next_attempt_at) FROM webhook_outbox "
            "WHERE delivered_at IS NULL AND given_up_at IS NULL",
            quick=True,
        )
        return float(row[0]) if row and row[0] is not None else None

    async def fix_webhook_payload(self, webhook_id: str, payload: str) -> str:
        """Set the payload once (the first attempt's); return the one stored."""

        async def fix(tx: Tx) -> Row | None:
            return await tx.fetchone(
                "UPDATE webhook_outbox SET payload = COALESCE(payload, ?) WHERE id = ? "
                "RETURNING payload",
                (payload, webhook_id),
            )

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
        given_up = not delivered and next_attempt_at is None
        await self._write(
            lambda tx: tx.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, last_status = ?, "
                "last_error = ?, delivered_at = ?, "
                "next_attempt_at = COALESCE(?, next_attempt_at), given_up_at = ? WHERE id = ?",
                (
                    status,
                    error,
                    at if delivered else None,
                    next_attempt_at,
                    at if given_up else None,
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

        async def read(tx: Tx) -> list[Row]:
            rows: list[Row] = []
            # SQLite allows 32766 parameters; a lookup batch is at most 1,000.
            for start in range(0, len(phones), 500):
                chunk = phones[start : start + 500]
                rows += await tx.fetchall(
                    f"SELECT {_columns(NumberHealthRecord)} FROM number_health "
                    f"WHERE phone IN ({', '.join('?' for _ in chunk)})",
                    chunk,
                )
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
            lambda tx: tx.execute("DELETE FROM number_health WHERE phone = ?", (phone,))
        )
        return deleted == 1

    # -- pool health and the conversion watch -----------------------------------

    async def pool_states(self, carrier: str) -> list[PoolHealthRecord]:
        """Every pool's state for `carrier` (pools no call judged have no row)."""
        rows = await self._fetchall(
            f"SELECT {_POOL_HEALTH_COLS} FROM pool_health WHERE carrier = ?", (carrier,), quick=True
        )
        return [_pool_health(row) for row in rows]

    async def pool_health(self) -> list[PoolHealthRecord]:
        """Every pool and carrier calls have judged, by pool then carrier."""
        rows = await self._fetchall(
            f"SELECT {_POOL_HEALTH_COLS} FROM pool_health ORDER BY pool, carrier"
        )
        return [_pool_health(row) for row in rows]

    async def claim_probe(
        self, pool: str, carrier: str, at: float, next_probe_at: float
    ) -> PoolChange | None:
        """Take the probe of a quarantined pool whose probe is due (a probe that never
        ended is due again at its next time): probing until `next_probe_at`. None when
        it is not due, or another call, on any gateway, took it first."""

        async def claim(tx: Tx) -> PoolChange | None:
            await tx.lock(POOL_HEALTH_LOCK + carrier)
            row = await tx.fetchone(
                f"SELECT {_POOL_HEALTH_COLS} FROM pool_health WHERE carrier = ? AND pool = ?",
                (carrier, pool),
            )
            old = _pool_health(row) if row is not None else None
            if (
                old is None
                or old.state is PoolState.ACTIVE
                or old.probe_at is None
                or old.probe_at > at
            ):
                return None
            await tx.execute(
                "UPDATE pool_health SET state = ?, since = ?, probe_at = ?, updated_at = ? "
                "WHERE carrier = ? AND pool = ?",
                (PoolState.PROBING, at, next_probe_at, at, carrier, pool),
            )
            return PoolChange(
                pool, carrier, old.state, PoolState.PROBING, at, old.failures, old.recent
            )

        return await self._write(claim, quick=True)

    async def release_probe(self, pool: str, carrier: str, claimed_at: float) -> bool:
        """Give back a probe claimed at `claimed_at` whose create was refused: the pool
        is quarantined again, its probe due at once. False when the probe moved on."""

        async def release(tx: Tx) -> bool:
            await tx.lock(POOL_HEALTH_LOCK + carrier)
            changed = await tx.execute(
                "UPDATE pool_health SET state = ?, probe_at = ?, updated_at = ? "
                "WHERE carrier = ? AND pool = ? AND state = ? AND since = ?",
                (PoolState.QUARANTINED, claimed_at, claimed_at, carrier, pool,
                 PoolState.PROBING, claimed_at),
            )  # fmt: skip
            return changed == 1

        return await self._write(release, quick=True)

    async def conversion_counts(
        self, since: float, until: float, min_created: int
    ) -> list[tuple[AlertKind, str, int, int]]:
        """(kind, target, created, approved) of every destination block, carrier and
        country with at least `min_created` verifications created in the minutes that
        start in [since, until)."""
        # A minute m starts at m * 60: it starts in [since, until) when it is in these.
        first, last = math.ceil(since / CONVERSION_MINUTE_S), math.ceil(until / CONVERSION_MINUTE_S)
        found: list[tuple[AlertKind, str, int, int]] = []
        for kind, column in _CONVERSION_TARGETS.items():
            # A row at or below zero holds only verifications counted before their
            # target's counts were forgotten (a lifted or expired alert; or created before
            # schema 14), ended after: it counts nothing, their approvals neither.
            # A carrier phonenumbers could not name is no target.
            named = " AND carrier <> ''" if kind is AlertKind.CARRIER else ""
            rows = await self._fetchall(
                f"SELECT {column}, SUM({_COUNTED}), "
                "SUM(CASE WHEN created > 0 THEN approved ELSE 0 END) FROM conversion "
                f"WHERE minute >= ? AND minute < ?{named} "
                f"GROUP BY {column} HAVING SUM({_COUNTED}) >= ?",
                (first, last, min_created),
            )
            found.extend((kind, str(t), int(c), int(a)) for t, c, a in rows)
        return found

    async def forget_conversion(self, before: float) -> int:
        """Drop the conversion counts of minutes that start before `before`."""
        return await self._write(
            lambda tx: tx.execute(
                "DELETE FROM conversion WHERE minute < ?",
                (math.floor(before / CONVERSION_MINUTE_S),),
            )
        )

    async def raise_alert(self, alert: AlertRecord) -> bool:
        """Store `alert` unless its target has one open (another gateway raised it)."""
        return (
            await self._write(
                lambda tx: tx.execute(
                    f"INSERT INTO alerts ({_ALERT_COLS}) VALUES ({_placeholders(AlertRecord)}) "
                    "ON CONFLICT DO NOTHING",
                    values_of(alert),
                )
            )
            == 1
        )

    async def alerts(self, open_only: bool, limit: int) -> list[AlertRecord]:
        """The newest alerts first; with `open_only`, those not cleared."""
        where = "WHERE cleared_at IS NULL " if open_only else ""
        rows = await self._fetchall(
            f"SELECT {_ALERT_COLS} FROM alerts {where}ORDER BY raised_at DESC, id LIMIT ?",
            (limit,),
            quick=True,
        )
        return [_alert(row) for row in rows]

    async def clear_alert(self, alert_id: str, at: float, by: str) -> AlertRecord | None:
        """Clear an open alert (None: no such open alert). Lifted by an admin, or its
        block over (expired), its target's conversion counts are forgotten too: it
        starts afresh, and is flagged again only by verifications created after."""

        async def clear(tx: Tx) -> AlertRecord | None:
            row = await tx.fetchone(
                "UPDATE alerts SET cleared_at = ?, cleared_by = ? "
                f"WHERE id = ? AND cleared_at IS NULL RETURNING {_ALERT_COLS}",
                (at, by, alert_id),
            )
            if row is None:
                return None
            alert = _alert(row)
            if by in ("admin", "expired"):
                await tx.execute(
                    f"DELETE FROM conversion WHERE {_CONVERSION_TARGETS[alert.kind]} = ?",
                    (alert.target,),
                )
            return alert

        return await self._write(clear)

    async def alert(self, alert_id: str) -> AlertRecord | None:
        row = await self._fetchone(f"SELECT {_ALERT_COLS} FROM alerts WHERE id = ?", (alert_id,))
        return _alert(row) if row is not None else None

    async def call_stats(self, since: float, until: float) -> list[tuple[str, str, int]]:
        """(carrier, outcome, calls) for dialed calls that ended in [since, until); not
        those the gateway itself canceled before they alerted (CANCELED)."""
        rows = await self._fetchall(
            "SELECT COALESCE(v.carrier, 'unknown'), c.outcome, COUNT(*) "
            "FROM calls c JOIN verifications v ON v.id = c.verification_id "
            "WHERE c.ended_at >= ? AND c.ended_at < ? AND c.dialed_at IS NOT NULL "
            "AND (c.reason IS NULL OR c.reason <> ?) GROUP BY 1, 2 ORDER BY 1, 2",
            (since, until, CANCELED),
        )
        return [(str(carrier), str(outcome), int(n)) for carrier, outcome, n in rows]

    async def source_stats(self, since: float, until: float) -> list[tuple[str, str | None, int]]:
        """(carrier, check source, approved) for the verifications approved after a call
        that ended in [since, until), as call_stats counts calls: how their codes came."""
        rows = await self._fetchall(
            "SELECT COALESCE(v.carrier, 'unknown'), v.check_source, COUNT(*) "
            "FROM calls c JOIN verifications v ON v.id = c.verification_id AND v.step = c.step "
            "WHERE c.ended_at >= ? AND c.ended_at < ? AND c.dialed_at IS NOT NULL "
            "AND v.status = 'approved' GROUP BY 1, 2 ORDER BY 1, 2",
            (since, until),
        )
        return [(str(carrier), source, int(n)) for carrier, source, n in rows]

    async def channel_stats(self, since: float, until: float) -> list[tuple[str, str, int, int]]:
        """(channel, outcome, calls, approved) for dialed calls that ended in [since,
        until), as call_stats counts them; `approved`: those whose verification was
        approved while the call was its current step (the code it carried was typed)."""
        rows = await self._fetchall(
            "SELECT c.channel, c.outcome, COUNT(*), "
            "SUM(CASE WHEN v.status = 'approved' AND v.step = c.step THEN 1 ELSE 0 END) "
            "FROM calls c JOIN verifications v ON v.id = c.verification_id "
            "WHERE c.ended_at >= ? AND c.ended_at < ? AND c.dialed_at IS NOT NULL "
            "AND (c.reason IS NULL OR c.reason <> ?) GROUP BY 1, 2 ORDER BY 1, 2",
            (since, until, CANCELED),
        )
        return [(str(ch), str(outcome), int(n), int(ok or 0)) for ch, outcome, n, ok in rows]

    async def call_events(self, call_id: str) -> list[CallEventRecord]:
        rows = await self._fetchall(
            f"SELECT {_columns(CallEventRecord)} FROM call_events "
            "WHERE call_id = ? ORDER BY at, rowid",
            (call_id,),
            quick=True,
        )
        return [CallEventRecord(*row) for row in rows]

    async def live_calls(self, owner: str | None = None) -> list[CallRecord]:
        """Calls not yet ended (queued, dialing or ringing), oldest first; with `owner`,
        that gateway's only."""
        mine = " AND owner = ?" if owner is not None else ""
        # The statuses written out, as calls_live_by_owner's condition says them: a
        # planner uses a partial index only for a condition it can see implies its own
        # (bound values, it cannot), else it reads every call ever kept.
        rows = await self._fetchall(
            f"SELECT {_C_COLS} FROM calls WHERE status IN {_LIVE}{mine} ORDER BY queued_at",
            (owner,) if owner is not None else (),
        )
        return [CallRecord(*row) for row in rows]

    # -- dashboard -------------------------------------------------------------

    async def calls_dialed(self, since: float, until: float, step: float) -> list[int]:
        """Calls dialed in each `step` seconds from `since` to `until`, oldest first."""
        buckets = [0] * max(0, math.ceil((until - since) / step))

        async def count(tx: Tx) -> list[Row]:
            # Rounded down: SQLite's CAST truncates (the values are not negative);
            # PostgreSQL's rounds to nearest.
            bucket = (
                "FLOOR((dialed_at - ?) / ?)"
                if tx.dialect == POSTGRESQL
                else "CAST((dialed_at - ?) / ? AS INTEGER)"
            )
            # A call ends after it is dialed, so one dialed since `since` ended since
            # then (found by calls_by_end) or is live (calls_live_by_owner).
            return await tx.fetchall(
                f"SELECT {bucket}, COUNT(*) FROM ("
                "SELECT dialed_at FROM calls WHERE ended_at >= ? "
                "AND dialed_at >= ? AND dialed_at < ? "
                f"UNION ALL SELECT dialed_at FROM calls WHERE status IN {_LIVE} "
                "AND dialed_at >= ? AND dialed_at < ?"
                ") AS dialed GROUP BY 1",
                (since, step, since, since, until, since, until),
            )

        for bucket, n in await self._run(count):
            if 0 <= bucket < len(buckets):
                buckets[int(bucket)] = int(n)
        return buckets

    async def ended_by_cause(self, since: float, until: float) -> list[tuple[str, int | None, int]]:
        """(outcome, hangup cause, calls) for dialed calls that ended in [since, until),
        the most frequent first; not those the gateway canceled before they alerted."""
        rows = await self._fetchall(
            "SELECT outcome, hangup_cause, COUNT(*) FROM calls "
            "WHERE ended_at >= ? AND ended_at < ? AND dialed_at IS NOT NULL "
            "AND (reason IS NULL OR reason <> ?) GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2",
            (since, until, CANCELED),
        )
        return [
            (str(outcome), None if cause is None else int(cause), int(n))
            for outcome, cause, n in rows
        ]
