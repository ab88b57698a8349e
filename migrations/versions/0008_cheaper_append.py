"""Event store: version 3 of the append function, with the same results and log order for less work.

Appends look for stored event ids only where a retry needs it (see `APPEND_FUNCTION_V3`), through the
unique index (version 2's probe could keep a sequential scan planned for the session); one event goes
in with a plain INSERT.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

from eventstore import sql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sql.APPEND_FUNCTION_V3)


def downgrade() -> None:
    op.execute(sql.DROP_APPEND_FUNCTIONS[0])
    op.execute(sql.APPEND_FUNCTION_V2)
