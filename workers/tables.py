"""The workers' tables: dead letters, batch runs."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
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
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

from config.database import NAMING_CONVENTION

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: Messages that could not be processed, kept for an operator to see, replay or purge.
dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    #: The message's task id: a message that dies again updates its letter.
    Column("task_id", String(255), nullable=False, unique=True),
    Column("task_name", String(255), nullable=False),
    #: Why: exhausted (retries used up), failed (not a transient error), poison (kept
    #: crashing its worker), or a message no task ran (undecodable, not_an_envelope,
    #: refused_content_type, too_large, malformed_body, malformed_headers, unknown_task,
    #: bad_arguments, unprocessable), or a webhook delivery that used up its attempts
    #: (webhook_dead); workers.dlq says what each means.
    Column("kind", String(32), nullable=False),
    Column("args", JSONB),
    Column("kwargs", JSONB),
    #: The message as it lay on its queue, when no task ran it.
    Column("raw", Text),
    Column("queue", String(255)),
    Column("error", Text, nullable=False),
    Column("traceback", Text),
    Column("attempts", Integer, nullable=False, server_default="1"),
    Column("first_failed_at", DateTime(timezone=True), nullable=False),
    Column("last_failed_at", DateTime(timezone=True), nullable=False),
    Column("state", String(16), nullable=False, server_default=text("'OPEN'")),
    Column("replayed_task_id", String(255)),
    Column("resolved_at", DateTime(timezone=True)),
    CheckConstraint("state IN ('OPEN', 'REPLAYED', 'PURGED')", name="known_state"),
    CheckConstraint(
        "kind IN ('exhausted', 'failed', 'undecodable', 'unknown_task', 'poison',"
        " 'not_an_envelope', 'refused_content_type', 'too_large', 'malformed_body',"
        " 'malformed_headers', 'bad_arguments', 'unprocessable', 'compensation_failed',"
        " 'webhook_dead')",
        name="known_kind",
    ),
    Index(
        "ix_dead_letters_open",
        "task_name",
        "last_failed_at",
        postgresql_where=text("state = 'OPEN'"),
    ),
    #: Purged letters by age: the retention job removes the old ones (workers.retention).
    Index("ix_dead_letters_purged", "resolved_at", postgresql_where=text("state = 'PURGED'")),
)

#: A run of a batch job (the credit check): its window, its size, its progress.
batch_runs = Table(
    "batch_runs",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("job", String(64), nullable=False),
    #: The schedule tick the run belongs to: two beats starting one tick make one run.
    Column("window_key", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("total", Integer, nullable=False),
    Column("chunks", Integer, nullable=False),
    Column("processed", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("flagged", Integer, nullable=False, server_default="0"),
    Column("chunks_done", Integer, nullable=False, server_default="0"),
    Column("chunks_failed", Integer, nullable=False, server_default="0"),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    #: Customers per chunk when the run was cut, and the first customer id of each chunk:
    #: a resume publishes each chunk with the customers it was cut with.
    Column("chunk_size", Integer),
    Column("chunk_starts", JSONB),
    #: How often the batch sweep published the run's missing chunks again, and when last.
    Column("resumes", Integer, nullable=False, server_default="0"),
    Column("resumed_at", DateTime(timezone=True)),
    #: Why the sweep gave up on the run (state FAILED).
    Column("reason", Text),
    UniqueConstraint("job", "window_key", name="uq_batch_runs_job_window"),
    CheckConstraint("state IN ('PUBLISHING', 'RUNNING', 'FINISHED', 'FAILED')", name="known_state"),
    #: Ended runs by age: the retention job removes the old ones (workers.retention).
    Index(
        "ix_batch_runs_finished",
        "finished_at",
        postgresql_where=text("state IN ('FINISHED', 'FAILED')"),
    ),
)

#: One row per finished chunk of a run: a redelivered chunk counts once.
batch_chunks = Table(
    "batch_chunks",
    metadata,
    Column("run_id", Uuid, ForeignKey("batch_runs.id", ondelete="CASCADE"), nullable=False),
    Column("chunk", Integer, nullable=False),
    Column("size", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("run_id", "chunk"),
    CheckConstraint("state IN ('DONE', 'FAILED')", name="known_state"),
)
