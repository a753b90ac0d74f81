"""Getting sagas onto the broker: staged with the order, dispatched right after the
commit, and relayed from the outbox when that dispatch did not happen."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from uuid import UUID

from celery import Celery
from sqlalchemy import Connection, Engine, delete, select, text, update

from config import tracing
from config.failpoints import failpoint
from sagas.canvas import dispatch_saga
from sagas.definition import SagaDefinition, SagaStart
from sagas.engine import SagaState
from sagas.store import create_saga
from sagas.tables import outbox, sagas

logger = logging.getLogger(__name__)

#: Most outbox entries one relay run dispatches.
RELAY_BATCH = 200
#: A claimed outbox entry comes due again this long after its claim, if it is still
#: there (its publish failed, or its relay died).
RELAY_LEASE = timedelta(seconds=10)


def stage_saga(
    conn: Connection, definition: SagaDefinition, start: SagaStart, *, deadline: timedelta
) -> None:
    """Record a running saga and its outbox entry in the caller's transaction, with the
    current trace's context (the request's span, which gets the order and saga ids)."""
    now = datetime.now(UTC)
    tracing.annotate(order_id=start.order_id, saga_id=start.saga_id)
    create_saga(
        conn,
        start.saga_id,
        definition.name,
        start.payload,
        now=now,
        deadline_at=now + deadline,
        trace_context=tracing.current_traceparent(),
    )


class OutboxClearer:
    """Removes the outbox entries of dispatched sagas, many at a time, in the background.

    One delete every ``interval`` instead of one transaction per order. Losing a batch
    (a crash) only makes the relay dispatch those sagas a second time, which changes
    nothing: their steps and completion are idempotent."""

    #: Seconds between two deletes.
    interval = 0.1

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pending: list[UUID] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, saga_id: UUID) -> None:
        """Clear this saga's entry soon."""
        with self._lock:
            self._pending.append(saga_id)
            if self._thread is None or self._pid != os.getpid():  # started after a fork
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="outbox-clearer", daemon=True
                )
                self._thread.start()

    def flush(self) -> None:
        """Delete the pending entries now."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            with self.engine.begin() as conn:
                conn.execute(text("SET LOCAL synchronous_commit TO OFF"))
                conn.execute(delete(outbox).where(outbox.c.saga_id.in_(batch)))
        except Exception as exc:
            logger.warning("%d outbox entries kept (the relay will see them): %r", len(batch), exc)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self.flush()


class ChordLauncher:
    """The ``SagaStarter`` of the API: stages the saga in the order's transaction, then
    publishes its chord; the outbox relay covers a publish that failed."""

    def __init__(
        self, engine: Engine, app: Celery, definition: SagaDefinition, deadline: timedelta
    ) -> None:
        self.engine = engine
        self.app = app
        self.definition = definition
        self.deadline = deadline
        self.clearer = OutboxClearer(engine)

    def stage(self, conn: Connection, start: SagaStart) -> None:
        """Record the running saga and its outbox entry in the caller's transaction."""
        stage_saga(conn, self.definition, start, deadline=self.deadline)

    def launch(self, start: SagaStart) -> bool:
        """Publish the saga now (its outbox entry is cleared soon after); False if left
        to the relay."""
        try:
            # No publish retries: a broker that does not answer costs the client at most
            # the socket timeout; the outbox entry makes the order durable anyway.
            dispatch_saga(self.app, self.definition, start.saga_id, start.payload, retry=False)
        except Exception as exc:
            logger.warning("saga %s left to the outbox relay: %r", start.saga_id, exc)
            return False
        failpoint("launch.after_publish")
        self.clearer.add(start.saga_id)
        return True


def relay_outbox(
    engine: Engine,
    app: Celery,
    definitions: Mapping[str, SagaDefinition],
    *,
    grace: timedelta,
    limit: int = RELAY_BATCH,
    lease: timedelta = RELAY_LEASE,
) -> int:
    """Dispatch the sagas whose outbox entry is older than ``grace``; return how many.

    Entries are claimed first, in a transaction of their own that moves each entry's
    time ``lease`` ahead (SKIP LOCKED: relays may run side by side); nothing is locked
    while publishing. A dispatched entry is deleted; one whose publish failed, or whose
    relay died, comes due again when its lease ends."""
    now = datetime.now(UTC)
    due = (
        select(outbox.c.saga_id)
        .where(outbox.c.created_at < now - grace)
        .order_by(outbox.c.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    with engine.begin() as conn:
        ids = list(
            conn.execute(
                update(outbox)
                .where(outbox.c.saga_id.in_(due.scalar_subquery()))
                .values(created_at=now + lease)
                .returning(outbox.c.saga_id)
            ).scalars()
        )
        if not ids:
            return 0
        claimed = conn.execute(
            select(
                sagas.c.id, sagas.c.name, sagas.c.state, sagas.c.payload, sagas.c.trace_context
            ).where(sagas.c.id.in_(ids))
        ).all()
    done: list[UUID] = []
    try:
        for saga in claimed:
            if saga.state == SagaState.RUNNING:
                # In the order's trace: the steps it sends are children of this span.
                with tracing.resumed(saga.trace_context, "outbox relay", saga_id=saga.id):
                    dispatch_saga(app, definitions[saga.name], saga.id, saga.payload)
            # else: finished meanwhile (its dispatch worked, the delete did not)
            done.append(saga.id)
        failpoint("relay.after_publish")
    finally:
        if done:
            with engine.begin() as conn:
                conn.execute(delete(outbox).where(outbox.c.saga_id.in_(done)))
    dispatched = sum(1 for saga in claimed if saga.state == SagaState.RUNNING)
    if dispatched:
        logger.info("outbox relay dispatched %d sagas", dispatched)
    return dispatched
