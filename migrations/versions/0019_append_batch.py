"""Event store: `eventstore_append_batch`, the appends of several callers in one statement.

Concurrent appends outside units of work, to distinct streams, are sent together by the store when
its statements in flight reach `EventStore(append_lanes=...)`: one round trip and one commit for many.
Each append is written exactly as `eventstore_append` writes it alone.

Revision ID: 0019
Revises: 0017
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

from eventstore import sql

revision: str = "0019"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sql.APPEND_BATCH_FUNCTION_V1)


def downgrade() -> None:
    op.execute(sql.DROP_APPEND_BATCH_FUNCTION)
