"""Event store: a log order that keeps every stream's events in version order.

Events get a log transaction id (`log_xid`) that is never lower than the one of the stream's previous
event; the `streams` row remembers it. Existing events are moved up to the highest log_xid of their
stream so far (a reader whose checkpoint had passed such an event sees it again, now in its stream's
order).

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventstore import sql

revision: str = "0004"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_REORDER = """
UPDATE events AS e SET log_xid = fixed.log_xid
FROM (
    SELECT position, max(log_xid) OVER (PARTITION BY stream_id ORDER BY stream_version) AS log_xid
    FROM events
) AS fixed
WHERE e.position = fixed.position AND e.log_xid <> fixed.log_xid
"""

_STREAM_LOG_XID = """
UPDATE streams AS s SET log_xid = last.log_xid
FROM (SELECT stream_id, max(log_xid) AS log_xid FROM events GROUP BY stream_id) AS last
WHERE s.stream_id = last.stream_id
"""


def upgrade() -> None:
    for statement in sql.DROP_APPEND_FUNCTIONS:
        op.execute(statement)
    op.add_column("streams", sa.Column("log_xid", sa.BigInteger(), server_default=sa.text("0"), nullable=False))
    op.create_table_comment(
        "streams",
        "Current version per stream: the row the optimistic concurrency check locks, and the log "
        "transaction id of the stream's last event, below which its next event may not go.",
    )
    op.alter_column("events", "transaction_id", new_column_name="log_xid", server_default=None)
    op.execute("ALTER TABLE events DISABLE TRIGGER events_append_only_rows")
    op.execute(_REORDER)
    op.execute("ALTER TABLE events ENABLE TRIGGER events_append_only_rows")
    op.execute(_STREAM_LOG_XID)
    op.execute(sql.DUPLICATES_FUNCTION_V2)
    op.execute(sql.APPEND_FUNCTION_V2)


def downgrade() -> None:
    for statement in sql.DROP_APPEND_FUNCTIONS:
        op.execute(statement)
    op.alter_column(
        "events",
        "log_xid",
        new_column_name="transaction_id",
        server_default=sa.text("(pg_current_xact_id())::text::bigint"),
    )
    op.drop_column("streams", "log_xid")
    op.create_table_comment("streams", "Current version per stream: the row the optimistic concurrency check locks.")
    op.execute(sql.DUPLICATES_FUNCTION_V1)
    op.execute(sql.APPEND_FUNCTION_V1)
