"""The event store's tables: the one source of truth for its schema (migrations compare against it).

Each component owns a MetaData of its own; only the migration environment combines them.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from eventstore.sql import CATEGORY, MAX_STREAM_ID_LENGTH

MAX_EVENT_TYPE_LENGTH = 255

metadata = sa.MetaData()

streams = sa.Table(
    "streams",
    metadata,
    sa.Column("stream_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("log_xid", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("tombstoned_at", sa.DateTime(timezone=True), nullable=True),
    comment=(
        "Current version per stream: the row the optimistic concurrency check locks, and the log "
        "transaction id of the stream's last event, below which its next event may not go."
    ),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("position", sa.BigInteger, sa.Identity(always=False), primary_key=True),
    sa.Column("log_xid", sa.BigInteger, nullable=False),
    sa.Column("stream_id", sa.Text, nullable=False),
    sa.Column("stream_version", sa.BigInteger, nullable=False),
    sa.Column(
        "category",
        sa.Text,
        sa.Computed(CATEGORY, persisted=True),
        nullable=False,
    ),
    sa.Column("event_id", sa.Uuid, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("data", JSONB, nullable=False),
    sa.Column("metadata", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    sa.UniqueConstraint("event_id", name="events_event_id_key"),
    sa.UniqueConstraint("stream_id", "stream_version", name="events_stream_version_key"),
    sa.CheckConstraint(
        f"char_length(stream_id) BETWEEN 1 AND {MAX_STREAM_ID_LENGTH}", name="events_stream_id_length"
    ),
    sa.CheckConstraint(
        f"char_length(event_type) BETWEEN 1 AND {MAX_EVENT_TYPE_LENGTH}", name="events_event_type_length"
    ),
    sa.CheckConstraint("stream_version >= 0", name="events_stream_version_positive"),
    sa.Index("events_log_idx", "log_xid", "position"),
    sa.Index("events_category_log_idx", "category", "log_xid", "position"),
    # Queries by event type (decisions over a type with no tag, `read_all(types=...)`) read in log order.
    sa.Index("events_type_log_idx", "event_type", "log_xid", "position"),
    # One entry per stream (its first event), for browsing streams newest first: by category a page
    # costs a page of index entries however many streams there are, by stream id prefix one entry per
    # matching stream (index only). Appends to existing streams never touch these indexes.
    sa.Index("events_stream_start_idx", "position", postgresql_where=sa.text("stream_version = 0")),
    sa.Index(
        "events_stream_start_category_idx", "category", "position", postgresql_where=sa.text("stream_version = 0")
    ),
    sa.Index(
        "events_stream_start_id_idx",
        "stream_id",
        postgresql_ops={"stream_id": "text_pattern_ops"},
        postgresql_include=["position"],
        postgresql_where=sa.text("stream_version = 0"),
    ),
    # The streams holding a subject's sealed fields (what forgetting it must clear from snapshots): only
    # events with personal data have an entry, so the log at large pays nothing for it.
    sa.Index(
        "events_personal_subjects_idx",
        sa.text("((metadata -> 'personal_data'::text) -> 'subjects'::text)"),
        postgresql_using="gin",
        postgresql_where=sa.text("metadata ? 'personal_data'::text"),
    ),
    comment="Append-only log of every event; UPDATE, DELETE and TRUNCATE are rejected by triggers.",
)

snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("stream_id", sa.Text, primary_key=True),
    sa.Column("snapshot_type", sa.Text, nullable=False),
    sa.Column("schema_version", sa.Text, nullable=False),
    sa.Column("stream_version", sa.BigInteger, nullable=False),
    sa.Column("data", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    comment="Latest snapshot per stream; a snapshot is a cache, never the truth.",
)

event_tags = sa.Table(
    "event_tags",
    metadata,
    sa.Column("tag", sa.Text, nullable=False),
    sa.Column("log_xid", sa.BigInteger, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.PrimaryKeyConstraint("tag", "log_xid", "position", name="event_tags_pkey"),
    comment=(
        "One row per tag of an event, in log order per tag: a page of a tag costs a page of index "
        "entries, as a page of a category does (an array column with a GIN index cannot be read in order)."
    ),
)

condition_locks = sa.Table(
    "condition_locks",
    metadata,
    sa.Column("key", sa.BigInteger, primary_key=True),
    sa.Column("log_xid", sa.BigInteger, nullable=False),
    comment=(
        "Per condition lock key, the log transaction id of the last conditional append that held it: a "
        "transaction that wrote before taking its locks checks it was not overtaken in the log order."
    ),
)

subject_keys = sa.Table(
    "subject_keys",
    metadata,
    sa.Column("subject", sa.Text, primary_key=True),
    sa.Column("key_id", sa.Text, nullable=True),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("(wrapped_key IS NULL) = (forgotten_at IS NOT NULL)", name="subject_keys_forgotten"),
    comment=(
        "One data key per subject of personal data, wrapped by the master key (key_id names it); "
        "forgetting a subject deletes its key, which leaves its sealed fields unreadable for good."
    ),
)

events_archive = sa.Table(
    "events_archive",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("log_xid", sa.BigInteger, nullable=False),
    sa.Column("stream_id", sa.Text, nullable=False),
    sa.Column("stream_version", sa.BigInteger, nullable=False),
    sa.Column("event_id", sa.Uuid, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("data", JSONB, nullable=False),
    sa.Column("metadata", JSONB, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("archived_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    sa.Index("events_archive_stream_idx", "stream_id", "stream_version"),
    sa.Index(
        "events_archive_personal_subjects_idx",
        sa.text("((metadata -> 'personal_data'::text) -> 'subjects'::text)"),
        postgresql_using="gin",
        postgresql_where=sa.text("metadata ? 'personal_data'::text"),
    ),
    comment=(
        "Events of archived streams, moved out of the log by eventstore_maintenance: no reader of the "
        "log sees them until the stream is restored (with its positions and log order)."
    ),
)
