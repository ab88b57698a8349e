"""Event store: tags on events, queries by type and tag, and conditional appends (dynamic consistency boundaries).

`event_tags` holds one row per tag of an event in log order per tag; `events_type_log_idx` serves type
queries in log order; `condition_locks` remembers, per condition lock key, the last conditional append
that held it. `eventstore_append_tagged` takes the locks, checks the condition and calls
`eventstore_append` for the write itself, whose signature it leaves alone.

Revision ID: 0010
Revises: 0008
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from eventstore import sql

revision: str = "0010"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("events_type_log_idx", "events", ["event_type", "log_xid", "position"])
    op.create_table(
        "event_tags",
        sa.Column("tag", sa.Text(), nullable=False),
        sa.Column("log_xid", sa.BigInteger(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("tag", "log_xid", "position", name="event_tags_pkey"),
        comment=(
            "One row per tag of an event, in log order per tag: a page of a tag costs a page of index "
            "entries, as a page of a category does (an array column with a GIN index cannot be read in order)."
        ),
    )
    op.create_table(
        "condition_locks",
        sa.Column("key", sa.BigInteger(), nullable=False),
        sa.Column("log_xid", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
        comment=(
            "Per condition lock key, the log transaction id of the last conditional append that held it: a "
            "transaction that wrote before taking its locks checks it was not overtaken in the log order."
        ),
    )
    op.execute(sql.APPEND_TAGGED_FUNCTION_V1)
    op.execute(sql.REBUILD_TAG_INDEX)  # empty, unless an earlier downgrade dropped the index of tagged events


def downgrade() -> None:
    op.execute(sql.DROP_APPEND_TAGGED_FUNCTION)
    op.drop_table("condition_locks")
    op.drop_table("event_tags")
    op.drop_index("events_type_log_idx", table_name="events")
