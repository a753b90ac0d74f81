"""batch runs commit before their chunks are published

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("ck_batch_runs_known_state", "batch_runs", type_="check")
    op.create_check_constraint(
        op.f("ck_batch_runs_known_state"),
        "batch_runs",
        "state IN ('PUBLISHING', 'RUNNING', 'FINISHED')",
    )


def downgrade() -> None:
    op.execute("UPDATE batch_runs SET state = 'RUNNING' WHERE state = 'PUBLISHING'")
    op.drop_constraint("ck_batch_runs_known_state", "batch_runs", type_="check")
    op.create_check_constraint(
        op.f("ck_batch_runs_known_state"), "batch_runs", "state IN ('RUNNING', 'FINISHED')"
    )
