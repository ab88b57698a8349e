"""Outbox: routes that select events by tag.

Revision ID: 0010b
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from outbox import sql

revision: str = "0010b"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox_routes", sa.Column("tag", sa.Text(), nullable=True))
    for statement in sql.WRITE_FUNCTION_V2:
        op.execute(statement)


def downgrade() -> None:
    for statement in sql.DROP_WRITE_FUNCTION_V1:
        op.execute(statement)
    op.drop_column("outbox_routes", "tag")
    for statement in sql.WRITE_FUNCTION_V1:
        op.execute(statement)
