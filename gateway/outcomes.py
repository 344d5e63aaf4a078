"""A call's outcome from what the PBX reported: alerted or not, answered or not, the cause.

The table is DESIGN.md section 4. Classify by the Hangup cause, never by the
OriginateResponse Reason (0 for every rejection, measured on Asterisk 22).
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"  # the handset was alerted, so the user saw the caller ID
    ANSWERED = "answered"  # picked up and hung up at once; also delivered
    BUSY = "busy"
    REJECTED = "rejected"
    INVALID_NUMBER = "invalid_number"
    UNREACHABLE = "unreachable"
    CONGESTION = "congestion"
    ERROR = "error"


class Health(enum.StrEnum):
    """What an outcome says about the destination number."""

    UNKNOWN = "unknown"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"
    INVALID = "invalid"


# Q.850 causes (Asterisk's AST_CAUSE_*).
_INVALID_NUMBER = frozenset({1, 3, 22, 28})  # unallocated, no route, number changed, bad format
_UNREACHABLE = frozenset({18, 19, 20, 27})  # no user responding, no answer, absent, out of order
_CONGESTION = frozenset({34, 38, 41, 42, 44, 47})  # no circuit, network out of order, ...
_BUSY = 17
_REJECTED = 21

DELIVERED_OUTCOMES = frozenset({Outcome.DELIVERED, Outcome.ANSWERED})
# The reason of a call (outcome `error`) that the gateway ended before the phone alerted,
# or never placed, because its verification was canceled or superseded. The calls metric
# counts it under this label of its own: it is no failure of the call or the number.
CANCELED = "canceled"

_HEALTH = {
    Outcome.DELIVERED: Health.REACHABLE,
    Outcome.ANSWERED: Health.REACHABLE,
    Outcome.BUSY: Health.REACHABLE,
    Outcome.INVALID_NUMBER: Health.INVALID,
    Outcome.UNREACHABLE: Health.UNREACHABLE,
}


def classify(*, alerted: bool, answered: bool, cause: int | None) -> Outcome:
    """The outcome of a call that has ended."""
    if answered:
        return Outcome.ANSWERED
    if cause in _INVALID_NUMBER:
        return Outcome.INVALID_NUMBER
    if cause in _CONGESTION:
        return Outcome.CONGESTION
    if alerted:
        # Rang (180) or alerted with progress (183), then the ring timeout or the
        # callee ended it: the caller ID was shown.
        return Outcome.DELIVERED
    if cause == _BUSY:
        return Outcome.BUSY
    if cause == _REJECTED:
        return Outcome.REJECTED
    if cause in _UNREACHABLE:
        return Outcome.UNREACHABLE
    return Outcome.ERROR


def followed(
    *,
    alerted: bool,
    answered: bool,
    cause: int | None,
    reason: str | None = None,
    alert_unknown: bool = False,
    canceled: bool = False,
) -> tuple[Outcome, str | None]:
    """The outcome of a call the gateway followed to its end, and the reason to record.

    `classify`, and two cases it cannot see from the PBX alone:
    - `alert_unknown`: adopted after a restart, its first events went with the old
      process. "No answer" ends a missed call that rang as well as one that never did:
      error/pbx_lost rather than marking the number unreachable.
    - `canceled`: the gateway hung it up itself (a cancel, a newer verification). Before
      it alerted that is error/canceled, not a verdict on the number, whatever cause
      Asterisk gave (21 when the hangup beat the INVITE). An answer of the network that
      came first (busy, unreachable, invalid, congestion) stands.
    """
    outcome = classify(alerted=alerted, answered=answered, cause=cause)
    if outcome is Outcome.UNREACHABLE and alert_unknown and not alerted:
        return Outcome.ERROR, "pbx_lost"
    if canceled and outcome in (Outcome.REJECTED, Outcome.ERROR):
        return Outcome.ERROR, CANCELED
    return outcome, reason


def health_of(outcome: Outcome) -> Health | None:
    """The number health an outcome implies, or None when it says nothing."""
    return _HEALTH.get(outcome)
