"""Call outcomes: DESIGN.md section 4, what the PBX saw to an outcome and a number health."""

from __future__ import annotations

import pytest

from gateway.outcomes import (
    CANCELED,
    DELIVERED_OUTCOMES,
    Health,
    Outcome,
    classify,
    followed,
    health_of,
)

NORMAL_CLEARING = 16
NO_ANSWER = 19  # what Asterisk reports when its own ring timeout ends a ringing call
INVALID_CAUSES = (1, 3, 22, 28)
UNREACHABLE_CAUSES = (18, 19, 20, 27)
CONGESTION_CAUSES = (34, 38, 41, 42, 44, 47)

# (alerted, answered, cause) -> outcome, one row per line of the table.
TABLE: list[tuple[bool, bool, int | None, Outcome]] = [
    # Rang (180) or progress (183), then ended by the ring timeout or by the callee.
    (True, False, NO_ANSWER, Outcome.DELIVERED),
    (True, False, NORMAL_CLEARING, Outcome.DELIVERED),
    (True, False, 17, Outcome.DELIVERED),  # callee pressed "busy" after it rang
    (True, False, 21, Outcome.DELIVERED),  # callee declined after it rang
    (True, False, 18, Outcome.DELIVERED),
    (True, False, None, Outcome.DELIVERED),
    # Answered: the gateway hangs up at once.
    (True, True, NORMAL_CLEARING, Outcome.ANSWERED),
    (False, True, NORMAL_CLEARING, Outcome.ANSWERED),
    (True, True, None, Outcome.ANSWERED),
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


@pytest.mark.parametrize(("alerted", "answered", "cause", "expected"), TABLE)
def test_classify_follows_the_design_table(
    alerted: bool, answered: bool, cause: int | None, expected: Outcome
) -> None:
    assert classify(alerted=alerted, answered=answered, cause=cause) is expected


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
    }


def test_only_delivered_and_answered_count_as_delivered() -> None:
    assert frozenset({Outcome.DELIVERED, Outcome.ANSWERED}) == DELIVERED_OUTCOMES


def test_outcomes_and_health_serialise_as_their_contract_strings() -> None:
    assert str(Outcome.INVALID_NUMBER) == "invalid_number"
    assert f"{Health.UNREACHABLE}" == "unreachable"
    assert Outcome("delivered") is Outcome.DELIVERED


@pytest.mark.parametrize(("alerted", "answered", "cause", "expected"), TABLE)
def test_followed_is_classify_for_a_call_heard_from_start_to_end(
    alerted: bool, answered: bool, cause: int | None, expected: Outcome
) -> None:
    assert followed(alerted=alerted, answered=answered, cause=cause, reason="r") == (
        expected,
        "r",
    )


@pytest.mark.parametrize(
    ("alerted", "cause", "expected"),
    [
        (False, NO_ANSWER, (Outcome.ERROR, "pbx_lost")),  # may have rung before the restart
        (True, NO_ANSWER, (Outcome.DELIVERED, None)),  # seen ringing since
        (False, 17, (Outcome.BUSY, None)),  # busy says so whatever came before
    ],
)
def test_followed_an_adopted_call(
    alerted: bool, cause: int, expected: tuple[Outcome, str | None]
) -> None:
    assert followed(alerted=alerted, answered=False, cause=cause, alert_unknown=True) == expected


@pytest.mark.parametrize(
    ("alerted", "answered", "cause", "expected"),
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
    alerted: bool, answered: bool, cause: int | None, expected: tuple[Outcome, str | None]
) -> None:
    assert followed(alerted=alerted, answered=answered, cause=cause, canceled=True) == expected
