"""Getting sagas onto the broker: staged with the order, dispatched right after the
commit, each later stage dispatched right after the completion that moved the saga on
to it, and relayed from the outbox when such a dispatch did not happen."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from uuid import UUID

from celery import Celery
from sqlalchemy import Connection, Engine, delete, or_, select, text, tuple_, update

from config import tracing
from config.failpoints import failpoint
from sagas.canvas import dispatch_saga
from sagas.definition import SagaDefinition, SagaStart, UnknownSagaVersion
from sagas.engine import SagaState
from sagas.runner import Completion, SagaLookup
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
    """Record a running saga on ``definition``'s version, at its first stage, and its
    outbox entry, in the caller's transaction, with the current trace's context (the
    request's span, which gets the order and saga ids)."""
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
        version=definition.version,
    )


class OutboxClearer:
    """Removes the outbox entries of dispatched sagas, many at a time, in the background.

    One delete every ``interval`` instead of one transaction per order. Losing a batch
    (a crash) only makes the relay dispatch those sagas a second time, which changes
    nothing: their steps and completion are idempotent.

    An entry added with the stage that was dispatched is removed only while the saga is
    at that stage: a saga of several stages may have moved on meanwhile, and the entry
    is then its next stage's, which must stay until that stage is dispatched."""

    #: Seconds between two deletes.
    interval = 0.1

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._pending: list[tuple[UUID, int | None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, saga_id: UUID, stage: int | None = None) -> None:
        """Clear this saga's entry soon (with ``stage``: if the saga is still at it)."""
        with self._lock:
            self._pending.append((saga_id, stage))
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
                clear_entries(conn, batch)
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
        #: New sagas start on this definition (the latest version the process knows).
        self.definition = definition
        self.deadline = deadline
        self.clearer = OutboxClearer(engine)
        #: A saga of one stage never writes another entry: its clear needs no condition.
        self._cleared_stage = None if len(definition.stages) == 1 else 0

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
        self.clearer.add(start.saga_id, self._cleared_stage)
        return True


def clear_entries(conn: Connection, entries: list[tuple[UUID, int | None]]) -> None:
    """Delete the outbox entries of these sagas; of those given with a stage, only while
    the saga is still at that stage."""
    plain = [saga_id for saga_id, stage in entries if stage is None]
    staged = [(saga_id, stage) for saga_id, stage in entries if stage is not None]
    conditions = []
    if plain:
        conditions.append(outbox.c.saga_id.in_(plain))
    if staged:
        at_stage = select(sagas.c.id).where(tuple_(sagas.c.id, sagas.c.stage).in_(staged))
        conditions.append(outbox.c.saga_id.in_(at_stage.scalar_subquery()))
    if conditions:
        conn.execute(delete(outbox).where(or_(*conditions)))


#: Clears a saga's outbox entry if the saga is still at that stage (``OutboxClearer.add``).
Clear = Callable[[UUID, int], None]


def dispatch_next_stage(app: Celery, done: Completion, clear: Clear) -> bool:
    """After a completion that moved the saga on (``done.advanced_to``), publish the
    stage it moved on to, and ``clear`` its outbox entry; False if there is nothing to
    publish, or if the publish failed (the relay then dispatches it from the entry)."""
    stage = done.advanced_to
    if stage is None or done.definition is None or done.saga_id is None:
        return False
    try:
        dispatch_saga(app, done.definition, done.saga_id, done.payload or {}, stage=stage)
    except Exception as exc:
        logger.warning("saga %s: stage %d left to the outbox relay: %r", done.saga_id, stage, exc)
        return False
    clear(done.saga_id, stage)
    return True


def relay_outbox(
    engine: Engine,
    app: Celery,
    definitions: SagaLookup,
    *,
    grace: timedelta,
    limit: int = RELAY_BATCH,
    lease: timedelta = RELAY_LEASE,
) -> int:
    """Dispatch the running stage of the sagas whose outbox entry is older than
    ``grace``, on the definition of each saga's name and version (``definitions``, a
    ``SagaRegistry``); return how many.

    Entries are claimed first, in a transaction of their own that moves each entry's
    time ``lease`` ahead (SKIP LOCKED: relays may run side by side); nothing is locked
    while publishing. A dispatched entry is deleted; one whose publish failed, or whose
    relay died, comes due again when its lease ends; so does the entry of a saga whose
    version this process does not have (a process that has it relays it)."""
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
                sagas.c.id,
                sagas.c.name,
                sagas.c.version,
                sagas.c.stage,
                sagas.c.state,
                sagas.c.payload,
                sagas.c.trace_context,
            ).where(sagas.c.id.in_(ids))
        ).all()
    done: list[tuple[UUID, int | None]] = []
    dispatched = 0
    try:
        for saga in claimed:
            if saga.state == SagaState.RUNNING:
                try:
                    definition = definitions.get(saga.name, saga.version).definition
                except UnknownSagaVersion as exc:
                    logger.warning("outbox relay: saga %s left for another relay: %s", saga.id, exc)
                    continue
                # In the order's trace: the steps it sends are children of this span.
                with tracing.resumed(saga.trace_context, "outbox relay", saga_id=saga.id):
                    dispatch_saga(app, definition, saga.id, saga.payload, stage=saga.stage)
                dispatched += 1
                # The saga may move on meanwhile: its next stage's entry stays.
                done.append((saga.id, saga.stage))
            else:
                done.append((saga.id, None))  # finished meanwhile (the delete did not)
        failpoint("relay.after_publish")
    finally:
        if done:
            with engine.begin() as conn:
                clear_entries(conn, done)
    if dispatched:
        logger.info("outbox relay dispatched %d sagas", dispatched)
    return dispatched
