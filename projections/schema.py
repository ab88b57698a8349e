"""Tables of the projections: where each projection stands in the log, and its rebuild in progress.

Mirrored exactly by the projections branch of the migrations.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

metadata = sa.MetaData()
"""The projections' own tables; only the migration environment combines them with the others."""


STATUSES = ("running", "stopped", "failed")
MODES = ("async", "inline")

projection_checkpoints = sa.Table(
    "projection_checkpoints",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("mode", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("tables", ARRAY(sa.Text), nullable=False),
    sa.Column("log_xid", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("position", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'stopped'::text")),
    sa.Column("partitions", sa.Integer, nullable=False, server_default=sa.text("1")),
    sa.Column("partition_key", sa.Text, nullable=True),
    sa.Column("runner", sa.Text, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("failed_event_id", sa.Uuid, nullable=True),
    sa.Column("failed_event_type", sa.Text, nullable=True),
    sa.Column("failed_log_xid", sa.BigInteger, nullable=True),
    sa.Column("failed_position", sa.BigInteger, nullable=True),
    sa.Column("failed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    sa.CheckConstraint(
        "status IN ('running', 'stopped', 'failed')", name="projection_checkpoints_status"
    ),
    sa.CheckConstraint("mode IN ('async', 'inline')", name="projection_checkpoints_mode"),
    sa.CheckConstraint("generation >= 1", name="projection_checkpoints_generation_positive"),
    sa.CheckConstraint("partitions >= 1", name="projection_checkpoints_partitions_positive"),
    comment=(
        "Per projection: the active generation of its tables and the checkpoint they are built to; "
        "advanced in the same transaction as the handlers' writes."
    ),
)

projection_rebuilds = sa.Table(
    "projection_rebuilds",
    metadata,
    sa.Column(
        "name",
        sa.Text,
        sa.ForeignKey("projection_checkpoints.name", ondelete="CASCADE", name="projection_rebuilds_name_fkey"),
        primary_key=True,
    ),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("tables", ARRAY(sa.Text), nullable=False),
    sa.Column("log_xid", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("position", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("events_done", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    comment="A rebuild in progress: the next generation of a projection's tables and how far it has got.",
)

projection_partitions = sa.Table(
    "projection_partitions",
    metadata,
    sa.Column(
        "name",
        sa.Text,
        sa.ForeignKey("projection_checkpoints.name", ondelete="CASCADE", name="projection_partitions_name_fkey"),
        primary_key=True,
    ),
    sa.Column("partition", sa.Integer, primary_key=True),
    sa.Column("log_xid", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("position", sa.BigInteger, nullable=False, server_default=sa.text("0")),
    sa.Column("runner", sa.Text, nullable=True),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    sa.CheckConstraint("partition >= 0", name="projection_partitions_partition_positive"),
    comment=(
        "Per partition of a partitioned projection: the checkpoint its events are applied to, advanced "
        "in the same transaction as the handlers' writes; the live generation's only."
    ),
)
