"""The outbox's tables: the one source of truth for its schema (migrations compare against it)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

metadata = sa.MetaData()
"""The outbox's own tables; only the migration environment combines them with the others."""


SLOT_COUNT = 64
"""Messages are spread over this many slots by key; a slot is leased to one relay at a time.

Fixed, because a key must always land in the same slot: changing it would let two relays hold one key.
Migration 0003 creates exactly these slot rows.
"""

_PENDING = "published_at IS NULL AND dead_at IS NULL"

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("log_xid", sa.BigInteger, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("published_by", sa.Text, nullable=True),
    sa.Column("dead_at", sa.DateTime(timezone=True), nullable=True),
    sa.UniqueConstraint("position", "topic", name="outbox_position_topic_key"),
    sa.CheckConstraint(f"slot >= 0 AND slot < {SLOT_COUNT}", name="outbox_slot_range"),
    sa.CheckConstraint("attempts >= 0", name="outbox_attempts_positive"),
    sa.Index("outbox_pending_idx", "log_xid", "position", "id", postgresql_where=sa.text(_PENDING)),
    sa.Index(
        "outbox_backoff_idx",
        "slot",
        "key",
        "log_xid",
        "position",
        "id",
        postgresql_where=sa.text(f"{_PENDING} AND next_attempt_at IS NOT NULL"),
    ),
    sa.Index("outbox_published_idx", "published_at", postgresql_where=sa.text("published_at IS NOT NULL")),
    sa.Index("outbox_dead_idx", "id", postgresql_where=sa.text("dead_at IS NOT NULL")),
    comment=(
        "Messages to publish: one per (event, route), written by a trigger in the events' own transaction; "
        "the payload stays in events (joined by position)."
    ),
)

outbox_routes = sa.Table(
    "outbox_routes",
    metadata,
    sa.Column("route", sa.Integer, primary_key=True),
    sa.Column("topic", sa.Text, nullable=False),
    sa.Column("event_types", ARRAY(sa.Text), nullable=True),
    sa.Column("category", sa.Text, nullable=True),
    sa.Column("tag", sa.Text, nullable=True),
    sa.Column("key_path", ARRAY(sa.Text), nullable=True),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("declared_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    sa.CheckConstraint("key_path IS NULL OR key_path[1] IN ('data', 'metadata')", name="outbox_routes_key_path"),
    comment=(
        "The declared routes: every insert into events, from any process, writes an outbox row for each "
        "route it matches (trigger events_outbox)."
    ),
)

outbox_slots = sa.Table(
    "outbox_slots",
    metadata,
    sa.Column("slot", sa.Integer, primary_key=True),
    sa.Column("owner", sa.Text, nullable=True),
    sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
    comment="Which relay may publish each slot's messages, and until when.",
)

outbox_relays = sa.Table(
    "outbox_relays",
    metadata,
    sa.Column("relay_id", sa.Text, primary_key=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    comment="Running relays, by heartbeat: each takes a fair share of the slots.",
)

inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("consumer", sa.Text, primary_key=True),
    sa.Column("message_id", sa.Text, primary_key=True),
    sa.Column("handled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    sa.Index("inbox_handled_idx", "handled_at"),
    comment="Message ids a consumer has handled, recorded in the transaction of its effect.",
)
