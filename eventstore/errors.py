"""Typed errors of the event store: each carries the context a caller needs to act on it."""

from __future__ import annotations

from typing import Any
from uuid import UUID


class EventStoreError(Exception):
    """Base of every error the event store raises on purpose."""


class InvalidArgument(EventStoreError, ValueError):
    """A call was given a value it cannot take (a limit of 0, a negative version, ...); nothing was done.

    The root of every bad-input error of the framework, so one `except InvalidArgument` catches them all.
    """


class InvalidAppend(InvalidArgument):
    """The append was rejected before anything was written (bad stream id, empty batch, ...)."""


class AppendRefused(EventStoreError):
    """A rule kept in the database refused the append, and nothing of it was written.

    Components attach such rules to the events table (an outbox route whose key is missing from the
    event, an inline projection that the writing process does not run); the message says which.
    """

    def __init__(self, reason: str, stream_id: str | None = None) -> None:
        where = f"stream {stream_id!r}: " if stream_id is not None else ""
        super().__init__(f"{where}append refused: {reason}")
        self.reason = reason
        self.stream_id = stream_id


class NotStarted(EventStoreError, RuntimeError):
    """A component was used before `start()` (or outside its `async with` block)."""


class EventSerializationError(InvalidAppend):
    """Event data or metadata cannot be stored as JSON."""

    def __init__(self, event_type: str, reason: str) -> None:
        super().__init__(f"event {event_type!r} cannot be serialized as JSON: {reason}")
        self.event_type = event_type
        self.reason = reason


class EventTooLarge(InvalidAppend):
    """An event is larger than the store's configured limit."""

    def __init__(self, event_type: str, size: int, limit: int) -> None:
        super().__init__(f"event {event_type!r} is {size} bytes, over the limit of {limit} bytes")
        self.event_type = event_type
        self.size = size
        self.limit = limit


class WrongExpectedVersion(EventStoreError):
    """Optimistic concurrency check failed: the stream is not at the version the writer expected."""

    def __init__(self, stream_id: str, expected: Any, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r}: expected version {expected}, actual version {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventId(EventStoreError):
    """An event id was already stored with other content, stream or position."""

    def __init__(self, stream_id: str, event_ids: list[UUID]) -> None:
        ids = ", ".join(str(i) for i in event_ids)
        super().__init__(f"stream {stream_id!r}: event ids already stored with other content: {ids}")
        self.stream_id = stream_id
        self.event_ids = event_ids


class StreamNotFound(EventStoreError):
    """The stream has no events."""

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"stream {stream_id!r} not found")
        self.stream_id = stream_id


class SchemaNotMigrated(EventStoreError):
    """The database lacks the event store schema, or has an older revision of it."""

    def __init__(self, found: str | None, expected: str) -> None:
        where = "no event store schema" if found is None else f"schema revision {found}"
        super().__init__(
            f"database has {where}, expected revision {expected}: run `eventstore migrate`"
        )
        self.found = found
        self.expected = expected


class DatabaseUnavailable(EventStoreError):
    """The database could not be reached or refused the connection."""


class AppendTimedOut(EventStoreError):
    """The server gave up on the append: a `lock_timeout` or `statement_timeout` of the database or role
    ran out, or an operator cancelled the statement. Nothing of the append was written; send it again
    (with the same event ids), or raise the limit."""

    def __init__(self, stream_id: str, reason: str) -> None:
        super().__init__(f"stream {stream_id!r}: the server gave up on the append: {reason}")
        self.stream_id = stream_id


class MigrationFailed(EventStoreError):
    """Applying the schema migrations failed (the database refused a statement or the connection)."""


class AppendConditionFailed(EventStoreError):
    """An event matching the condition's query was appended after its checkpoint; nothing was written.

    The decision was made on a state that is no longer current: read again and decide again.
    """

    def __init__(
        self,
        query: Any,
        after: Any,
        reason: str = "an event matching the query was appended after it",
        conflict: Any = None,
    ) -> None:
        super().__init__(f"append condition failed at checkpoint {tuple(after)}: {reason}")
        self.query = query
        self.after = after
        self.reason = reason
        self.conflict = conflict
        """The checkpoint of a conflicting event, when one is known: a retry can wait until readers see it."""
class UnknownSubject(InvalidArgument):
    """No personal data was ever stored for this subject (nothing to forget); nothing was done."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"no personal data is stored for subject {subject!r}")
        self.subject = subject


class SubjectForgotten(InvalidAppend):
    """The subject was forgotten: new personal data of it cannot be stored (its key is gone for good)."""

    def __init__(self, subject: str) -> None:
        super().__init__(f"subject {subject!r} was forgotten: its personal data can no longer be stored")
        self.subject = subject


class NoKeyProvider(InvalidAppend):
    """An append carries personal data, but the store was started without a master key (`keys=`)."""

    def __init__(self) -> None:
        super().__init__(
            "the events carry personal data but the store has no key provider: pass keys=MasterKey(...) "
            "or set EVENTSTORE_MASTER_KEY"
        )


class MasterKeyMismatch(EventStoreError):
    """The master key given is not the one that wrapped the stored data keys; nothing was read or written."""

    def __init__(self, given: str, stored: str | None) -> None:
        where = f"the stored keys were wrapped by {stored}" if stored else "it does not open the stored keys"
        super().__init__(f"master key {given} does not match: {where}")
        self.given = given
        self.stored = stored


class PersonalDataCorrupt(EventStoreError):
    """A sealed field does not open with its subject's key: the stored ciphertext was altered."""

    def __init__(self, event_id: str, field: str) -> None:
        super().__init__(f"event {event_id}: personal field {field!r} does not decrypt (altered ciphertext?)")
        self.event_id = event_id
        self.field = field


class StreamTombstoned(AppendRefused):
    """The stream was tombstoned (or hard-deleted): it can never be written again."""

    def __init__(self, stream_id: str) -> None:
        super().__init__("the stream is tombstoned: it can never be written again", stream_id)


class StreamArchived(AppendRefused):
    """The stream is archived: restore it (`eventstore.lifecycle.restore`) before writing to it."""

    def __init__(self, stream_id: str) -> None:
        super().__init__("the stream is archived: restore it before writing to it", stream_id)


class RetentionRefused(InvalidArgument):
    """A retention policy that would delete every stream of its category; nothing was deleted."""

    def __init__(self, category: str, streams: int) -> None:
        super().__init__(
            f"the retention policy would delete all {streams} streams of category {category!r}: "
            "pass allow_all=True (--allow-all) if that is meant"
        )
        self.category = category
        self.streams = streams
