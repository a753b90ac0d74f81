"""webhooks: clients' endpoints, the deliveries' outbox and every attempt

A client (an API key) registers endpoints; each final state of its orders becomes one
delivery per endpoint (unique per endpoint and event), sent from the outbox by the
webhooks lane and logged attempt by attempt. A delivery that used up its attempts is a
dead letter of the new kind ``webhook_dead``.

The fan-out is a new event consumer (``webhooks``): it starts at the head of the feed,
not at its first event, so that a deployment's history is not read again for it.

Revision ID: 0018
Revises: 0017
Create Date: 2026-11-30
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

KIND = "webhook_dead"
CONSUMER = "webhooks"


def upgrade() -> None:
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("secret", sa.String(100), nullable=False),
        sa.Column("previous_secret", sa.String(100)),
        sa.Column("previous_expires_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True)),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
            name=op.f("fk_webhook_endpoints_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_endpoints")),
    )
    op.create_index(
        "ix_webhook_endpoints_active_key",
        "webhook_endpoints",
        ["key_id"],
        postgresql_where=sa.text("disabled_at IS NULL"),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("endpoint_id", sa.Uuid(), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=False),
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_status", sa.Integer()),
        sa.Column("last_error", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.Column("replayed_at", sa.DateTime(timezone=True)),
        sa.ForeignKeyConstraint(
            ["endpoint_id"],
            ["webhook_endpoints.id"],
            name=op.f("fk_webhook_deliveries_endpoint_id_webhook_endpoints"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint(
            "endpoint_id", "event_id", name=op.f("uq_webhook_deliveries_endpoint_event")
        ),
        sa.CheckConstraint(
            "state IN ('PENDING', 'DELIVERED', 'DEAD')",
            name=op.f("ck_webhook_deliveries_known_state"),
        ),
        sa.CheckConstraint(
            "attempts >= 0", name=op.f("ck_webhook_deliveries_attempts_not_negative")
        ),
    )
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'PENDING'"),
    )
    op.create_index(
        "ix_webhook_deliveries_endpoint_created",
        "webhook_deliveries",
        ["endpoint_id", "created_at"],
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("delivery_id", sa.Uuid(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("error", sa.Text()),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_id_webhook_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    op.create_index(
        "ix_webhook_attempts_delivery", "webhook_attempts", ["delivery_id", "id"]
    )
    # The kinds a dead letter may be, whatever the migrations before this one admitted.
    _kinds(_current_kinds() | {KIND})
    op.execute(
        "INSERT INTO consumer_checkpoints (consumer, last_id, updated_at)"
        f" SELECT '{CONSUMER}', coalesce(max(id), 0), now() FROM order_events"
        " ON CONFLICT (consumer) DO NOTHING"
    )


def downgrade() -> None:
    op.execute(f"DELETE FROM consumer_positions WHERE consumer = '{CONSUMER}'")
    op.execute(f"DELETE FROM consumer_checkpoints WHERE consumer = '{CONSUMER}'")
    op.execute(f"DELETE FROM consumer_checks WHERE consumer = '{CONSUMER}'")
    op.execute(f"DELETE FROM dead_letters WHERE kind = '{KIND}'")
    _kinds(_current_kinds() - {KIND})
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")


def _current_kinds() -> set[str]:
    definition = (
        op.get_bind()
        .execute(
            sa.text(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conname = 'ck_dead_letters_known_kind'"
            )
        )
        .scalar_one()
    )
    return set(re.findall(r"'([a-z_]+)'", definition))


def _kinds(kinds: set[str]) -> None:
    listed = ", ".join(f"'{kind}'" for kind in sorted(kinds))
    op.drop_constraint("ck_dead_letters_known_kind", "dead_letters", type_="check")
    op.create_check_constraint(
        op.f("ck_dead_letters_known_kind"), "dead_letters", f"kind IN ({listed})"
    )
