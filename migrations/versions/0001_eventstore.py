"""Event store: streams, events (append-only), snapshots, the append function.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from eventstore import sql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("eventstore",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "streams",
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("stream_id"),
        comment="Current version per stream: the row the optimistic concurrency check locks.",
    )
    op.create_table(
        "events",
        sa.Column("position", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column(
            "transaction_id",
            sa.BigInteger(),
            server_default=sa.text("(pg_current_xact_id())::text::bigint"),
            nullable=False,
        ),
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("stream_version", sa.BigInteger(), nullable=False),
        sa.Column(
            "category",
            sa.Text(),
            sa.Computed("split_part(stream_id, '-'::text, 1)", persisted=True),
            nullable=False,
        ),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.Column("metadata", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("char_length(stream_id) BETWEEN 1 AND 255", name="events_stream_id_length"),
        sa.CheckConstraint("char_length(event_type) BETWEEN 1 AND 255", name="events_event_type_length"),
        sa.CheckConstraint("stream_version >= 0", name="events_stream_version_positive"),
        sa.PrimaryKeyConstraint("position"),
        sa.UniqueConstraint("event_id", name="events_event_id_key"),
        sa.UniqueConstraint("stream_id", "stream_version", name="events_stream_version_key"),
        comment="Append-only log of every event; UPDATE, DELETE and TRUNCATE are rejected by triggers.",
    )
    op.create_index("events_log_idx", "events", ["transaction_id", "position"])
    op.create_index("events_category_log_idx", "events", ["category", "transaction_id", "position"])
    op.create_table(
        "snapshots",
        sa.Column("stream_id", sa.Text(), nullable=False),
        sa.Column("snapshot_type", sa.Text(), nullable=False),
        sa.Column("schema_version", sa.Text(), nullable=False),
        sa.Column("stream_version", sa.BigInteger(), nullable=False),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("stream_id"),
        comment="Latest snapshot per stream; a snapshot is a cache, never the truth.",
    )
    op.execute(sql.DUPLICATES_FUNCTION_V1)
    op.execute(sql.APPEND_FUNCTION_V1)
    for statement in sql.APPEND_ONLY_TRIGGERS_V1:
        op.execute(statement)


def downgrade() -> None:
    for statement in sql.DROP_FUNCTIONS_V1:
        op.execute(statement)
    op.drop_table("snapshots")
    op.drop_index("events_category_log_idx", table_name="events")
    op.drop_index("events_log_idx", table_name="events")
    op.drop_table("events")
    op.drop_table("streams")
