"""The saga engine's tables: saga instances, their step ledger, and the dispatch outbox."""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from config.database import NAMING_CONVENTION

metadata = MetaData(naming_convention=NAMING_CONVENTION)

sagas = Table(
    "sagas",
    metadata,
    Column("id", Uuid, primary_key=True),
    #: Which saga definition this instance runs (e.g. "order").
    Column("name", String(64), nullable=False),
    #: The definition's version the saga started on (and runs to its end on).
    Column("version", Integer, nullable=False, server_default="1"),
    #: The stage running now (0-based): the one whose steps are dispatched and awaited.
    Column("stage", Integer, nullable=False, server_default="0"),
    Column("state", String(32), nullable=False),
    #: The saga's input: primitives only (ids, decimal strings, quantities).
    Column("payload", JSONB, nullable=False),
    Column("reason", String(64)),
    #: Why the last completion attempt failed (state COMPENSATION_FAILED).
    Column("error", Text),
    #: When the sweeper next looks at the saga if it is still not final.
    Column("deadline_at", DateTime(timezone=True), nullable=False),
    #: How many times the sweeper dispatched the saga's running stage again.
    Column("redrives", Integer, nullable=False, server_default="0"),
    #: How many times the sweeper took the saga up.
    Column("recovery_attempts", Integer, nullable=False, server_default="0"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    #: The W3C traceparent of the request that started the saga (config.tracing), so
    #: that a later dispatch (relay, sweeper) joins its trace; NULL with traces off.
    Column("trace_context", Text),
    CheckConstraint(
        "state IN ('RUNNING', 'CONFIRMED', 'CANCELLED', 'COMPENSATION_FAILED')",
        name="known_state",
    ),
    Index(
        "ix_sagas_active_deadline",
        "deadline_at",
        postgresql_where=text("state IN ('RUNNING', 'COMPENSATION_FAILED')"),
    ),
    #: Finished sagas by age: the retention job removes the old ones (workers.retention).
    Index(
        "ix_sagas_finished",
        "finished_at",
        postgresql_where=text("state IN ('CONFIRMED', 'CANCELLED')"),
    ),
)

#: One row per (saga, step): the primary key makes each step's effect happen once.
saga_steps = Table(
    "saga_steps",
    metadata,
    Column("saga_id", Uuid, ForeignKey("sagas.id", ondelete="CASCADE"), nullable=False),
    Column("step", String(64), nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", String(64)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("compensated_at", DateTime(timezone=True)),
    #: How many times the step ran: retries before its outcome, redeliveries after it.
    Column("attempts", Integer, nullable=False, server_default="1"),
    PrimaryKeyConstraint("saga_id", "step"),
    CheckConstraint(
        "status IN ('APPLIED', 'REFUSED', 'ABORTED', 'COMPENSATED')", name="known_status"
    ),
    CheckConstraint(
        "(status = 'COMPENSATED') = (compensated_at IS NOT NULL)", name="compensated_has_time"
    ),
)

#: Sagas accepted, or moved on to their next stage, whose running stage is not yet
#: handed to the broker. Who dispatches (the API, the completion that advanced the saga)
#: deletes the row right after; the relay dispatches whatever is left (broker down, a
#: process crashed).
outbox = Table(
    "outbox",
    metadata,
    Column("saga_id", Uuid, ForeignKey("sagas.id", ondelete="CASCADE"), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_outbox_created_at", "created_at"),
)
