"""The API's response bodies (gateway.api.shapes) made from the domain's records.
Never the code, never the full caller ID."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from gateway.api import shapes
from gateway.caller_health import PoolHealthRecord, PoolState
from gateway.config import PoolConfig
from gateway.nodes import Node
from gateway.outcomes import Health, Outcome
from gateway.pbx import trunk_name
from gateway.store import (
    AlertRecord,
    CallEventRecord,
    CallRecord,
    NumberHealthRecord,
    VerificationRecord,
    VerificationStatus,
    WebhookRecord,
    WebhookStatus,
)
from gateway.times import timestamp

_ENCODER = msgspec.json.Encoder()


def encode(body: shapes.Response) -> bytes:
    """A response body as JSON."""
    return _ENCODER.encode(body)


def verification(
    v: VerificationRecord,
    call: CallRecord,
    events: list[CallEventRecord] | None = None,
    webhooks: list[WebhookRecord] | None = None,
    steps: list[CallRecord] | None = None,
    step_events: dict[str, list[CallEventRecord]] | None = None,
) -> shapes.Verification:
    """The verification object (docs/api/concepts.md#the-verification-object): its
    current call with its event timeline, every step tried (`steps`, the first first;
    None: the current call alone), and the delivery state of its webhooks."""
    current = _call(call, events or [])
    step_events = step_events or {}
    return shapes.Verification(
        id=v.id,
        status=v.status,
        phone=v.phone,
        reference=v.reference,
        callback_url=v.callback_url,
        sandbox=bool(v.sandbox),
        cli=shapes.CliShape(
            prefix=v.cli_prefix,
            length=v.cli_length,
            pattern=v.cli_pattern,
            interception_timeout_seconds=(
                None if v.watch_seconds is None else math.ceil(v.watch_seconds)
            ),
        ),
        channels=list(v.channel_list),
        locale=v.locale,
        fallback_after_seconds=None if v.fallback_after is None else int(v.fallback_after),
        call=current,
        steps=[
            shapes.Step(
                channel=step.channel,
                call=current if step.id == call.id else _call(step, step_events.get(step.id, [])),
            )
            for step in (steps or [call])
        ],
        next_channel=v.next_channel if v.status is VerificationStatus.PENDING else None,
        next_at=timestamp(v.next_at) if v.status is VerificationStatus.PENDING else None,
        webhooks=[webhook(w) for w in webhooks or []],
        attempts_remaining=v.attempts_remaining,
        expires_at=timestamp(v.expires_at),
        created_at=timestamp(v.created_at),
        updated_at=timestamp(v.updated_at),
    )


def _call(call: CallRecord, events: list[CallEventRecord]) -> shapes.Call:
    return shapes.Call(
        channel=call.channel,
        status=call.status,
        outcome=Outcome(call.outcome) if call.outcome is not None else None,
        hangup_cause=call.hangup_cause,
        sip_code=call.sip_code,
        reason=call.reason,
        ring_seconds=int(call.ring_seconds),
        node=call.node,
        dialed_at=timestamp(call.dialed_at),
        ringing_at=timestamp(call.ringing_at),
        ended_at=timestamp(call.ended_at),
        events=[
            shapes.CallEvent(at=timestamp(e.at), kind=e.kind, cause=e.cause, sip_code=e.sip_code)
            for e in events
        ],
    )


def node(node: Node, live: int, ringing: int) -> shapes.Node:
    """An Asterisk node as /readyz and the dashboard show it."""
    return shapes.Node(
        name=node.name,
        connected=node.pbx.connected,
        down_seconds=round(node.pbx.down_for, 1),
        calls_live=live,
        calls_ringing=ringing,
        max_concurrent=node.max_concurrent,
        max_per_second=node.max_per_second,
        calls_placed=node.placed,
    )


def check_result(v: VerificationRecord, valid: bool) -> shapes.CheckResult:
    return shapes.CheckResult(
        id=v.id, status=v.status, valid=valid, attempts_remaining=v.attempts_remaining
    )


_UNKNOWN = shapes.NumberHealth(
    status=None,
    calls=0,
    delivered=0,
    last_outcome=None,
    last_cause=None,
    last_sip_code=None,
    last_call_at=None,
    last_delivered_at=None,
)


def health(e164: str | None, record: NumberHealthRecord | None) -> shapes.NumberHealth:
    """What calls taught about a number."""
    if record is None:
        return msgspec.structs.replace(_UNKNOWN, status=Health.UNKNOWN) if e164 else _UNKNOWN
    return shapes.NumberHealth(
        status=Health(record.status),
        calls=record.calls,
        delivered=record.delivered,
        last_outcome=record.last_outcome,
        last_cause=record.last_cause,
        last_sip_code=record.last_sip_code,
        last_call_at=timestamp(record.last_call_at),
        last_delivered_at=timestamp(record.last_delivered_at),
    )


def number(description: dict[str, Any], record: NumberHealthRecord | None) -> shapes.Number:
    """A number's validation detail (gateway.phones.describe) with its health."""
    return shapes.Number(**description, health=health(description.get("e164"), record))


def listed_number(record: NumberHealthRecord) -> shapes.ListedNumber:
    return shapes.ListedNumber(phone=record.phone, health=health(record.phone, record))


def webhook(w: WebhookRecord) -> shapes.Webhook:
    """Where a webhook's delivery stands."""
    status = (
        WebhookStatus.DELIVERED
        if w.delivered_at
        else WebhookStatus.FAILED
        if w.given_up_at
        else WebhookStatus.PENDING
    )
    return shapes.Webhook(
        id=w.id,
        type=w.type,
        status=status,
        attempts=w.attempts,
        last_status=w.last_status,
        last_error=w.last_error,
        delivered_at=timestamp(w.delivered_at),
        next_attempt_at=(timestamp(w.next_attempt_at) if status is WebhookStatus.PENDING else None),
    )


def pools(
    configs: Sequence[PoolConfig], default_channel: str, rows: Sequence[PoolHealthRecord]
) -> list[shapes.PoolHealth]:
    """Every configured pool, in config order, with its rows of `rows` (the store's
    pool_health; those of pools no longer configured are left out)."""
    by_pool: dict[str, list[PoolHealthRecord]] = {}
    for row in rows:
        by_pool.setdefault(row.pool, []).append(row)
    return [pool(c, default_channel, by_pool.get(c.name, [])) for c in configs]


def pool(
    config: PoolConfig, default_channel: str, rows: list[PoolHealthRecord]
) -> shapes.PoolHealth:
    """A pool and its health for each carrier its calls reached."""
    return shapes.PoolHealth(
        name=config.name,
        regions=list(config.regions),
        weight=config.weight,
        trunk=trunk_name(config.channel or default_channel),
        carriers=[
            shapes.PoolCarrier(
                carrier=row.carrier or None,
                state=row.state.value,
                since=timestamp(row.since),
                calls=row.calls,
                delivered=row.delivered,
                rate=round(row.delivered / row.calls, 4) if row.calls else None,
                failures_in_a_row=row.failures,
                held=row.held,
                next_probe_at=(
                    timestamp(row.probe_at)
                    if row.probe_at is not None and row.state is not PoolState.ACTIVE
                    else None
                ),
            )
            for row in rows
        ],
    )


def alert(record: AlertRecord) -> shapes.Alert:
    return shapes.Alert(
        id=record.id,
        kind=record.kind.value,
        target=record.target,
        created=record.created,
        approved=record.approved,
        rate=round(record.rate, 4),
        mode=record.mode,  # type: ignore[arg-type]
        raised_at=timestamp(record.raised_at),
        blocked_until=timestamp(record.blocked_until) if record.blocked_until else None,
        cleared_at=timestamp(record.cleared_at) if record.cleared_at else None,
        cleared_by=record.cleared_by,  # type: ignore[arg-type]
    )
