"""Outbox: messages to publish, slot leases, relay heartbeats; the consumers' inbox.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = ("outbox",)
depends_on: str | Sequence[str] | None = None

# outbox.schema.SLOT_COUNT when this revision was written; a key's slot must never change.
SLOT_COUNT = 64
PENDING = "published_at IS NULL AND dead_at IS NULL"


def upgrade() -> None:
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("stream_version", sa.BigInteger(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("correlation_id", sa.Text(), nullable=True),
        sa.Column("causation_id", sa.Text(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published_by", sa.Text(), nullable=True),
        sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(f"slot >= 0 AND slot < {SLOT_COUNT}", name="outbox_slot_range"),
        sa.CheckConstraint("attempts >= 0", name="outbox_attempts_positive"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id", "topic", name="outbox_event_topic_key"),
        comment="Messages to publish, written in the transaction of the events that cause them.",
    )
    op.create_index("outbox_pending_idx", "outbox", ["id"], postgresql_where=sa.text(PENDING))
    op.create_index(
        "outbox_backoff_idx",
        "outbox",
        ["slot", "key", "id"],
        postgresql_where=sa.text(f"{PENDING} AND next_attempt_at IS NOT NULL"),
    )
    op.create_index(
        "outbox_published_idx", "outbox", ["published_at"], postgresql_where=sa.text("published_at IS NOT NULL")
    )
    op.create_index("outbox_dead_idx", "outbox", ["id"], postgresql_where=sa.text("dead_at IS NOT NULL"))
    op.create_table(
        "outbox_slots",
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("slot"),
        comment="Which relay may publish each slot's messages, and until when.",
    )
    op.execute(f"INSERT INTO outbox_slots (slot) SELECT generate_series(0, {SLOT_COUNT - 1})")
    op.create_table(
        "outbox_relays",
        sa.Column("relay_id", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("relay_id"),
        comment="Running relays, by heartbeat: each takes a fair share of the slots.",
    )
    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("handled_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id"),
        comment="Message ids a consumer has handled, recorded in the transaction of its effect.",
    )
    op.create_index("inbox_handled_idx", "inbox", ["handled_at"])


def downgrade() -> None:
    op.drop_index("inbox_handled_idx", table_name="inbox")
    op.drop_table("inbox")
    op.drop_table("outbox_relays")
    op.drop_table("outbox_slots")
    op.drop_index("outbox_dead_idx", table_name="outbox")
    op.drop_index("outbox_published_idx", table_name="outbox")
    op.drop_index("outbox_backoff_idx", table_name="outbox")
    op.drop_index("outbox_pending_idx", table_name="outbox")
    op.drop_table("outbox")
