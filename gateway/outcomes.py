"""A call's outcome from what the PBX reported: alerted or not, answered or not, the cause.

The table is docs/api/concepts.md#call-outcomes-and-number-health. Classify by the Hangup cause
and the SIP code, never by the OriginateResponse Reason (0 for every rejection, measured
on Asterisk 22). Real networks do not say what they mean in one place:
- only a 180 says the handset alerted; a 183 is early media, which may be a ringback
  tone with the phone ringing behind it, or an announcement ("the number you called is
  not active") before a reject;
- an answer before any alerting is a machine (voicemail, an announcement server), not
  the user;
- Asterisk maps a trunk's 401, 403 and 407 to cause 21, like a user's 603 decline: only
  the SIP code (Hangup's TechCause, Asterisk 22.7 and newer) tells them apart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"  # the handset was alerted (180), so the user saw the caller ID
    ANSWERED = "answered"  # picked up after alerting and hung up at once; also delivered
    # Only early media (183), then the gateway's ring timer: maybe a ringback tone with the
    # phone ringing behind it, maybe not. The verification stays pending.
    PROGRESS_ONLY = "progress_only"
    # Nothing alerted before the gateway's cap (post-dial delay plus ring time).
    NO_ALERTING = "no_alerting"
    # Answered with no alerting before it: voicemail or an announcement, not the user.
    NETWORK_ANSWER = "network_answer"
    # The trunk refused the call (401, 403, 407): account, caller ID not allowed, CPS.
    TRUNK_REJECTED = "trunk_rejected"
    BUSY = "busy"
    REJECTED = "rejected"
    INVALID_NUMBER = "invalid_number"
    UNREACHABLE = "unreachable"
    CONGESTION = "congestion"
    ERROR = "error"
    # A voice call's own: answered and the code said at least once in full; answered
    # and hung up before that; rang out with nobody answering.
    SPOKEN = "spoken"
    ANSWERED_EARLY = "answered_early"
    NO_ANSWER = "no_answer"


class Health(enum.StrEnum):
    """What an outcome says about the destination number."""

    UNKNOWN = "unknown"
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"
    INVALID = "invalid"


# A Q.850 cause value is 7 bits (ITU-T Q.850, 2.2.5): anything above is no cause.
MAX_Q850_CAUSE = 127
# Q.850 causes (Asterisk's AST_CAUSE_*).
_INVALID_NUMBER = frozenset({1, 3, 22, 28})  # unallocated, no route, number changed, bad format
_UNREACHABLE = frozenset({18, 19, 20, 27})  # no user responding, no answer, absent, out of order
_CONGESTION = frozenset({34, 38, 41, 42, 44, 47})  # no circuit, network out of order, ...
_BUSY = 17
_REJECTED = 21
# The trunk's own refusals (res_pjsip.c maps all three to cause 21).
TRUNK_REFUSALS = frozenset({401, 403, 407})

# The names of the causes the table above uses, for people (dashboard, docs).
CAUSE_NAMES = {
    1: "Unallocated number",
    3: "No route to destination",
    16: "Normal clearing",
    17: "User busy",
    18: "No user responding",
    19: "No answer",
    20: "Subscriber absent",
    21: "Call rejected",
    22: "Number changed",
    27: "Destination out of order",
    28: "Invalid number format",
    34: "No circuit available",
    38: "Network out of order",
    41: "Temporary failure",
    42: "Switching equipment congestion",
    44: "Requested channel not available",
    47: "Resource unavailable",
}

DELIVERED_OUTCOMES = frozenset({Outcome.DELIVERED, Outcome.ANSWERED, Outcome.SPOKEN})
# Ended without a verdict on delivery: the verification stays pending, the stats count
# these apart from delivered and failed.
UNCERTAIN_OUTCOMES = frozenset({Outcome.PROGRESS_ONLY})
# The reason of a call (outcome `error`) that the gateway ended before the phone alerted,
# or never placed, because its verification was canceled or superseded. The calls metric
# counts it under this label of its own: it is no failure of the call or the number.
CANCELED = "canceled"
# The reasons of a call the gateway's own timer ended: `ring_timeout` once it had alerted
# (or shown progress) for the ring time, `post_dial_timeout` when nothing alerted before
# the cap. A far end's own 480 has no reason, only its cause and SIP code.
RING_TIMEOUT = "ring_timeout"
POST_DIAL_TIMEOUT = "post_dial_timeout"
# The reason of an answered voice call the gateway hung up at voice.max_seconds.
MAX_SECONDS = "max_seconds"

_HEALTH = {
    Outcome.DELIVERED: Health.REACHABLE,
    Outcome.ANSWERED: Health.REACHABLE,
    Outcome.BUSY: Health.REACHABLE,
    Outcome.INVALID_NUMBER: Health.INVALID,
    Outcome.UNREACHABLE: Health.UNREACHABLE,
    # A number that answered is reachable.
    Outcome.SPOKEN: Health.REACHABLE,
    Outcome.ANSWERED_EARLY: Health.REACHABLE,
}


@dataclass(frozen=True, slots=True)
class Heard:
    """What the gateway heard of a call that has ended, and whether its timer ended it."""

    rang: bool = False  # a 180: the handset alerted
    progress: bool = False  # a 183: early media
    answered: bool = False
    cause: int | None = None  # Q.850, from the Hangup
    sip_code: int | None = None  # the final SIP response, where Asterisk reports it
    # Ended by the gateway's ring timer (ring_seconds after alerting) or its cap.
    timed_out: bool = False
    spoken: bool = False  # a voice call: the dialplan said the code in full (OtpSpoken)


def classify(heard: Heard, early_media_is_alerting: bool = False) -> Outcome:
    """The outcome of a call that has ended.

    `early_media_is_alerting`: the operator's carrier uses 183 for real ringing, so a
    183 counts as a 180 (numbers.early_media_is_alerting)."""
    alerted = heard.rang or (heard.progress and early_media_is_alerting)
    if heard.answered:
        return Outcome.ANSWERED if alerted else Outcome.NETWORK_ANSWER
    refused = _refused(heard.cause, heard.sip_code)
    if refused is not None:
        return refused
    if alerted:
        # Rang, then the ring timer or the callee ended it: the caller ID was shown.
        return Outcome.DELIVERED
    if heard.timed_out:
        return Outcome.PROGRESS_ONLY if heard.progress else Outcome.NO_ALERTING
    # Not alerted: a 183 followed by a network's final response is that response.
    return _final_response(heard.cause)


def classify_voice(heard: Heard) -> Outcome:
    """The outcome of a voice call that has ended: whether the code was said, else why
    not. Its alerting is only a step on the way: an answer is what it waits for."""
    if heard.answered:
        return Outcome.SPOKEN if heard.spoken else Outcome.ANSWERED_EARLY
    refused = _refused(heard.cause, heard.sip_code)
    if refused is not None:
        return refused
    if heard.timed_out:
        return Outcome.NO_ANSWER
    outcome = _final_response(heard.cause)
    if outcome is Outcome.UNREACHABLE and (heard.rang or heard.progress):
        return Outcome.NO_ANSWER  # rang, then the network gave up (480): nobody picked up
    return outcome


def _refused(cause: int | None, sip_code: int | None) -> Outcome | None:
    """What says nothing of alerting: the trunk's refusal, a number that does not
    exist, a network without room. None for anything else."""
    if sip_code in TRUNK_REFUSALS:
        return Outcome.TRUNK_REJECTED
    if cause in _INVALID_NUMBER:
        return Outcome.INVALID_NUMBER
    if cause in _CONGESTION:
        return Outcome.CONGESTION
    return None


def _final_response(cause: int | None) -> Outcome:
    """The outcome a network's final response gives a call that did not get through."""
    if cause == _BUSY:
        return Outcome.BUSY
    if cause == _REJECTED:
        return Outcome.REJECTED
    if cause in _UNREACHABLE:
        return Outcome.UNREACHABLE
    return Outcome.ERROR


# What a call adopted after a restart cannot be said to be: it may have rung before.
_ALERT_UNKNOWABLE = frozenset({Outcome.UNREACHABLE, Outcome.NO_ALERTING, Outcome.PROGRESS_ONLY})


def followed(
    heard: Heard,
    *,
    reason: str | None = None,
    early_media_is_alerting: bool = False,
    alert_unknown: bool = False,
    canceled: bool = False,
    voice: bool = False,
) -> tuple[Outcome, str | None]:
    """The outcome of a call the gateway followed to its end, and the reason to record.

    `classify`, with the reason of a call the gateway's timer ended, and two cases the
    PBX alone cannot show:
    - `alert_unknown`: adopted after a restart, its first events went with the old
      process. "No answer" ends a missed call that rang as well as one that never did:
      error/pbx_lost rather than marking the number unreachable.
    - `voice`: a voice call, classified by `classify_voice`.
    - `canceled`: the gateway hung it up itself (a cancel, a newer verification). Before
      it alerted that is error/canceled, not a verdict on the number, whatever cause
      Asterisk gave (21 when the hangup beat the INVITE). An answer of the network that
      came first (busy, unreachable, invalid, congestion) stands.
    """
    outcome = classify_voice(heard) if voice else classify(heard, early_media_is_alerting)
    if outcome in _ALERT_UNKNOWABLE and alert_unknown and not heard.rang:
        return Outcome.ERROR, "pbx_lost"
    if canceled and outcome in (Outcome.REJECTED, Outcome.ERROR, Outcome.NO_ANSWER):
        return Outcome.ERROR, CANCELED
    if heard.timed_out:
        if heard.answered:
            reason = MAX_SECONDS
        else:
            reason = RING_TIMEOUT if heard.rang or heard.progress else POST_DIAL_TIMEOUT
    return outcome, reason


def health_of(outcome: Outcome) -> Health | None:
    """The number health an outcome implies, or None when it says nothing."""
    return _HEALTH.get(outcome)


def about_number(outcome: str, reason: str | None) -> bool:
    """Whether a dialed call counts in its number's record (calls, last outcome).

    Not a call the gateway canceled before it alerted, nor one the trunk refused: those
    say nothing of the number."""
    return reason != CANCELED and outcome != Outcome.TRUNK_REJECTED
