"""Call outcomes (docs/api/concepts.md#call-outcomes-and-number-health): what the PBX
saw, to an outcome and a number health."""

from __future__ import annotations

import pytest

from gateway.outcomes import (
    CANCELED,
    DELIVERED_OUTCOMES,
    POST_DIAL_TIMEOUT,
    RING_TIMEOUT,
    Health,
    Heard,
    Outcome,
    about_number,
    classify,
    followed,
    health_of,
)

NORMAL_CLEARING = 16
NO_ANSWER = 19  # what Asterisk reports when its own ring timeout ends a ringing call
INVALID_CAUSES = (1, 3, 22, 28)
UNREACHABLE_CAUSES = (18, 19, 20, 27)
CONGESTION_CAUSES = (34, 38, 41, 42, 44, 47)

# (rang, answered, cause) -> outcome, one row per line of the table. "rang": a 180.
TABLE: list[tuple[bool, bool, int | None, Outcome]] = [
    # Rang (180), then ended by the ring timer or by the callee.
    (True, False, NO_ANSWER, Outcome.DELIVERED),
    (True, False, NORMAL_CLEARING, Outcome.DELIVERED),
    (True, False, 17, Outcome.DELIVERED),  # callee pressed "busy" after it rang
    (True, False, 21, Outcome.DELIVERED),  # callee declined after it rang
    (True, False, 18, Outcome.DELIVERED),
    (True, False, None, Outcome.DELIVERED),
    # Answered after it rang: the gateway hangs up at once.
    (True, True, NORMAL_CLEARING, Outcome.ANSWERED),
    (True, True, None, Outcome.ANSWERED),
    # Answered with no alerting before it: voicemail or an announcement server.
    (False, True, NORMAL_CLEARING, Outcome.NETWORK_ANSWER),
    # Before ringing.
    (False, False, 17, Outcome.BUSY),
    (False, False, 21, Outcome.REJECTED),
    *[(False, False, cause, Outcome.UNREACHABLE) for cause in UNREACHABLE_CAUSES],
    # Invalid number and congestion whether or not it rang.
    *[(False, False, cause, Outcome.INVALID_NUMBER) for cause in INVALID_CAUSES],
    *[(True, False, cause, Outcome.INVALID_NUMBER) for cause in INVALID_CAUSES],
    *[(False, False, cause, Outcome.CONGESTION) for cause in CONGESTION_CAUSES],
    *[(True, False, cause, Outcome.CONGESTION) for cause in CONGESTION_CAUSES],
    # Originate refused, PBX lost, anything else.
    (False, False, None, Outcome.ERROR),
    (False, False, 0, Outcome.ERROR),
    (False, False, NORMAL_CLEARING, Outcome.ERROR),
    (False, False, 102, Outcome.ERROR),  # recovery on timer expiry
    (False, False, 127, Outcome.ERROR),
]


@pytest.mark.parametrize(("rang", "answered", "cause", "expected"), TABLE)
def test_classify_follows_the_outcome_table(
    rang: bool, answered: bool, cause: int | None, expected: Outcome
) -> None:
    assert classify(Heard(rang=rang, answered=answered, cause=cause)) is expected


# A 183 (early media) and what followed it -> outcome (the same table).
EARLY_MEDIA: list[tuple[Heard, Outcome]] = [
    # The gateway's ring timer ended a call that only ever sent 183: not certain.
    (Heard(progress=True, cause=NORMAL_CLEARING, timed_out=True), Outcome.PROGRESS_ONLY),
    (Heard(progress=True, cause=None, timed_out=True), Outcome.PROGRESS_ONLY),
    # An announcement, then the network's final response: that response, never delivered.
    (Heard(progress=True, cause=NO_ANSWER, sip_code=480), Outcome.UNREACHABLE),
    (Heard(progress=True, cause=20), Outcome.UNREACHABLE),
    (Heard(progress=True, cause=27), Outcome.UNREACHABLE),
    (Heard(progress=True, cause=1, sip_code=404), Outcome.INVALID_NUMBER),
    (Heard(progress=True, cause=17, sip_code=486), Outcome.BUSY),
    (Heard(progress=True, cause=34, sip_code=503), Outcome.CONGESTION),
    # 183 then a 180: the phone rang.
    (Heard(progress=True, rang=True, cause=NORMAL_CLEARING, timed_out=True), Outcome.DELIVERED),
    # 183 then an answer, no 180: an announcement server or voicemail.
    (Heard(progress=True, answered=True, cause=NORMAL_CLEARING), Outcome.NETWORK_ANSWER),
    # Nothing alerted before the gateway's cap.
    (Heard(cause=NORMAL_CLEARING, timed_out=True), Outcome.NO_ALERTING),
    (Heard(cause=None, timed_out=True), Outcome.NO_ALERTING),
    # The network's verdict stands even when the gateway's hangup crossed it.
    (Heard(cause=1, timed_out=True), Outcome.INVALID_NUMBER),
    # The trunk's refusals, told from a user's decline by the SIP code.
    *[(Heard(cause=21, sip_code=code), Outcome.TRUNK_REJECTED) for code in (401, 403, 407)],
    (Heard(cause=21, sip_code=603), Outcome.REJECTED),
    (Heard(cause=21), Outcome.REJECTED),  # Asterisk before 22.7: no SIP code
]


@pytest.mark.parametrize(("heard", "expected"), EARLY_MEDIA)
def test_classify_a_network_that_does_not_say_what_it_means(
    heard: Heard, expected: Outcome
) -> None:
    assert classify(heard) is expected


@pytest.mark.parametrize(
    ("heard", "expected"),
    [
        (Heard(progress=True, cause=NORMAL_CLEARING, timed_out=True), Outcome.DELIVERED),
        (Heard(progress=True, answered=True, cause=NORMAL_CLEARING), Outcome.ANSWERED),
        # With the switch a 183 is a 180: a reject after it ends an unanswered ring.
        (Heard(progress=True, cause=NO_ANSWER, sip_code=480), Outcome.DELIVERED),
        (Heard(cause=NORMAL_CLEARING, timed_out=True), Outcome.NO_ALERTING),
    ],
)
def test_early_media_is_alerting_counts_a_183_as_a_180(heard: Heard, expected: Outcome) -> None:
    assert classify(heard, early_media_is_alerting=True) is expected


@pytest.mark.parametrize(
    ("heard", "reason"),
    [
        (Heard(rang=True, cause=NORMAL_CLEARING, timed_out=True), RING_TIMEOUT),
        (Heard(progress=True, cause=NORMAL_CLEARING, timed_out=True), RING_TIMEOUT),
        (Heard(cause=NORMAL_CLEARING, timed_out=True), POST_DIAL_TIMEOUT),
        # The far end's own 480 after ringing: no reason, its cause and SIP code tell.
        (Heard(rang=True, cause=NO_ANSWER, sip_code=480), None),
    ],
)
def test_a_call_the_gateway_timer_ended_says_so(heard: Heard, reason: str | None) -> None:
    assert followed(heard)[1] == reason


@pytest.mark.parametrize(
    ("outcome", "health"),
    [
        (Outcome.DELIVERED, Health.REACHABLE),
        (Outcome.ANSWERED, Health.REACHABLE),
        (Outcome.BUSY, Health.REACHABLE),
        (Outcome.REJECTED, None),
        (Outcome.INVALID_NUMBER, Health.INVALID),
        (Outcome.UNREACHABLE, Health.UNREACHABLE),
        (Outcome.CONGESTION, None),
        (Outcome.ERROR, None),
        # Says nothing of the number: untouched.
        (Outcome.PROGRESS_ONLY, None),
        (Outcome.NO_ALERTING, None),
        (Outcome.NETWORK_ANSWER, None),
        (Outcome.TRUNK_REJECTED, None),
        # A voice call: a number that answered is reachable; one that rang out, unsaid.
        (Outcome.SPOKEN, Health.REACHABLE),
        (Outcome.ANSWERED_EARLY, Health.REACHABLE),
        (Outcome.NO_ANSWER, None),
    ],
)
def test_health_of_each_outcome(outcome: Outcome, health: Health | None) -> None:
    assert health_of(outcome) == health


def test_outcome_values_are_exactly_the_contract_set() -> None:
    """A new outcome must be added to the design table and the health table above."""
    assert {o.value for o in Outcome} == {
        "delivered",
        "answered",
        "busy",
        "rejected",
        "invalid_number",
        "unreachable",
        "congestion",
        "error",
        "progress_only",
        "no_alerting",
        "network_answer",
        "trunk_rejected",
        "spoken",
        "answered_early",
        "no_answer",
    }


def test_only_delivered_answered_and_spoken_count_as_delivered() -> None:
    assert frozenset({Outcome.DELIVERED, Outcome.ANSWERED, Outcome.SPOKEN}) == DELIVERED_OUTCOMES


# What a voice call heard -> its outcome and reason.
VOICE = [
    # answered, the code said in full: whoever hung up
    (Heard(rang=True, answered=True, spoken=True, cause=16), Outcome.SPOKEN, None),
    # hung up by the gateway at voice.max_seconds after saying it
    (
        Heard(rang=True, answered=True, spoken=True, cause=16, timed_out=True),
        Outcome.SPOKEN,
        "max_seconds",
    ),
    # answered, hung up before the first saying ended
    (Heard(rang=True, answered=True, cause=16), Outcome.ANSWERED_EARLY, None),
    # answered by a machine without ringing: still answered; said or not decides
    (Heard(answered=True, spoken=True, cause=16), Outcome.SPOKEN, None),
    # rang out: the gateway's ring timer, or the network's 480 after ringing
    (Heard(rang=True, cause=16, timed_out=True), Outcome.NO_ANSWER, "ring_timeout"),
    (Heard(rang=True, cause=19, sip_code=480), Outcome.NO_ANSWER, None),
    (Heard(cause=16, timed_out=True), Outcome.NO_ANSWER, "post_dial_timeout"),
    # never alerted, refused by the network
    (Heard(cause=19, sip_code=480), Outcome.UNREACHABLE, None),
    (Heard(cause=17, sip_code=486), Outcome.BUSY, None),
    (Heard(cause=21, sip_code=603), Outcome.REJECTED, None),
    (Heard(cause=1, sip_code=404), Outcome.INVALID_NUMBER, None),
    (Heard(cause=34, sip_code=503), Outcome.CONGESTION, None),
    (Heard(cause=21, sip_code=403), Outcome.TRUNK_REJECTED, None),
    (Heard(cause=None), Outcome.ERROR, None),
]


@pytest.mark.parametrize(("heard", "outcome", "reason"), VOICE)
def test_a_voice_call_is_classified_by_its_answer_and_its_saying(
    heard: Heard, outcome: Outcome, reason: str | None
) -> None:
    assert followed(heard, voice=True) == (outcome, reason)


def test_a_voice_call_the_gateway_canceled_while_ringing_is_canceled() -> None:
    heard = Heard(rang=True, cause=16)
    assert followed(heard, voice=True, canceled=True) == (Outcome.ERROR, "canceled")


def test_outcomes_and_health_serialise_as_their_contract_strings() -> None:
    assert str(Outcome.INVALID_NUMBER) == "invalid_number"
    assert f"{Health.UNREACHABLE}" == "unreachable"
    assert Outcome("delivered") is Outcome.DELIVERED


@pytest.mark.parametrize(("rang", "answered", "cause", "expected"), TABLE)
def test_followed_is_classify_for_a_call_heard_from_start_to_end(
    rang: bool, answered: bool, cause: int | None, expected: Outcome
) -> None:
    heard = Heard(rang=rang, answered=answered, cause=cause)
    assert followed(heard, reason="r") == (expected, "r")


@pytest.mark.parametrize(
    ("rang", "cause", "expected"),
    [
        (False, NO_ANSWER, (Outcome.ERROR, "pbx_lost")),  # may have rung before the restart
        (True, NO_ANSWER, (Outcome.DELIVERED, None)),  # seen ringing since
        (False, None, (Outcome.ERROR, "pbx_lost")),  # hung up at its cap: rang before?
        (False, 17, (Outcome.BUSY, None)),  # busy says so whatever came before
    ],
)
def test_followed_an_adopted_call(
    rang: bool, cause: int, expected: tuple[Outcome, str | None]
) -> None:
    heard = Heard(rang=rang, cause=cause, timed_out=cause is None)
    assert followed(heard, alert_unknown=True) == expected


@pytest.mark.parametrize(
    ("rang", "answered", "cause", "expected"),
    [
        (False, False, 21, (Outcome.ERROR, CANCELED)),  # our hangup beat the INVITE
        (False, False, NORMAL_CLEARING, (Outcome.ERROR, CANCELED)),
        (False, False, None, (Outcome.ERROR, CANCELED)),
        (True, False, NORMAL_CLEARING, (Outcome.DELIVERED, None)),  # it rang: delivered
        (True, True, NORMAL_CLEARING, (Outcome.ANSWERED, None)),
        (False, False, 17, (Outcome.BUSY, None)),  # the network answered first
        (False, False, NO_ANSWER, (Outcome.UNREACHABLE, None)),
        (False, False, 1, (Outcome.INVALID_NUMBER, None)),
        (False, False, 34, (Outcome.CONGESTION, None)),
    ],
)
def test_followed_a_call_the_gateway_hung_up(
    rang: bool, answered: bool, cause: int | None, expected: tuple[Outcome, str | None]
) -> None:
    heard = Heard(rang=rang, answered=answered, cause=cause)
    assert followed(heard, canceled=True) == expected


def test_trunk_refusals_and_cancels_say_nothing_of_the_number() -> None:
    assert not about_number(Outcome.TRUNK_REJECTED, None)
    assert not about_number(Outcome.ERROR, CANCELED)
    assert about_number(Outcome.NO_ALERTING, POST_DIAL_TIMEOUT)
    assert about_number(Outcome.DELIVERED, RING_TIMEOUT)
