"""dead letters of messages no task ran: their kinds

A worker keeps every message it cannot run as a dead letter of a kind that says why
(workers.dlq lists them), and a compensation that failed too often becomes one too;
the constraint on the kind admits the new ones.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

BEFORE = "'exhausted', 'failed', 'undecodable', 'unknown_task', 'poison'"
AFTER = (
    f"{BEFORE}, 'not_an_envelope', 'refused_content_type', 'too_large', 'malformed_body',"
    " 'malformed_headers', 'bad_arguments', 'unprocessable', 'compensation_failed'"
)


def upgrade() -> None:
    _kinds(AFTER)


def downgrade() -> None:
    # The letters of the new kinds were of none of the old ones: they are dropped.
    op.execute(f"DELETE FROM dead_letters WHERE kind NOT IN ({BEFORE})")
    _kinds(BEFORE)


def _kinds(kinds: str) -> None:
    op.drop_constraint("ck_dead_letters_known_kind", "dead_letters", type_="check")
    op.create_check_constraint(
        op.f("ck_dead_letters_known_kind"), "dead_letters", f"kind IN ({kinds})"
    )
