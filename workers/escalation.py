"""A compensation given up to an operator: a dead letter, in the transaction that gives it
up (the workers' sweeper and completions, and the API's cancel, all use it)."""

from __future__ import annotations

from uuid import UUID

from sqlalchemy import Connection, select

from orders.saga import DEFINITIONS, ORDER_SAGA
from sagas.registry import SagaRegistry
from sagas.runner import Escalate
from sagas.tables import sagas
from workers import dlq


def escalation(registry: SagaRegistry) -> Escalate:
    """The escalation of the sagas in ``registry``: a compensation that failed too often
    becomes a dead letter (one per saga), in the transaction that gives it up: an
    operator replays it (``python -m workers.dlq replay ID``) once the cause is mended,
    which hands the saga back to the sweeper. The letter names the completion task of
    the saga's own name (order, refund, ...)."""

    def escalate(conn: Connection, saga_id: UUID, attempts: int, problem: str) -> None:
        name = conn.execute(select(sagas.c.name).where(sagas.c.id == saga_id)).scalar() or ""
        known = name in registry.names()
        definition = registry.latest(name).definition if known else ORDER_SAGA
        dlq.record_in(
            conn,
            task_id=f"{saga_id}.compensation",
            task_name=definition.complete_task,
            kind=dlq.COMPENSATION_FAILED,
            error=f"the compensation failed {attempts} times; it is no longer retried: {problem}",
            args=[[], str(saga_id)],
            kwargs={},
            attempts=attempts,
        )

    return escalate


#: The escalation of the order domain's sagas (the order and the refund).
escalate_compensation = escalation(DEFINITIONS)
