"""Append-only PostgreSQL event store: streams, optimistic concurrency, a gap-safe global log."""

from eventstore.errors import (
    DatabaseUnavailable,
    DuplicateEventId,
    EventSerializationError,
    EventStoreError,
    EventTooLarge,
    InvalidAppend,
    MigrationFailed,
    SchemaNotMigrated,
    StreamNotFound,
    WrongExpectedVersion,
)
from eventstore.migrate import migrate
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
from eventstore.schema import metadata
from eventstore.store import CONNECTION_ERRORS, AppendHook, EventStore, Snapshot, UnitOfWork, asyncpg_dsn
from eventstore.subscription import Subscription

__all__ = [
    "CONNECTION_ERRORS",
    "START",
    "AppendHook",
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
    "MigrationFailed",
    "NewEvent",
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
    "migrate",
]
