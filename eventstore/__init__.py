"""Append-only PostgreSQL event store: streams, optimistic concurrency, a gap-safe global log."""

from eventstore.errors import (
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
from eventstore.retry import CONNECTION_ERRORS, with_retries
from eventstore.schema import metadata
from eventstore.store import AppendHook, EventStore, Snapshot, UnitOfWork, asyncpg_dsn
from eventstore.subscription import Subscription

__all__ = [
    "CONNECTION_ERRORS",
    "START",
    "AppendHook",
    "AppendRefused",
    "AppendResult",
    "Checkpoint",
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
    "MigrationFailed",
    "NewEvent",
    "NotStarted",
    "RecordedEvent",
    "SchemaNotMigrated",
    "Snapshot",
    "StreamNotFound",
    "StreamState",
    "Subscription",
    "UnitOfWork",
    "WrongExpectedVersion",
    "asyncpg_dsn",
    "category_of",
    "expected_version",
    "metadata",
    "with_retries",
]
