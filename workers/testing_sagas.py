"""The "trip" saga, for tests only (``TEST_TASKS=1``, refused in production): three
stages and two versions, with effects the tests can count, so that stages and versions
are proven on the real processes::

    stage 0   hold_seat                                    one step: a plain task
    stage 1   hold_room | hold_car (| buy_insurance, v2)   a chord
    stage 2   issue_ticket                                 one step

Every applied step writes a row of ``saga_test_effects``: the version that wrote it,
which of the saga's steps had an outcome committed when it ran (``seen``: stage order),
and how many times it was applied and undone (each must be once). Every decision writes
a row of ``saga_test_outcomes``. The tests create both tables as the schema's owner
(``create_test_tables``); no migration does. A payload ``{"refuse": "<step>"}`` makes that
step refuse with ``refused_by_test``. ``TEST_SAGA_VERSIONS`` ("1", "1,2"; by default
every version) says which versions a process registers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from celery import Celery
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    Uuid,
    false,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from config import names
from config.database import transaction
from sagas.canvas import dispatch_saga
from sagas.definition import SagaDefinition, SagaStart, Stage, Step
from sagas.launch import clear_entries, stage_saga
from sagas.registry import SagaRegistry
from sagas.tables import saga_steps

TRIP = "trip"
HOLD_SEAT = "hold_seat"
HOLD_ROOM = "hold_room"
HOLD_CAR = "hold_car"
BUY_INSURANCE = "buy_insurance"
ISSUE_TICKET = "issue_ticket"
#: The reason a step named by the payload's "refuse" refuses with.
REFUSED_BY_TEST = "refused_by_test"
#: A trip's deadline unless the caller gives one (the sweeper's first look).
DEFAULT_DEADLINE = timedelta(seconds=30)

_seat = Step(HOLD_SEAT, names.TRIP_HOLD_SEAT)
_room = Step(HOLD_ROOM, names.TRIP_HOLD_ROOM)
_car = Step(HOLD_CAR, names.TRIP_HOLD_CAR)
_ticket = Step(ISSUE_TICKET, names.TRIP_ISSUE_TICKET)

TRIP_V1 = SagaDefinition(
    name=TRIP,
    stages=(Stage((_seat,)), Stage((_room, _car)), Stage((_ticket,))),
    complete_task=names.COMPLETE_TRIP,
    version=1,
)
#: Version 2 buys an insurance alongside the room and the car.
TRIP_V2 = SagaDefinition(
    name=TRIP,
    stages=(
        Stage((_seat,)),
        Stage((_room, _car, Step(BUY_INSURANCE, names.TRIP_BUY_INSURANCE))),
        Stage((_ticket,)),
    ),
    complete_task=names.COMPLETE_TRIP,
    version=2,
)
#: Every version of the trip, by number.
TRIP_VERSIONS: dict[int, SagaDefinition] = {1: TRIP_V1, 2: TRIP_V2}

metadata = MetaData()

#: One row per applied step of a trip.
effects = Table(
    "saga_test_effects",
    metadata,
    Column("saga_id", Uuid, primary_key=True),
    Column("step", Text, primary_key=True),
    #: The definition version whose handlers applied it.
    Column("version", Integer, nullable=False),
    Column("undone", Boolean, nullable=False, server_default=false()),
    #: Times the effect was committed: a second commit counts here (exactly once: 1).
    Column("applied", Integer, nullable=False, server_default="1"),
    #: Times it was undone (exactly once when compensated: 1).
    Column("undos", Integer, nullable=False, server_default="0"),
    #: The saga's steps with an outcome committed when this one ran, sorted.
    Column("seen", ARRAY(Text), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
    Column("undone_at", DateTime(timezone=True)),
)

#: One row per decided trip: its last decision and how many were recorded.
outcomes = Table(
    "saga_test_outcomes",
    metadata,
    Column("saga_id", Uuid, primary_key=True),
    #: CONFIRMED, CANCELLED or COMPENSATION_FAILED.
    Column("state", Text, nullable=False),
    Column("reason", Text),
    Column("version", Integer, nullable=False),
    #: Decisions recorded (a confirmation or a cancellation: once).
    Column("decisions", Integer, nullable=False, server_default="1"),
    Column("problem", Text),
)


def create_test_tables(conn: Connection, grant_to: str) -> None:
    """Create the trip's tables (as the schema's owner) unless they exist, and let
    ``grant_to`` (the system's role) use their rows."""
    metadata.create_all(conn, checkfirst=True)
    for table in metadata.sorted_tables:
        conn.execute(
            text(f'GRANT SELECT, INSERT, UPDATE, DELETE ON "{table.name}" TO "{grant_to}"')
        )


class TripSaga:
    """The trip's effects in one version, for ``sagas.runner`` (see ``SagaHandlers``)."""

    def __init__(self, definition: SagaDefinition) -> None:
        self.definition = definition

    def apply(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> str | None:
        """Write the step's effect row, or refuse if the payload names the step."""
        self.definition.stage_of(step)  # ValueError: not a step of this version
        if payload.get("refuse") == step:
            return REFUSED_BY_TEST
        saga_id = _saga(payload)
        seen = conn.execute(
            select(saga_steps.c.step).where(saga_steps.c.saga_id == saga_id)
        ).scalars()
        row = {
            "saga_id": saga_id,
            "step": step,
            "version": self.definition.version,
            "seen": sorted(seen),
            "applied_at": func.clock_timestamp(),
        }
        insert = pg_insert(effects).values(row)
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=[effects.c.saga_id, effects.c.step],
                set_={"applied": effects.c.applied + 1},
            )
        )
        return None

    def compensate(self, step: str, conn: Connection, payload: Mapping[str, Any]) -> None:
        """Mark the step's effect undone."""
        conn.execute(
            update(effects)
            .where(effects.c.saga_id == _saga(payload), effects.c.step == step)
            .values(undone=True, undos=effects.c.undos + 1, undone_at=func.clock_timestamp())
        )

    def confirm(self, conn: Connection, payload: Mapping[str, Any]) -> None:
        """Record the trip CONFIRMED."""
        self._decided(conn, payload, "CONFIRMED", None)

    def cancel(self, conn: Connection, payload: Mapping[str, Any], reason: str) -> None:
        """Record the trip CANCELLED, and why."""
        self._decided(conn, payload, "CANCELLED", reason)

    def compensation_failed(
        self, conn: Connection, payload: Mapping[str, Any], reason: str, problem: str
    ) -> None:
        """Record that the trip's compensation failed (for now)."""
        self._decided(conn, payload, "COMPENSATION_FAILED", reason, problem)

    def _decided(
        self,
        conn: Connection,
        payload: Mapping[str, Any],
        state: str,
        reason: str | None,
        problem: str | None = None,
    ) -> None:
        row = {"state": state, "reason": reason, "problem": problem}
        insert = pg_insert(outcomes).values(
            saga_id=_saga(payload), version=self.definition.version, **row
        )
        conn.execute(
            insert.on_conflict_do_update(
                index_elements=[outcomes.c.saga_id],
                set_={**row, "decisions": outcomes.c.decisions + 1},
            )
        )


def _saga(payload: Mapping[str, Any]) -> UUID:
    return UUID(payload["saga_id"])


def versions_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, ...]:
    """The trip versions ``TEST_SAGA_VERSIONS`` names ("1", "1,2"; by default all)."""
    env = os.environ if environ is None else environ
    given = env.get("TEST_SAGA_VERSIONS", "").strip()
    if not given:
        return tuple(TRIP_VERSIONS)
    try:
        versions = tuple(sorted({int(part) for part in given.split(",") if part.strip()}))
    except ValueError:
        versions = ()
    if not versions or not set(versions) <= set(TRIP_VERSIONS):
        known = ", ".join(map(str, TRIP_VERSIONS))
        raise ValueError(f"TEST_SAGA_VERSIONS names trip versions ({known}): {given!r}")
    return versions


def register_trip(registry: SagaRegistry, versions: Iterable[int] | None = None) -> None:
    """Add the trip's handlers in ``versions`` (by default ``TEST_SAGA_VERSIONS``'s)."""
    for version in versions_from_env() if versions is None else versions:
        registry.add(TripSaga(TRIP_VERSIONS[version]))


def start_trip(
    engine: Engine,
    app: Celery,
    registry: SagaRegistry,
    payload: Mapping[str, Any],
    *,
    version: int | None = None,
    deadline: timedelta = DEFAULT_DEADLINE,
) -> UUID:
    """Stage a trip on ``version`` (by default the latest the registry has), publish its
    first stage, and clear its outbox entry, as the API does for an order; return the
    saga's id. The payload gets the saga's id (the handlers' key)."""
    handlers = registry.latest(TRIP) if version is None else registry.get(TRIP, version)
    definition = handlers.definition
    saga_id = uuid4()
    start = SagaStart(saga_id, saga_id, {**payload, "saga_id": str(saga_id)})
    with transaction(engine) as conn:
        stage_saga(conn, definition, start, deadline=deadline)
    dispatch_saga(app, definition, saga_id, start.payload)
    with engine.begin() as conn:
        # Only while it is still at its first stage: once moved on, the entry is its
        # next stage's (the relay dispatches it if that publish is lost).
        clear_entries(conn, [(saga_id, 0)])
    return saga_id
