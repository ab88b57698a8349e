"""Event store: the conditional append looks up its event ids by index, never by a scan of the table.

Version 2 of `eventstore_append_tagged`: with one generic plan per session (0014), the retry check
`event_id = ANY (...)` could be planned as a sequential scan of `events` when the session's first call
saw a small table, and keep it as the log grew. Each id is now looked up in `events_event_id_key`.

Revision ID: 0015
Revises: 0014
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

from eventstore import sql

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sql.APPEND_TAGGED_FUNCTION_V2)


def downgrade() -> None:
    op.execute(sql.APPEND_TAGGED_FUNCTION_V1.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    op.execute(f"ALTER FUNCTION {sql.APPEND_TAGGED_SIGNATURE} SET plan_cache_mode = force_generic_plan")
