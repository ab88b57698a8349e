"""Event store: personal data keys (crypto-shredding) and stream lifecycle.

`subject_keys` holds one wrapped data key per subject of personal data; a partial GIN index finds the
events (and so the snapshots) holding a subject's sealed fields.

Revision ID: 0011
Revises: 0007
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "subject_keys",
        sa.Column("subject", sa.Text, primary_key=True),
        sa.Column("key_id", sa.Text, nullable=True),
        sa.Column("wrapped_key", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("(wrapped_key IS NULL) = (forgotten_at IS NOT NULL)", name="subject_keys_forgotten"),
        comment=(
            "One data key per subject of personal data, wrapped by the master key (key_id names it); "
            "forgetting a subject deletes its key, which leaves its sealed fields unreadable for good."
        ),
    )
    op.execute(
        "CREATE INDEX events_personal_subjects_idx ON events USING gin ((metadata -> 'personal_data' -> 'subjects'))"
        " WHERE metadata ? 'personal_data'"
    )


def downgrade() -> None:
    op.drop_index("events_personal_subjects_idx", table_name="events")
    op.drop_table("subject_keys")
