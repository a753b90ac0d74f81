"""saga versions and stages

- ``sagas.version``: the definition version a saga started on (it runs to its end on
  it). Rows written before this revision, or by code that predates it during a rolling
  deploy, read as version 1 (the server default).
- ``sagas.stage``: the index of the stage running now; 0 by default, which is where
  every saga written before this revision stands (they have one stage).

Both columns are NOT NULL with a constant default: PostgreSQL adds them without
rewriting the table.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sagas", sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
    op.add_column("sagas", sa.Column("stage", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("sagas", "stage")
    op.drop_column("sagas", "version")
