"""The order domain's tables (SQLAlchemy Core). Invariants live here as constraints."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from config.database import NAMING_CONVENTION

metadata = MetaData(naming_convention=NAMING_CONVENTION)

Money = Numeric(14, 2)
#: Sums of many amounts (a read model's running totals).
Total = Numeric(38, 2)

customers = Table(
    "customers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("credit_limit", Money, nullable=False),
    Column("credit_used", Money, nullable=False, server_default="0"),
    Column("credit_reserved", Money, nullable=False, server_default="0"),
    #: Bumped by every change of the three figures: the credit cache keeps the newest.
    Column("credit_version", BigInteger, nullable=False, server_default="0"),
    CheckConstraint("credit_limit >= 0", name="limit_not_negative"),
    CheckConstraint("credit_used >= 0", name="used_not_negative"),
    CheckConstraint("credit_reserved >= 0", name="reserved_not_negative"),
    # No CHECK of used + reserved against the limit: a limit may be lowered below what a
    # customer already uses (the batch credit review flags them). That no reservation
    # passes the limit is decided by the conditional UPDATE in orders.credit.
)

products = Table(
    "products",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("unit_price", Numeric(12, 2), nullable=False),
    Column("on_hand", Integer, nullable=False),
    Column("reserved", Integer, nullable=False, server_default="0"),
    CheckConstraint("unit_price >= 0", name="price_not_negative"),
    CheckConstraint("on_hand >= 0", name="on_hand_not_negative"),
    CheckConstraint("reserved >= 0", name="reserved_not_negative"),
    CheckConstraint("reserved <= on_hand", name="reserved_within_on_hand"),
)

orders = Table(
    "orders",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("customer_id", String(64), ForeignKey("customers.id"), nullable=False),
    Column("saga_id", Uuid, nullable=False, unique=True),
    Column("status", String(20), nullable=False),
    Column("total", Money, nullable=False),
    Column("cancel_reason", String(64)),
    #: What went wrong, while the order is COMPENSATION_FAILED.
    Column("problem", Text),
    #: The sequence number of the order's last event.
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    #: When the order was confirmed (the credit review tells with it whether an order
    #: refunded since its checkpoint was inside the checkpoint's sum).
    Column("confirmed_at", DateTime(timezone=True)),
    #: The refund saga under way or done (REFUNDED); None when none was asked for, or
    #: the last one failed (a new refund may then be asked for).
    Column("refund_saga_id", Uuid),
    CheckConstraint(
        "status IN ('PENDING', 'CONFIRMED', 'CANCELLED', 'COMPENSATION_FAILED', 'REFUNDED')",
        name="known_status",
    ),
    CheckConstraint("total >= 0", name="total_not_negative"),
    CheckConstraint("version >= 1", name="version_positive"),
    Index("ix_orders_customer_created", "customer_id", "created_at"),
    #: Orders by when they last changed: the events integrity check's recent window.
    Index("ix_orders_updated", "updated_at", "id"),
    #: A customer's orders by when they last changed: the credit review's orders since
    #: its checkpoint.
    Index("ix_orders_customer_updated", "customer_id", "updated_at"),
    #: Orders still in flight, by customer (a small part of all orders).
    Index(
        "ix_orders_active_customer",
        "customer_id",
        postgresql_where=text("status IN ('PENDING', 'COMPENSATION_FAILED')"),
    ),
    #: A refund saga refunds one order.
    Index(
        "uq_orders_refund_saga_id",
        "refund_saga_id",
        unique=True,
        postgresql_where=text("refund_saga_id IS NOT NULL"),
    ),
)

order_lines = Table(
    "order_lines",
    metadata,
    Column("order_id", Uuid, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("line_no", Integer, nullable=False),
    Column("product_id", String(64), ForeignKey("products.id"), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price", Numeric(12, 2), nullable=False),
    PrimaryKeyConstraint("order_id", "line_no"),
    CheckConstraint("quantity > 0", name="quantity_positive"),
    CheckConstraint("unit_price >= 0", name="price_not_negative"),
)

#: The order events, partitioned by the month their order was placed in (migration
#: 0016): an old month goes whole (workers.partitions), and a unique key must hold the
#: partition key, which ``placed_at``, fixed per order, does without weakening it.
order_events = Table(
    "order_events",
    metadata,
    #: The order appends happened in, across orders: the consumers' feed.
    Column("id", BigInteger, Identity(), nullable=False),
    Column("order_id", Uuid, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    #: 1, 2, 3... per order, with no gap: the primary key refuses a duplicate.
    Column("seq", Integer, nullable=False),
    Column("type", String(64), nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("occurred_at", DateTime(timezone=True), nullable=False),
    #: The order's ``created_at``, copied by every append: the partition key.
    Column("placed_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("order_id", "seq", "placed_at"),
    UniqueConstraint("id", "placed_at"),
    CheckConstraint("seq >= 1", name="seq_positive"),
    postgresql_partition_by="RANGE (placed_at)",
)

#: Where a retention scan stopped (workers.retention): the next run goes on from there.
retention_cursors = Table(
    "retention_cursors",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("last_id", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("client", String(64), nullable=False),
    Column("key", String(255), nullable=False),
    #: sha256 of the canonical request body: the same key with another body is refused.
    Column("fingerprint", String(64), nullable=False),
    Column("order_id", Uuid, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("client", "key"),
    # The key is claimed before the order row is written, in the same transaction.
    ForeignKeyConstraint(
        ["order_id"], ["orders.id"], ondelete="CASCADE", deferrable=True, initially="DEFERRED"
    ),
    #: Keys by age: the retention job removes the expired ones (workers.retention).
    Index("ix_idempotency_keys_created_at", "created_at"),
)

#: The answers to cancel and refund requests that carried an Idempotency-Key: a retry
#: with the same key gets the same answer.
order_action_keys = Table(
    "order_action_keys",
    metadata,
    Column("client", String(64), nullable=False),
    Column("key", String(255), nullable=False),
    #: sha256 of the action and the order: the same key for another request is refused.
    Column("fingerprint", String(64), nullable=False),
    Column("order_id", Uuid, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("answer", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("client", "key"),
    Index("ix_order_action_keys_created_at", "created_at"),
)

#: Each customer's latest credit review (the batch credit check): the figures it saw,
#: and the flags it raised.
credit_reviews = Table(
    "credit_reviews",
    metadata,
    Column(
        "customer_id", String(64), ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("run_id", Uuid, nullable=False),
    Column("credit_limit", Money, nullable=False),
    Column("credit_used", Money, nullable=False),
    Column("credit_reserved", Money, nullable=False),
    Column("available", Money, nullable=False),
    #: Used and reserved together pass the limit.
    Column("over_limit", Boolean, nullable=False),
    #: The figures disagree with the orders (why, in ``findings``).
    Column("inconsistent", Boolean, nullable=False),
    Column("findings", JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    Column("reviewed_at", DateTime(timezone=True), nullable=False),
    #: The checkpoint of the customer's confirmed orders: the sum of those last changed
    #: before ``checkpoint_at`` (the next review adds the ones changed since). None: the
    #: next review sums every order (first review, or a full one was asked for).
    Column("checkpoint_at", DateTime(timezone=True)),
    Column("checkpoint_total", Total),
    Index(
        "ix_credit_reviews_flagged",
        "customer_id",
        postgresql_where=text("over_limit OR inconsistent"),
    ),
)

#: Where each consumer is in the feed (the global event id it has read up to).
consumer_checkpoints = Table(
    "consumer_checkpoints",
    metadata,
    Column("consumer", String(64), primary_key=True),
    Column("last_id", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: The last event each consumer applied, per order: written with the consumer's effect.
consumer_positions = Table(
    "consumer_positions",
    metadata,
    Column("consumer", String(64), nullable=False),
    Column("order_id", Uuid, ForeignKey("orders.id", ondelete="CASCADE"), nullable=False),
    Column("last_seq", Integer, nullable=False),
    PrimaryKeyConstraint("consumer", "order_id"),
)

#: Where each consumer's integrity check is (orders.events.repair): the pass over recently
#: changed orders under way, the last one finished, and the slow sweep of all orders.
consumer_checks = Table(
    "consumer_checks",
    metadata,
    Column("consumer", String(64), primary_key=True),
    #: The end of the last finished pass: the next one starts a margin before it.
    Column("checked_until", DateTime(timezone=True)),
    #: The end of the pass under way (None: none is).
    Column("pass_until", DateTime(timezone=True)),
    #: The last order the pass under way looked at, by (updated_at, id).
    Column("cursor_at", DateTime(timezone=True)),
    Column("cursor_id", Uuid),
    #: The last order the sweep looked at, by id (None: it starts over).
    Column("swept_after", Uuid),
    #: When the sweep last went round every order.
    Column("swept_at", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

#: A read model kept by a consumer of the events: each customer's orders at a glance.
customer_order_summaries = Table(
    "customer_order_summaries",
    metadata,
    Column(
        "customer_id", String(64), ForeignKey("customers.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("orders_placed", Integer, nullable=False, server_default="0"),
    Column("orders_confirmed", Integer, nullable=False, server_default="0"),
    Column("orders_cancelled", Integer, nullable=False, server_default="0"),
    Column("placed_total", Total, nullable=False, server_default="0"),
    Column("confirmed_total", Total, nullable=False, server_default="0"),
    Column("last_order_at", DateTime(timezone=True)),
    #: Confirmed orders refunded since (they stay counted as confirmed too).
    Column("orders_refunded", Integer, nullable=False, server_default="0"),
    Column("refunded_total", Total, nullable=False, server_default="0"),
)

#: The API's keys: each names a client, its role and the customers it may act for. Only
#: a digest of the secret is kept; the key itself is shown once, when it is made.
api_keys = Table(
    "api_keys",
    metadata,
    #: The key's public id: the part of the key before its secret.
    Column("id", String(32), primary_key=True),
    Column("name", String(100), nullable=False),
    #: client: the order endpoints; operator: also /admin and /batches.
    Column("role", String(16), nullable=False),
    #: The customers it may act for; NULL: every customer (a trusted back end).
    Column("customers", ARRAY(String(64))),
    #: sha256 of the whole key, hex.
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=text("now()")),
    Column("revoked_at", DateTime(timezone=True)),
    CheckConstraint("role IN ('client', 'operator')", name="role"),
    #: An operator's endpoints span every customer: so does an operator's key.
    CheckConstraint("role = 'client' OR customers IS NULL", name="operator_every_customer"),
)

#: Where a client (an API key) wants the final states of its orders POSTed (orders.webhooks).
#: The secret signs each delivery (HMAC keys must be kept to sign with); after a
#: rotation the previous one still signs, as a second signature, until it expires.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False),
    Column("url", Text, nullable=False),
    #: "whsec_" and the base64 of the key (Standard Webhooks).
    Column("secret", String(100), nullable=False),
    Column("previous_secret", String(100)),
    Column("previous_expires_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    #: Deleted by its client: nothing more is sent to it; its log is kept.
    Column("disabled_at", DateTime(timezone=True)),
    Index(
        "ix_webhook_endpoints_active_key", "key_id", postgresql_where=text("disabled_at IS NULL")
    ),
)

#: One event for one endpoint: the outbox the delivery lane sends from, at least once.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column(
        "endpoint_id",
        Uuid,
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
        nullable=False,
    ),
    #: Stable across attempts and replays (the order and its event's seq): the receiver
    #: deduplicates on it (header webhook-id).
    Column("event_id", String(64), nullable=False),
    Column("order_id", Uuid, nullable=False),
    Column("event_type", String(64), nullable=False),
    #: The JSON body sent.
    Column("payload", JSONB, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    #: When the next attempt is due (PENDING); while one is under way, when its lease ends.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_status", Integer),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    #: When it was last handed back after it died (its dead letter is resolved once sent).
    Column("replayed_at", DateTime(timezone=True)),
    #: One delivery per event and endpoint: a fan-out applied twice adds nothing.
    UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
    CheckConstraint("state IN ('PENDING', 'DELIVERED', 'DEAD')", name="known_state"),
    CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    Index(
        "ix_webhook_deliveries_due",
        "next_attempt_at",
        postgresql_where=text("state = 'PENDING'"),
    ),
    Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
)

#: Every attempt of a delivery: when, what the receiver answered (or why nothing), how long.
webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    Column(
        "delivery_id",
        Uuid,
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("attempted_at", DateTime(timezone=True), nullable=False),
    Column("status_code", Integer),
    Column("error", Text),
    Column("duration_ms", Integer, nullable=False),
    Index("ix_webhook_attempts_delivery", "delivery_id", "id"),
)
