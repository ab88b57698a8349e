"""Projections: the partition key a partitioned projection's checkpoints were made with.

Revision ID: 0018
Revises: 0012
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing rows get NULL, the stream id: the only key a projection could be stored with until now
    # that the runners did not also need told (a declared `partition_key` shows as needing a rebuild).
    op.add_column("projection_checkpoints", sa.Column("partition_key", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("projection_checkpoints", "partition_key")
