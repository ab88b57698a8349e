"""Event store: personal data keys (crypto-shredding) and stream lifecycle.

`subject_keys` holds one wrapped data key per subject of personal data; a partial GIN index finds the
events (and so the snapshots) holding a subject's sealed fields. Streams get archived and tombstoned
states (a trigger on their row refuses appends to them), archived events move to `events_archive`,
and `eventstore_maintenance` is the one audited way past the append-only triggers.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from eventstore import sql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subject_keys",
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
    op.execute(
        "CREATE INDEX events_personal_subjects_idx ON events USING gin ((metadata -> 'personal_data' -> 'subjects'))"
        " WHERE metadata ? 'personal_data'"
    )
    op.add_column("streams", sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("streams", sa.Column("tombstoned_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "events_archive",
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
        comment=(
            "Events of archived streams, moved out of the log by eventstore_maintenance: no reader of the "
            "log sees them until the stream is restored (with its positions and log order)."
        ),
    )
    op.create_index("events_archive_stream_idx", "events_archive", ["stream_id", "stream_version"])
    for statement in sql.STREAM_GUARD_V1:
        op.execute(statement)
    op.execute(sql.MAINTENANCE_FUNCTION_V1)


def downgrade() -> None:
    # What this revision keeps has nowhere to go below it: archived events, subjects' keys (every sealed
    # field would read as forgotten), tombstones (deleted streams could be written again).
    kept = op.get_bind().execute(sa.text(
        "SELECT EXISTS (SELECT FROM events_archive) OR EXISTS (SELECT FROM subject_keys)"
        " OR EXISTS (SELECT FROM streams WHERE tombstoned_at IS NOT NULL OR archived_at IS NOT NULL)"
    )).scalar()
    if kept:
        raise RuntimeError(
            "cannot downgrade below 0011: the database holds archived streams, tombstones or personal-data "
            "keys, which the older schema cannot keep (restore the streams and forget nothing you need first)"
        )
    for statement in sql.DROP_LIFECYCLE_V1:
        op.execute(statement)
    op.drop_index("events_archive_stream_idx", table_name="events_archive")
    op.drop_table("events_archive")
    op.drop_column("streams", "tombstoned_at")
    op.drop_column("streams", "archived_at")
    op.drop_index("events_personal_subjects_idx", table_name="events")
    op.drop_table("subject_keys")
