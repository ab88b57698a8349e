"""Projections: checkpoints (with the active generation of each projection's tables) and rebuilds.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = ("projections",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "projection_checkpoints",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("mode", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("tables", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("transaction_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("position", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'stopped'::text"), nullable=False),
        sa.Column("runner", sa.Text(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("failed_event_id", sa.Uuid(), nullable=True),
        sa.Column("failed_event_type", sa.Text(), nullable=True),
        sa.Column("failed_transaction_id", sa.BigInteger(), nullable=True),
        sa.Column("failed_position", sa.BigInteger(), nullable=True),
        sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("status IN ('running', 'stopped', 'failed')", name="projection_checkpoints_status"),
        sa.CheckConstraint("mode IN ('async', 'inline')", name="projection_checkpoints_mode"),
        sa.CheckConstraint("generation >= 1", name="projection_checkpoints_generation_positive"),
        sa.PrimaryKeyConstraint("name"),
        comment=(
            "Per projection: the active generation of its tables and the checkpoint they are built to; "
            "advanced in the same transaction as the handlers' writes."
        ),
    )
    op.create_table(
        "projection_rebuilds",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("tables", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("transaction_id", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("position", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("events_done", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["name"], ["projection_checkpoints.name"], name="projection_rebuilds_name_fkey", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("name"),
        comment="A rebuild in progress: the next generation of a projection's tables and how far it has got.",
    )


def downgrade() -> None:
    # The generations of read-model tables live in schemas named after their projection.
    op.execute(
        """
        DO $$
        DECLARE s record;
        BEGIN
            FOR s IN SELECT nspname FROM pg_namespace WHERE nspname LIKE 'projection\\_%\\_g%' LOOP
                EXECUTE format('DROP SCHEMA %I CASCADE', s.nspname);
            END LOOP;
        END
        $$
        """
    )
    op.drop_table("projection_rebuilds")
    op.drop_table("projection_checkpoints")
