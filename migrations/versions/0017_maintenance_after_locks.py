"""Event store: stream maintenance reads and drops what it moves only once it holds the streams' locks.

Version 2 of `eventstore_maintenance`: an append committing while an archive or a delete waited for its
stream was moved or deleted without being counted (the `$StreamDeleted` record said fewer events), and
its tag index rows stayed behind, which cut decisions' reads short; the archive now drops the stream's
snapshot itself, under the lock. The archive gets the index of personal-data subjects that `events`
has, for `forget` looks there too.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

from eventstore import sql

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(sql.MAINTENANCE_FUNCTION_V2)
    op.execute(sql.EVENTS_ARCHIVE_SUBJECTS_INDEX)


def downgrade() -> None:
    op.drop_index("events_archive_personal_subjects_idx", table_name="events_archive")
    # Replaced, not dropped: grants an operator gave on the function stay.
    op.execute(sql.MAINTENANCE_FUNCTION_V1.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
