"""Append-only PostgreSQL event store: streams, optimistic concurrency, a gap-safe global log."""

from eventstore.errors import (
    AppendConditionFailed,
    AppendRefused,
    DatabaseUnavailable,
    DuplicateEventId,
    EventSerializationError,
    EventStoreError,
    EventTooLarge,
    InvalidAppend,
    InvalidArgument,
    MigrationFailed,
    NotStarted,
    SchemaNotMigrated,
    StreamNotFound,
    WrongExpectedVersion,
)
from eventstore.model import (
    START,
    AppendResult,
    Checkpoint,
    Direction,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamState,
    category_of,
    expected_version,
)
from eventstore.query import MAX_TAG_LENGTH, Condition, Query, QueryItem
from eventstore.retry import CONNECTION_ERRORS, Backoff, with_retries
from eventstore.schema import metadata
from eventstore.sql import NOTIFY_CHANNEL
from eventstore.store import AppendHook, Connection, EventStore, Snapshot, UnitOfWork, asyncpg_dsn, has_non_finite
from eventstore.subscription import Subscription
from eventstore.telemetry import MetricsServer, TelemetryUnavailable, serve_metrics

__all__ = [
    "CONNECTION_ERRORS",
    "MAX_TAG_LENGTH",
    "NOTIFY_CHANNEL",
    "START",
    "AppendConditionFailed",
    "AppendHook",
    "AppendRefused",
    "AppendResult",
    "Backoff",
    "Checkpoint",
    "Condition",
    "Connection",
    "DatabaseUnavailable",
    "Direction",
    "DuplicateEventId",
    "EventSerializationError",
    "EventStore",
    "EventStoreError",
    "EventTooLarge",
    "ExpectedVersion",
    "InvalidAppend",
    "InvalidArgument",
    "MetricsServer",
    "MigrationFailed",
    "NewEvent",
    "NotStarted",
    "Query",
    "QueryItem",
    "RecordedEvent",
    "SchemaNotMigrated",
    "Snapshot",
    "StreamNotFound",
    "StreamState",
    "Subscription",
    "TelemetryUnavailable",
    "UnitOfWork",
    "WrongExpectedVersion",
    "asyncpg_dsn",
    "category_of",
    "expected_version",
    "has_non_finite",
    "metadata",
    "serve_metrics",
    "with_retries",
]
