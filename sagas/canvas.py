"""Compiling a saga to a Celery chord and publishing it, by task name (or, with the
database join, publishing its steps alone).

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
    """The Celery task id of one step of one saga."""
    return f"{saga_id}.{step}"


def complete_task_id(saga_id: UUID | str) -> str:
    """The Celery task id of a saga's completion."""
    return f"{saga_id}.complete"


def dispatch_saga(
    app: Celery,
    definition: SagaDefinition,
    saga_id: UUID,
    payload: Mapping[str, Any],
    *,
    retry: bool = True,
    join: str | None = None,
) -> None:
    """Publish the saga: every step in parallel, then its completion. ``join`` (by
    default the app's ``orders_saga_join``): "chord", a Celery chord whose body
    completes the saga; "database", the steps alone, each completing the saga once
    every step has an outcome in the ledger.

    Raises the broker's error when it cannot be reached (and ``retry`` is off)."""
    chord: dict[str, Any] = {}
    if (join or app.conf.get("orders_saga_join", "chord")) == "chord":
        group_id = str(saga_id)
        body = app.signature(
            definition.complete_task,
            args=(str(saga_id),),
            ignore_result=True,
        )
        body.freeze(complete_task_id(saga_id), group_id=group_id)
        app.backend.set_chord_size(group_id, len(definition.steps))
        chord = {"chord": body, "group_id": group_id}
    with app.producer_or_acquire() as producer:
        for index, step in enumerate(definition.steps):
            app.send_task(
                step.task,
                args=(str(saga_id), dict(payload)),
                task_id=step_task_id(saga_id, step.name),
                ignore_result=True,
                producer=producer,
                retry=retry,
                **({**chord, "group_index": index} if chord else {}),
            )
