"""Projections: partitioned projections, a checkpoint per partition.

Revision ID: 0012
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "projection_checkpoints", sa.Column("partitions", sa.Integer(), server_default=sa.text("1"), nullable=False)
    )
    op.create_check_constraint("projection_checkpoints_partitions_positive", "projection_checkpoints", "partitions >= 1")
    op.create_table(
        "projection_partitions",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("log_xid", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("position", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("runner", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("partition >= 0", name="projection_partitions_partition_positive"),
        sa.ForeignKeyConstraint(
            ["name"], ["projection_checkpoints.name"], name="projection_partitions_name_fkey", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("name", "partition", name="projection_partitions_pkey"),
        comment=(
            "Per partition of a partitioned projection: the checkpoint its events are applied to, advanced "
            "in the same transaction as the handlers' writes; the live generation's only."
        ),
    )


def downgrade() -> None:
    op.drop_table("projection_partitions")
    op.drop_constraint("projection_checkpoints_partitions_positive", "projection_checkpoints")
    op.drop_column("projection_checkpoints", "partitions")
