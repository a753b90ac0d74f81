"""batch runs are swept: resumed when they stop moving, or failed with a reason

A run keeps the chunk size it was cut with and the first customer of each chunk (a
resume publishes the same customers in each chunk), how often the sweep resumed it and
when, and why the sweep gave up on it (state FAILED).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batch_runs", sa.Column("chunk_size", sa.Integer()))
    op.add_column("batch_runs", sa.Column("chunk_starts", postgresql.JSONB()))
    op.add_column(
        "batch_runs", sa.Column("resumes", sa.Integer(), nullable=False, server_default="0")
    )
    op.add_column("batch_runs", sa.Column("resumed_at", sa.DateTime(timezone=True)))
    op.add_column("batch_runs", sa.Column("reason", sa.Text()))
    _states("'PUBLISHING', 'RUNNING', 'FINISHED', 'FAILED'")


def downgrade() -> None:
    op.execute("UPDATE batch_runs SET state = 'FINISHED' WHERE state = 'FAILED'")
    _states("'PUBLISHING', 'RUNNING', 'FINISHED'")
    for column in ("reason", "resumed_at", "resumes", "chunk_starts", "chunk_size"):
        op.drop_column("batch_runs", column)


def _states(states: str) -> None:
    op.drop_constraint("ck_batch_runs_known_state", "batch_runs", type_="check")
    op.create_check_constraint(
        op.f("ck_batch_runs_known_state"), "batch_runs", f"state IN ({states})"
    )
