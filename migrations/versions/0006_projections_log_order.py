"""Projections: checkpoints in the log order of revision 0004, and guards for inline projections.

Revision ID: 0006
Revises: 0002
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

from projections import sql

revision: str = "0006"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = "0004"

_RENAMES = (
    ("projection_checkpoints", "transaction_id", "log_xid"),
    ("projection_checkpoints", "failed_transaction_id", "failed_log_xid"),
    ("projection_rebuilds", "transaction_id", "log_xid"),
)


def upgrade() -> None:
    for table, old, new in _RENAMES:
        op.alter_column(table, old, new_column_name=new)
    op.execute(sql.GUARD_FUNCTION_V1)


def downgrade() -> None:
    op.execute(
        "DO $$ DECLARE t record; BEGIN FOR t IN SELECT tgname FROM pg_trigger"
        " WHERE tgrelid = 'events'::regclass AND tgname LIKE 'projection\\_inline\\_%' LOOP"
        " EXECUTE format('DROP TRIGGER %I ON events', t.tgname); END LOOP; END $$"
    )
    op.execute(sql.DROP_GUARD_FUNCTION_V1)
    for table, old, new in _RENAMES:
        op.alter_column(table, new, new_column_name=old)
