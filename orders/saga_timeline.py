"""An order's saga timeline, read from the saga row and its step ledger (and its refund
saga's, when one was started)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from sqlalchemy import Engine, bindparam, select

from config.tracing import trace_id_of
from orders.ports import SagaTimeline, TimelineStep
from orders.tables import orders
from sagas.tables import saga_steps, sagas

_READ = (
    select(
        orders.c.saga_id,
        orders.c.refund_saga_id,
        orders.c.created_at,
        sagas.c.state,
        sagas.c.reason,
        sagas.c.finished_at,
        sagas.c.trace_context,
        saga_steps.c.step,
        saga_steps.c.started_at,
        saga_steps.c.finished_at.label("step_finished_at"),
        saga_steps.c.status,
        saga_steps.c.reason.label("step_reason"),
        saga_steps.c.attempts,
    )
    .join(sagas, sagas.c.id == orders.c.saga_id)
    .outerjoin(saga_steps, saga_steps.c.saga_id == sagas.c.id)
    .where(orders.c.id == bindparam("order_id"))
    .order_by(saga_steps.c.started_at)
)

#: A refund saga with its steps.
_REFUND = (
    select(
        sagas.c.state,
        sagas.c.reason,
        sagas.c.created_at,
        sagas.c.finished_at,
        saga_steps.c.step,
        saga_steps.c.started_at,
        saga_steps.c.finished_at.label("step_finished_at"),
        saga_steps.c.status,
        saga_steps.c.reason.label("step_reason"),
        saga_steps.c.attempts,
    )
    .outerjoin(saga_steps, saga_steps.c.saga_id == sagas.c.id)
    .where(sagas.c.id == bindparam("saga_id"))
    .order_by(saga_steps.c.started_at)
)


def _steps(rows: Sequence[Any]) -> tuple[TimelineStep, ...]:
    return tuple(
        TimelineStep(
            row.step,
            row.started_at,
            row.step_finished_at,
            row.status,
            row.step_reason,
            row.attempts,
        )
        for row in rows
        if row.step is not None
    )


class SqlTimeline:
    """The API's ``TimelineSource``: one query over the order, its saga and its steps."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def timeline(self, order_id: UUID) -> SagaTimeline | None:
        """The order's saga timeline, with its refund saga's if it has one; None if
        there is no such order."""
        with self.engine.connect() as conn:
            rows = conn.execute(_READ, {"order_id": order_id}).all()
            if not rows:
                return None
            first = rows[0]
            refund_id = first.refund_saga_id
            refund_rows = conn.execute(_REFUND, {"saga_id": refund_id}).all() if refund_id else []
        steps = _steps(rows)
        refund = None
        if refund_rows:
            head = refund_rows[0]
            refund = SagaTimeline(
                order_id,
                refund_id,
                head.state,
                head.reason,
                head.created_at,
                head.finished_at,
                _steps(refund_rows),
            )
        return SagaTimeline(
            order_id,
            first.saga_id,
            first.state,
            first.reason,
            first.created_at,
            first.finished_at,
            steps,
            trace_id_of(first.trace_context),
            refund=refund,
        )
