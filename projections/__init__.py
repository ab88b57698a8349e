"""Projections: read models built from the event store's global log, exactly once, rebuilt while serving."""

from projections.control import ProgressCallback, Projections, ProjectionStatus, RebuildProgress, RebuildStatus
from projections.errors import (
    InvalidProjection,
    ProjectionError,
    ProjectionFailed,
    ProjectionNeedsRebuild,
    RebuildInProgress,
    UnknownProjection,
)
from projections.inline import InlineProjections
from projections.projection import BatchHandler, Connection, EventHandler, Projection, ReadModelTable, handles
from projections.runner import ProjectionRunner

__all__ = [
    "BatchHandler",
    "Connection",
    "EventHandler",
    "InlineProjections",
    "InvalidProjection",
    "ProgressCallback",
    "Projection",
    "ProjectionError",
    "ProjectionFailed",
    "ProjectionNeedsRebuild",
    "ProjectionRunner",
    "ProjectionStatus",
    "Projections",
    "ReadModelTable",
    "RebuildInProgress",
    "RebuildProgress",
    "RebuildStatus",
    "UnknownProjection",
    "handles",
]
