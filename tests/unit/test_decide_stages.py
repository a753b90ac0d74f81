"""Deciding a saga of several stages, stage by stage, from the step outcomes alone."""

from __future__ import annotations

import pytest

from sagas.definition import SagaDefinition, Stage, Step
from sagas.engine import Decision, SagaState, StepOutcome, StepStatus, decide

APPLIED = StepStatus.APPLIED
REFUSED = StepStatus.REFUSED
ABORTED = StepStatus.ABORTED

TRIP = SagaDefinition(
    name="trip",
    stages=(
        Stage((Step("hold_seat", "t.seat"),)),
        Stage((Step("hold_room", "t.room"), Step("hold_car", "t.car"))),
        Stage((Step("issue_ticket", "t.ticket"),)),
    ),
    complete_task="t.complete",
    version=2,
)


def ledger(**statuses: StepStatus | tuple[StepStatus, str]) -> dict[str, StepOutcome]:
    outcomes = {}
    for step, status in statuses.items():
        status, reason = status if isinstance(status, tuple) else (status, None)
        outcomes[step] = StepOutcome(step, status, reason)
    return outcomes


def test_a_definition_lists_its_steps_stage_after_stage() -> None:
    assert TRIP.step_names == ("hold_seat", "hold_room", "hold_car", "issue_ticket")
    assert [TRIP.stage_of(step) for step in TRIP.step_names] == [0, 1, 1, 2]
    assert TRIP.step_of_task("t.car") == Step("hold_car", "t.car")
    assert TRIP.step_of_task("t.unknown") is None
    with pytest.raises(ValueError, match="no step 'fly'"):
        TRIP.stage_of("fly")


def test_goes_on_to_the_next_stage_when_every_step_of_the_running_one_applied() -> None:
    assert decide(TRIP, ledger(hold_seat=APPLIED), stage=0) == Decision(
        SagaState.RUNNING, next_stage=1
    )
    stage_1 = ledger(hold_seat=APPLIED, hold_room=APPLIED, hold_car=APPLIED)
    assert decide(TRIP, stage_1, stage=1).next_stage == 2
    assert decide(TRIP, stage_1, stage=1).advances


def test_confirms_when_the_last_stage_applied() -> None:
    every = ledger(hold_seat=APPLIED, hold_room=APPLIED, hold_car=APPLIED, issue_ticket=APPLIED)
    assert decide(TRIP, every, stage=2) == Decision(SagaState.CONFIRMED)


def test_a_refusal_compensates_the_earlier_stages_and_its_own_in_reverse_stage_order() -> None:
    outcomes = ledger(hold_seat=APPLIED, hold_room=(REFUSED, "no_room"), hold_car=APPLIED)
    assert decide(TRIP, outcomes, stage=1) == Decision(
        SagaState.CANCELLED, compensate=("hold_car", "hold_seat"), reason="no_room"
    )


def test_a_refusal_in_the_first_stage_compensates_nothing_and_later_stages_never_run() -> None:
    decision = decide(TRIP, ledger(hold_seat=(REFUSED, "no_seat")), stage=0)
    assert decision == Decision(SagaState.CANCELLED, (), "no_seat")
    assert not decision.advances


def test_the_reason_is_the_first_step_in_declaration_order_that_did_not_apply() -> None:
    outcomes = ledger(
        hold_seat=APPLIED, hold_room=(ABORTED, "timed_out"), hold_car=(REFUSED, "no_car")
    )
    assert decide(TRIP, outcomes, stage=1).reason == "timed_out"


def test_a_refusal_in_the_last_stage_compensates_every_earlier_step_latest_first() -> None:
    outcomes = ledger(
        hold_seat=APPLIED,
        hold_room=APPLIED,
        hold_car=APPLIED,
        issue_ticket=(REFUSED, "no_ticket"),
    )
    assert decide(TRIP, outcomes, stage=2) == Decision(
        SagaState.CANCELLED, ("hold_car", "hold_room", "hold_seat"), "no_ticket"
    )


def test_a_forced_cancellation_compensates_every_applied_step_in_reverse_stage_order() -> None:
    outcomes = ledger(hold_seat=APPLIED, hold_room=APPLIED, hold_car=APPLIED)
    assert decide(TRIP, outcomes, stage=1, cancel_reason="cancelled_by_operator") == Decision(
        SagaState.CANCELLED, ("hold_car", "hold_room", "hold_seat"), "cancelled_by_operator"
    )


def test_the_running_stage_needs_every_outcome_and_earlier_ones_may_be_read_alone() -> None:
    with pytest.raises(ValueError, match=r"no outcome for steps \['hold_car'\]"):
        decide(TRIP, ledger(hold_seat=APPLIED, hold_room=APPLIED), stage=1)
    with pytest.raises(ValueError, match="no stage 3"):
        decide(TRIP, ledger(hold_seat=APPLIED), stage=3)


def test_refuses_to_decide_a_saga_whose_earlier_stage_was_compensated() -> None:
    outcomes = ledger(hold_seat=StepStatus.COMPENSATED, hold_room=APPLIED, hold_car=APPLIED)
    with pytest.raises(ValueError, match="already decided"):
        decide(TRIP, outcomes, stage=1)
