"""Event store: a condition's checkpoint is from the future only if no event, live or archived, reached it.

Version 3 of `eventstore_append_tagged`: archiving the newest events lowered the highest position of
`events` below checkpoints that reads had already handed out, so conditional appends made on those reads
were refused as "from the future". The archive is looked at only when `events` alone would refuse.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

from eventstore import sql

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sql.APPEND_TAGGED_FUNCTION_V3)


def downgrade() -> None:
    op.execute(sql.APPEND_TAGGED_FUNCTION_V2)
