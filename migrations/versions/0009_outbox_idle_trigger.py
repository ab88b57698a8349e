"""Outbox: the trigger on events returns at once while no route is declared.

Revision ID: 0009
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

from outbox import sql

revision: str = "0009"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sql.WRITE_FUNCTION_V2)


def downgrade() -> None:
    for statement in sql.DROP_WRITE_FUNCTION_V1[:2]:
        op.execute(statement)
    for statement in sql.WRITE_FUNCTION_V1[1:]:
        op.execute(statement)
