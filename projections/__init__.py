"""Projections: read models built from the event store's global log, exactly once, rebuilt while serving.

    class OrderTotals(Projection):
        name = "order_totals"
        version = 1
        tables = {"order_totals": "CREATE TABLE order_totals (order_id text PRIMARY KEY, total bigint NOT NULL)"}

        @handles("ItemAdded")
        async def added(self, conn, event):
            data = event.json()
            await conn.execute(
                "INSERT INTO order_totals VALUES ($1, $2) ON CONFLICT (order_id) "
                "DO UPDATE SET total = order_totals.total + EXCLUDED.total", event.stream_id, data["price"])

    async with ProjectionRunner(store, [OrderTotals()]) as runner:   # or `eventstore projections run`
        ...
    await ProjectionAdmin(store, [OrderTotals()]).rebuild("order_totals")  # blue/green, while serving

Handlers write plain SQL to their table names; readers query the same names (views of the live
generation). Mark a projection `inline = True` and attach it with `InlineProjections` to update it
inside every append's transaction instead.
"""

from projections.control import ProjectionAdmin, ProjectionStatus, RebuildStatus
from projections.errors import (
    InvalidProjection,
    ProjectionError,
    ProjectionFailed,
    ProjectionNeedsRebuild,
    ProjectionsNotMigrated,
    RebuildInProgress,
    UnknownProjection,
)
from projections.inline import InlineProjections
from projections.projection import BatchHandler, Connection, EventHandler, Projection, ReadModelTable, handles
from projections.rebuild import ProgressCallback, RebuildProgress
from projections.runner import ProjectionRunner

__all__ = [
    "BatchHandler",
    "Connection",
    "EventHandler",
    "InlineProjections",
    "InvalidProjection",
    "ProgressCallback",
    "Projection",
    "ProjectionAdmin",
    "ProjectionError",
    "ProjectionFailed",
    "ProjectionNeedsRebuild",
    "ProjectionRunner",
    "ProjectionStatus",
    "ProjectionsNotMigrated",
    "ReadModelTable",
    "RebuildInProgress",
    "RebuildProgress",
    "RebuildStatus",
    "UnknownProjection",
    "handles",
]
