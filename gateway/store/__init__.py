"""The gateway's state, behind one interface with two backends.

The domain depends on `Store` (below) and the records of gateway.store.records; it never
sees SQL. `open_store` picks the backend from `database.url`: SQLite (the embedded
default, one gateway) or PostgreSQL (shared by many gateways). Every SQL statement is
in gateway.store.sql, written once for both; the schema is in gateway.store.schema.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Protocol

from gateway.caller_health import PoolChange, PoolHealthRecord, RouteReport
from gateway.store.postgres import DEFAULT_POOL_SIZE, PostgresStore
from gateway.store.records import (
    LIVE_CALL_STATUSES,
    STATUS_EVENTS,
    VERIFICATION_STATUSES,
    AlertKind,
    AlertRecord,
    ApiKeyRecord,
    CallEventRecord,
    CallRecord,
    CallStatus,
    Channel,
    CheckLimit,
    CheckSource,
    Idempotency,
    Inserted,
    InstanceRecord,
    KnownInvalid,
    Limited,
    NumberHealthRecord,
    Replayed,
    Snapshot,
    StoreUnavailable,
    VerificationRecord,
    VerificationStatus,
    WebhookRecord,
    WebhookStatus,
    WindowLimit,
)
from gateway.store.sql import CLAIMED, CONVERSION_MINUTE_S, NOT_PENDING, TAKEN
from gateway.store.sqlite import SqliteStore

__all__ = [
    "CLAIMED",
    "CONVERSION_MINUTE_S",
    "LIVE_CALL_STATUSES",
    "NOT_PENDING",
    "STATUS_EVENTS",
    "TAKEN",
    "VERIFICATION_STATUSES",
    "AlertKind",
    "AlertRecord",
    "ApiKeyRecord",
    "CallEventRecord",
    "CallRecord",
    "CallStatus",
    "Channel",
    "CheckLimit",
    "CheckSource",
    "Idempotency",
    "Inserted",
    "InstanceRecord",
    "KnownInvalid",
    "Limited",
    "NumberHealthRecord",
    "Outbox",
    "Replayed",
    "Snapshot",
    "Store",
    "StoreUnavailable",
    "VerificationRecord",
    "VerificationStatus",
    "WebhookRecord",
    "WebhookStatus",
    "WindowLimit",
    "open_store",
    "sqlite_path",
]

SQLITE_SCHEME = "sqlite:///"
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


class Outbox(Protocol):
    """What the webhook sender needs of the store: the outbox rows it claims and
    sends, and what became of each attempt."""

    async def claim_webhooks(self, now: float, limit: int, hold: float) -> list[WebhookRecord]: ...

    async def next_webhook_at(self) -> float | None: ...

    async def fix_webhook_payload(self, webhook_id: str, payload: str) -> str: ...

    async def webhook_attempted(
        self,
        webhook_id: str,
        *,
        at: float,
        status: int | None,
        error: str | None,
        delivered: bool,
        next_attempt_at: float | None,
    ) -> None: ...


class Store(Outbox, Protocol):
    """What the domain asks of its state. Each method is one transaction."""

    # Verifications that reached each status through this store (/metrics).
    status_tally: collections.Counter[VerificationStatus]

    @property
    def cpu_seconds(self) -> float | None:
        """The CPU seconds its own work took in this process, where that can be told
        apart from the rest (SQLite's batches); None where it cannot (PostgreSQL:
        asyncpg's work is spread over the event loop's turns, the server's is elsewhere)."""

    async def close(self) -> None: ...
    async def ping(self) -> None: ...
    async def schema_version(self) -> int: ...

    # API keys
    async def add_api_key(self, key: ApiKeyRecord) -> None: ...
    async def api_key_by_hash(self, key_hash: str) -> ApiKeyRecord | None: ...
    async def api_keys(self) -> list[ApiKeyRecord]: ...
    async def revoke_api_key(self, id_or_name: str, at: float) -> int: ...

    # verifications
    async def create_verification(
        self,
        verification: VerificationRecord,
        call: CallRecord,
        limits: tuple[WindowLimit, ...] = (),
        idempotency: Idempotency | None = None,
        invalid_since: float | None = None,
    ) -> Inserted | Limited | Replayed | KnownInvalid: ...
    async def idempotent_response(
        self, api_key_id: str, key: str, since: float
    ) -> Replayed | None: ...
    async def forget_idempotency_keys(self, before: float) -> int: ...
    async def forget_verifications(
        self, before: float, after: int, limit: int
    ) -> tuple[int, int | None]: ...
    async def verification(
        self, verification_id: str
    ) -> tuple[VerificationRecord, CallRecord] | None: ...
    async def newest_pending(
        self, phone: str, api_key_id: str
    ) -> tuple[VerificationRecord, CallRecord] | None: ...
    async def spend_attempt(
        self,
        verification_id: str,
        approve: bool,
        at: float,
        limits: tuple[CheckLimit, ...] = (),
        source: str | None = None,
    ) -> VerificationRecord | Limited | None: ...
    async def reset_check_failures(self, phone: str) -> int: ...
    async def calls_by_key(self, since: float) -> dict[str, int]: ...
    async def replace_code(
        self, verification_id: str, code_hash: str, code_sealed: str | None, at: float
    ) -> bool: ...
    async def start_step(
        self,
        verification_id: str,
        call: CallRecord,
        at: float,
        limits: tuple[WindowLimit, ...] = (),
        min_gap: float | None = None,
    ) -> VerificationRecord | Limited | None: ...
    async def due_steps(
        self, now: float, limit: int
    ) -> list[tuple[VerificationRecord, CallRecord]]: ...
    async def calls_of(self, verification_id: str) -> list[CallRecord]: ...
    async def set_status(
        self, verification_id: str, status: VerificationStatus, at: float
    ) -> bool: ...
    async def expire_due(self, now: float) -> list[str]: ...
    async def next_expiry(self) -> float | None: ...

    # calls
    async def call_progress(
        self, call_id: str, status: CallStatus, column: str, at: float, event: str
    ) -> None: ...
    async def add_call_event(self, event: CallEventRecord) -> None: ...
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
    ) -> list[PoolChange]: ...
    async def call_events(self, call_id: str) -> list[CallEventRecord]: ...
    async def live_calls(self, owner: str | None = None) -> list[CallRecord]: ...
    async def claim_call(
        self, call_id: str, owner: str, at: float, node: str | None = None
    ) -> str: ...
    async def move_call(self, call_id: str, node: str) -> None: ...

    # instances sharing the database
    async def register_instance(
        self, name: str, incarnation: str, at: float, lease_until: float
    ) -> InstanceRecord | None: ...
    async def renew_lease(self, name: str, incarnation: str, lease_until: float) -> bool: ...
    async def end_lease(self, name: str, incarnation: str, at: float) -> None: ...
    async def instances(self) -> list[InstanceRecord]: ...
    async def live_calls_by_owner(self) -> dict[str | None, int]: ...
    async def release_queued(self, owner: str) -> int: ...
    async def adopt_calls(self, owner: str, at: float, own: bool = False) -> list[CallRecord]: ...

    # webhooks (and the Outbox's)
    async def pending_webhooks(self) -> int: ...
    async def webhooks_of(self, verification_id: str) -> list[WebhookRecord]: ...

    # number health and statistics
    async def number_health(self, phone: str) -> NumberHealthRecord | None: ...
    async def number_health_many(self, phones: list[str]) -> dict[str, NumberHealthRecord]: ...
    async def numbers_by_health(
        self, status: str, after: str, limit: int
    ) -> list[NumberHealthRecord]: ...
    async def reset_number_health(self, phone: str) -> bool: ...
    async def call_stats(self, since: float, until: float) -> list[tuple[str, str, int]]: ...
    async def source_stats(
        self, since: float, until: float
    ) -> list[tuple[str, str | None, int]]: ...
    async def channel_stats(
        self, since: float, until: float
    ) -> list[tuple[str, str, int, int]]: ...
    async def calls_dialed(self, since: float, until: float, step: float) -> list[int]: ...

    # pool health and the conversion watch
    async def pool_states(self, carrier: str) -> list[PoolHealthRecord]: ...
    async def pool_health(self) -> list[PoolHealthRecord]: ...
    async def claim_probe(
        self, pool: str, carrier: str, at: float, next_probe_at: float
    ) -> PoolChange | None: ...
    async def release_probe(self, pool: str, carrier: str, claimed_at: float) -> bool: ...
    async def conversion_counts(
        self, since: float, until: float, min_created: int
    ) -> list[tuple[AlertKind, str, int, int]]: ...
    async def forget_conversion(self, before: float) -> int: ...
    async def raise_alert(self, alert: AlertRecord) -> bool: ...
    async def alerts(self, open_only: bool, limit: int) -> list[AlertRecord]: ...
    async def alert(self, alert_id: str) -> AlertRecord | None: ...
    async def clear_alert(self, alert_id: str, at: float, by: str) -> AlertRecord | None: ...
    async def ended_by_cause(
        self, since: float, until: float
    ) -> list[tuple[str, int | None, int]]: ...


def sqlite_path(url: str) -> str:
    """The file of a `sqlite:///` URL: `sqlite:///var/x.db` is var/x.db (relative),
    `sqlite:////srv/x.db` is /srv/x.db."""
    return url.removeprefix(SQLITE_SCHEME)


async def open_store(database: str | Path, pool_size: int | None = None) -> Store:
    """Open and migrate the database at `database`: a `postgresql://` URL, a
    `sqlite:///` URL, or the path of a SQLite file."""
    location = str(database)
    if location.startswith(POSTGRESQL_SCHEMES):
        return await PostgresStore.open(location, pool_size or DEFAULT_POOL_SIZE)
    return await SqliteStore.open(sqlite_path(location))
