"""indexes for the retention job

The retention job (workers.retention) removes what is finished and old, a batch at a
time; each batch finds its rows through one of these indexes, so a run costs what it
removes, not the size of the table. The partial ones hold only finished rows.

Built CONCURRENTLY (outside the migration's transaction): on a table of millions of
rows, writes go on while the index is built.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

#: (name, table, column, predicate of a partial index or None)
INDEXES = (
    ("ix_sagas_finished", "sagas", "finished_at", "state IN ('CONFIRMED', 'CANCELLED')"),
    ("ix_idempotency_keys_created_at", "idempotency_keys", "created_at", None),
    ("ix_dead_letters_purged", "dead_letters", "resolved_at", "state = 'PURGED'"),
    ("ix_batch_runs_finished", "batch_runs", "finished_at", "state IN ('FINISHED', 'FAILED')"),
)


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, table, column, where in INDEXES:
            predicate = f" WHERE {where}" if where else ""
            op.execute(
                f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({column}){predicate}"
            )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, _table, _column, _where in INDEXES:
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
