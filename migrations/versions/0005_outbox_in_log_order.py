"""Outbox: routes declared in the database and applied by a trigger; messages in log order.

Every insert into events writes the messages of the declared routes (`outbox_routes`) in its own
transaction, whichever process makes it. Messages carry their event's place in the log (log_xid,
position) instead of a copy of its payload, which the relay reads from the event itself.

Revision ID: 0005
Revises: 0003
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from outbox import sql

revision: str = "0005"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = "0004"

PENDING = "published_at IS NULL AND dead_at IS NULL"
_PAYLOAD = ("event_type", "stream_id", "stream_version", "data", "correlation_id", "causation_id")


def upgrade() -> None:
    op.add_column("outbox", sa.Column("log_xid", sa.BigInteger(), nullable=True))
    op.add_column("outbox", sa.Column("position", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE outbox AS o SET log_xid = e.log_xid, position = e.position FROM events AS e"
        " WHERE e.event_id = o.event_id"
    )
    op.alter_column("outbox", "log_xid", nullable=False)
    op.alter_column("outbox", "position", nullable=False)
    op.drop_constraint("outbox_event_topic_key", "outbox", type_="unique")
    op.create_unique_constraint("outbox_position_topic_key", "outbox", ["position", "topic"])
    for column in ("event_id", *_PAYLOAD):
        op.drop_column("outbox", column)
    op.drop_index("outbox_pending_idx", table_name="outbox")
    op.create_index("outbox_pending_idx", "outbox", ["log_xid", "position", "id"], postgresql_where=sa.text(PENDING))
    op.drop_index("outbox_backoff_idx", table_name="outbox")
    op.create_index(
        "outbox_backoff_idx",
        "outbox",
        ["slot", "key", "log_xid", "position", "id"],
        postgresql_where=sa.text(f"{PENDING} AND next_attempt_at IS NOT NULL"),
    )
    op.create_table_comment(
        "outbox",
        "Messages to publish: one per (event, route), written by a trigger in the events' own transaction; "
        "the payload stays in events (joined by position).",
    )
    op.create_table(
        "outbox_routes",
        sa.Column("route", sa.Integer(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("event_types", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("category", sa.Text(), nullable=True),
        sa.Column("key_path", postgresql.ARRAY(sa.Text()), nullable=True),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("declared_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("key_path IS NULL OR key_path[1] IN ('data', 'metadata')", name="outbox_routes_key_path"),
        sa.PrimaryKeyConstraint("route"),
        comment=(
            "The declared routes: every insert into events, from any process, writes an outbox row for each "
            "route it matches (trigger events_outbox)."
        ),
    )
    for statement in sql.WRITE_FUNCTION_V1:
        op.execute(statement)


def downgrade() -> None:
    for statement in sql.DROP_WRITE_FUNCTION_V1:
        op.execute(statement)
    op.drop_table("outbox_routes")
    op.create_table_comment("outbox", "Messages to publish, written in the transaction of the events that cause them.")
    op.add_column("outbox", sa.Column("event_id", sa.Uuid(), nullable=True))
    op.add_column("outbox", sa.Column("event_type", sa.Text(), nullable=True))
    op.add_column("outbox", sa.Column("stream_id", sa.Text(), nullable=True))
    op.add_column("outbox", sa.Column("stream_version", sa.BigInteger(), nullable=True))
    op.add_column("outbox", sa.Column("data", sa.Text(), nullable=True))
    op.add_column("outbox", sa.Column("correlation_id", sa.Text(), nullable=True))
    op.add_column("outbox", sa.Column("causation_id", sa.Text(), nullable=True))
    op.execute(
        "UPDATE outbox AS o SET event_id = e.event_id, event_type = e.event_type, stream_id = e.stream_id,"
        " stream_version = e.stream_version, data = e.data::text,"
        " correlation_id = e.metadata ->> 'correlation_id', causation_id = e.metadata ->> 'causation_id'"
        " FROM events AS e WHERE e.position = o.position"
    )
    for column in ("event_id", "event_type", "stream_id", "stream_version", "data"):
        op.alter_column("outbox", column, nullable=False)
    op.drop_index("outbox_backoff_idx", table_name="outbox")
    op.create_index(
        "outbox_backoff_idx",
        "outbox",
        ["slot", "key", "id"],
        postgresql_where=sa.text(f"{PENDING} AND next_attempt_at IS NOT NULL"),
    )
    op.drop_index("outbox_pending_idx", table_name="outbox")
    op.create_index("outbox_pending_idx", "outbox", ["id"], postgresql_where=sa.text(PENDING))
    op.drop_constraint("outbox_position_topic_key", "outbox", type_="unique")
    op.create_unique_constraint("outbox_event_topic_key", "outbox", ["event_id", "topic"])
    op.drop_column("outbox", "position")
    op.drop_column("outbox", "log_xid")
