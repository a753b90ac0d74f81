"""The saga's decision, from the step outcomes alone."""

from __future__ import annotations

import pytest

from sagas.definition import SagaDefinition, Stage, Step
from sagas.engine import Decision, SagaState, StepOutcome, StepStatus, decide

SAGA = SagaDefinition(
    name="order",
    stages=(Stage((Step("reserve_stock", "t.stock"), Step("reserve_credit", "t.credit"))),),
    complete_task="t.complete",
)
APPLIED = StepStatus.APPLIED
REFUSED = StepStatus.REFUSED
ABORTED = StepStatus.ABORTED


def outcomes(stock: tuple[StepStatus, str | None], credit: tuple[StepStatus, str | None]):
    return {
        "reserve_stock": StepOutcome("reserve_stock", *stock),
        "reserve_credit": StepOutcome("reserve_credit", *credit),
    }


@pytest.mark.parametrize(
    ("stock", "credit", "expected"),
    [
        ((APPLIED, None), (APPLIED, None), Decision(SagaState.CONFIRMED)),
        (
            (REFUSED, "out_of_stock"),
            (APPLIED, None),
            Decision(SagaState.CANCELLED, ("reserve_credit",), "out_of_stock"),
        ),
        (
            (APPLIED, None),
            (REFUSED, "credit_limit_exceeded"),
            Decision(SagaState.CANCELLED, ("reserve_stock",), "credit_limit_exceeded"),
        ),
        (
            (REFUSED, "out_of_stock"),
            (REFUSED, "credit_limit_exceeded"),
            Decision(SagaState.CANCELLED, (), "out_of_stock"),
        ),
        (
            (APPLIED, None),
            (ABORTED, "deadline_exceeded"),
            Decision(SagaState.CANCELLED, ("reserve_stock",), "deadline_exceeded"),
        ),
    ],
)
def test_confirms_only_when_every_step_applied_and_compensates_the_applied_ones(
    stock, credit, expected
) -> None:
    assert decide(SAGA, outcomes(stock, credit)) == expected


def test_refuses_to_decide_without_every_outcome() -> None:
    with pytest.raises(ValueError, match="no outcome"):
        decide(SAGA, {"reserve_stock": StepOutcome("reserve_stock", APPLIED)})


def test_refuses_to_decide_twice() -> None:
    compensated = outcomes((StepStatus.COMPENSATED, None), (REFUSED, "credit_limit_exceeded"))
    with pytest.raises(ValueError, match="already decided"):
        decide(SAGA, compensated)


def test_a_definition_needs_distinct_steps_in_stages_of_at_least_one() -> None:
    with pytest.raises(ValueError, match="distinct"):
        SagaDefinition("x", (Stage((Step("a", "t"), Step("a", "u"))),), "c")
    with pytest.raises(ValueError, match="distinct"):
        SagaDefinition("x", (Stage((Step("a", "t"),)), Stage((Step("a", "u"),))), "c")
    with pytest.raises(ValueError, match="at least one step"):
        SagaDefinition("x", (), "c")
    with pytest.raises(ValueError, match="at least one step"):
        SagaDefinition("x", (Stage((Step("a", "t"),)), Stage(())), "c")
    with pytest.raises(ValueError, match="version"):
        SagaDefinition("x", (Stage((Step("a", "t"),)),), "c", version=0)


def test_an_outcome_travels_as_plain_json() -> None:
    outcome = StepOutcome("reserve_stock", REFUSED, "out_of_stock")
    assert outcome.to_message() == {
        "step": "reserve_stock",
        "status": "REFUSED",
        "reason": "out_of_stock",
    }


def test_a_forced_cancellation_compensates_every_applied_step() -> None:
    both = outcomes((APPLIED, None), (APPLIED, None))
    assert decide(SAGA, both, cancel_reason="confirmation_failed") == Decision(
        SagaState.CANCELLED, ("reserve_credit", "reserve_stock"), "confirmation_failed"
    )
