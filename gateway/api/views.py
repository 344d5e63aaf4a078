"""JSON shapes of what the API returns. Never the code, never the full caller ID."""

from __future__ import annotations

from typing import Any

from gateway.nodes import Node
from gateway.store import (
    CallEventRecord,
    CallRecord,
    NumberHealthRecord,
    VerificationRecord,
    WebhookRecord,
    WebhookStatus,
)
from gateway.times import timestamp


def verification(
    v: VerificationRecord,
    call: CallRecord,
    events: list[CallEventRecord] | None = None,
    webhooks: list[WebhookRecord] | None = None,
) -> dict[str, Any]:
    """The verification object (docs/api/concepts.md#the-verification-object), with
    the call's event timeline and the delivery state of its webhooks."""
    return {
        "id": v.id,
        "status": v.status,
        "phone": v.phone,
        "reference": v.reference,
        "callback_url": v.callback_url,
        "sandbox": bool(v.sandbox),
        "cli": {"prefix": v.cli_prefix, "length": v.cli_length, "pattern": v.cli_pattern},
        "call": {
            "status": call.status,
            "outcome": call.outcome,
            "hangup_cause": call.hangup_cause,
            "sip_code": call.sip_code,
            "reason": call.reason,
            "ring_seconds": int(call.ring_seconds),
            "node": call.node,
            "dialed_at": timestamp(call.dialed_at),
            "ringing_at": timestamp(call.ringing_at),
            "ended_at": timestamp(call.ended_at),
            "events": [
                {"at": timestamp(e.at), "kind": e.kind, "cause": e.cause, "sip_code": e.sip_code}
                for e in events or []
            ],
        },
        "webhooks": [webhook(w) for w in webhooks or []],
        "attempts_remaining": v.attempts_remaining,
        "expires_at": timestamp(v.expires_at),
        "created_at": timestamp(v.created_at),
        "updated_at": timestamp(v.updated_at),
    }


def node(node: Node, live: int, ringing: int) -> dict[str, Any]:
    """An Asterisk node as /readyz and the dashboard show it."""
    return {
        "name": node.name,
        "connected": node.pbx.connected,
        "down_seconds": round(node.pbx.down_for, 1),
        "calls_live": live,
        "calls_ringing": ringing,
        "max_concurrent": node.max_concurrent,
        "max_per_second": node.max_per_second,
        "calls_placed": node.placed,
    }


def check_result(v: VerificationRecord, valid: bool) -> dict[str, Any]:
    return {
        "id": v.id,
        "status": v.status,
        "valid": valid,
        "attempts_remaining": v.attempts_remaining,
    }


def health(e164: str | None, record: NumberHealthRecord | None) -> dict[str, Any]:
    """What calls taught about a number."""
    if record is None:
        return {
            "status": "unknown" if e164 else None,
            "calls": 0,
            "delivered": 0,
            "last_outcome": None,
            "last_cause": None,
            "last_sip_code": None,
            "last_call_at": None,
            "last_delivered_at": None,
        }
    return {
        "status": record.status,
        "calls": record.calls,
        "delivered": record.delivered,
        "last_outcome": record.last_outcome,
        "last_cause": record.last_cause,
        "last_sip_code": record.last_sip_code,
        "last_call_at": timestamp(record.last_call_at),
        "last_delivered_at": timestamp(record.last_delivered_at),
    }


def number(description: dict[str, Any], record: NumberHealthRecord | None) -> dict[str, Any]:
    """A number's validation detail with its health."""
    return {**description, "health": health(description.get("e164"), record)}


def listed_number(record: NumberHealthRecord) -> dict[str, Any]:
    return {"phone": record.phone, "health": health(record.phone, record)}


def webhook(w: WebhookRecord) -> dict[str, Any]:
    """Where a webhook's delivery stands."""
    status = (
        WebhookStatus.DELIVERED
        if w.delivered_at
        else WebhookStatus.FAILED
        if w.given_up_at
        else WebhookStatus.PENDING
    )
    return {
        "id": w.id,
        "type": w.type,
        "status": status,
        "attempts": w.attempts,
        "last_status": w.last_status,
        "last_error": w.last_error,
        "delivered_at": timestamp(w.delivered_at),
        "next_attempt_at": None
        if status is not WebhookStatus.PENDING
        else timestamp(w.next_attempt_at),
    }
