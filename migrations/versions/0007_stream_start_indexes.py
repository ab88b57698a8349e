"""Event store: indexes on each stream's first event, for browsing streams newest first.

The admin console lists streams newest first, filtered by category or by stream id prefix, a page at
a time. Partial indexes on `stream_version = 0` hold one entry per stream: a page of a category costs
the same on a few streams or on millions, a prefix one index entry per matching stream, and appending
to an existing stream never touches them.

Revision ID: 0007
Revises: 0004
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FIRST_EVENT = sa.text("stream_version = 0")


def upgrade() -> None:
    op.create_index("events_stream_start_idx", "events", ["position"], postgresql_where=FIRST_EVENT)
    op.create_index(
        "events_stream_start_category_idx", "events", ["category", "position"], postgresql_where=FIRST_EVENT
    )
    op.create_index(
        "events_stream_start_id_idx",
        "events",
        ["stream_id"],
        postgresql_ops={"stream_id": "text_pattern_ops"},
        postgresql_include=["position"],
        postgresql_where=FIRST_EVENT,
    )


def downgrade() -> None:
    op.drop_index("events_stream_start_id_idx", table_name="events")
    op.drop_index("events_stream_start_category_idx", table_name="events")
    op.drop_index("events_stream_start_idx", table_name="events")
