"""Compiling a saga's stage to a Celery chord and publishing it, by task name (or, with
the database join, or for a stage of one step, publishing its steps alone).

The chord's messages are sent directly: the header tasks carry the body signature and
join in the result backend's chord keys, exactly as ``celery.chord`` does, but without
the group result barrier, which subscribes the publisher to every header task's result
channel and never lets go (a leak in a long-running API process). Header tasks store no
result of their own; the saga's outcome lives in PostgreSQL.

Task ids are derived from the saga id, so a second dispatch of the same saga (outbox
relay) is recognisable everywhere: in logs, in Flower, in the chord join.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from uuid import UUID

from celery import Celery

from sagas.definition import SagaDefinition


def step_task_id(saga_id: UUID | str, step: str) -> str:
    """The Celery task id of one step of one saga (step names are unique in a saga)."""
    return f"{saga_id}.{step}"


def complete_task_id(saga_id: UUID | str, stage: int = 0) -> str:
    """The Celery task id of the completion of one stage of a saga (stage 0 keeps the
    id it had before sagas had stages: messages in flight across a deploy match)."""
    return f"{saga_id}.complete" if stage == 0 else f"{saga_id}.complete.s{stage}"


def group_id(saga_id: UUID | str, stage: int = 0) -> str:
    """The chord's group id of one stage of a saga (stage 0: the saga's id)."""
    return str(saga_id) if stage == 0 else f"{saga_id}.s{stage}"


def step_kwargs(definition: SagaDefinition) -> dict[str, Any]:
    """The keyword arguments of a step's message: the definition's version, which the
    worker runs the step on. Version 1 sends none (a message without one means version
    1), so that its messages are those of the workers that predate versions."""
    return {} if definition.version == 1 else {"version": definition.version}


def dispatch_saga(
    app: Celery,
    definition: SagaDefinition,
    saga_id: UUID,
    payload: Mapping[str, Any],
    *,
    stage: int = 0,
    retry: bool = True,
    join: str | None = None,
) -> None:
    """Publish one stage of the saga (its first by default): its steps in parallel, then
    its completion. ``join`` (by default the app's ``orders_saga_join``): "chord", a
    Celery chord whose body completes the stage; "database", the steps alone, each
    completing the stage once every step of it has an outcome in the ledger. A stage
    of one step is that step alone whatever the join: it completes the stage itself.

    Raises the broker's error when it cannot be reached (and ``retry`` is off)."""
    steps = definition.stages[stage].steps
    chord: dict[str, Any] = {}
    joined = (join or app.conf.get("orders_saga_join", "chord")) == "chord"
    if joined and len(steps) > 1:
        group = group_id(saga_id, stage)
        body = app.signature(
            definition.complete_task,
            args=(str(saga_id),),
            ignore_result=True,
        )
        body.freeze(complete_task_id(saga_id, stage), group_id=group)
        app.backend.set_chord_size(group, len(steps))
        chord = {"chord": body, "group_id": group}
    kwargs = step_kwargs(definition)
    with app.producer_or_acquire() as producer:
        for index, step in enumerate(steps):
            app.send_task(
                step.task,
                args=(str(saga_id), dict(payload)),
                kwargs=kwargs,
                task_id=step_task_id(saga_id, step.name),
                ignore_result=True,
                producer=producer,
                retry=retry,
                **({**chord, "group_index": index} if chord else {}),
            )
