"""Outbox: the trigger on events returns at once while no route is declared.

Revision ID: 0013
Revises: 0010b
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

from outbox import sql

revision: str = "0013"
down_revision: str | None = "0010b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sql.WRITE_FUNCTION_V3)


def downgrade() -> None:
    for statement in sql.WRITE_FUNCTION_V2:
        op.execute(statement)
