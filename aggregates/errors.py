"""Typed errors of the aggregates layer: each carries the context a caller needs to act on it."""

from __future__ import annotations

from datetime import datetime

from eventstore import EventStoreError, InvalidArgument


class AggregateError(EventStoreError):
    """Base of every error the aggregates layer raises on purpose."""


class AggregateUsageError(AggregateError, TypeError):
    """An aggregate, event or command of the wrong kind was handed over (a programming error)."""


class EventRegistrationError(AggregateError, TypeError):
    """An event class, upcaster or handler was declared inconsistently (a programming error)."""


class DuplicateEventType(EventRegistrationError):
    """Two different classes claim one stored type name: stored events could decode as either."""

    def __init__(
        self,
        event_type: str,
        first: tuple[str, str | None, int | None],
        second: tuple[str, str | None, int | None],
    ) -> None:
        def where(name: str, path: str | None, line: int | None) -> str:
            return name if path is None else f"{name} ({path}:{line})"

        super().__init__(
            f"event type {event_type!r} is registered twice: {where(*first)} and {where(*second)};"
            f" give {second[0]} its own name with `event_type=...`"
        )
        self.event_type = event_type
        self.first = first
        self.second = second


class InvalidAggregateId(AggregateError, InvalidArgument):
    """The aggregate id cannot name a stream (empty, not a string, too long, contains NUL)."""

    def __init__(self, aggregate_id: object, reason: str) -> None:
        super().__init__(f"invalid aggregate id {aggregate_id!r}: {reason}")
        self.aggregate_id = aggregate_id
        self.reason = reason


class AggregateNotFound(AggregateError):
    """No events exist for this aggregate (at the requested version or time, when one was given)."""

    def __init__(
        self,
        aggregate_type: str,
        aggregate_id: str,
        stream_id: str,
        *,
        version: int | None = None,
        as_of: datetime | None = None,
    ) -> None:
        where = ""
        if version is not None:
            where = f" at version {version}"
        elif as_of is not None:
            where = f" as of {as_of.isoformat()}"
        super().__init__(f"{aggregate_type} {aggregate_id!r} (stream {stream_id!r}) not found{where}")
        self.aggregate_type = aggregate_type
        self.aggregate_id = aggregate_id
        self.stream_id = stream_id
        self.version = version
        self.as_of = as_of


class UnknownEventType(AggregateError):
    """A stored event's type has no registered class; read raw events to see it anyway."""

    def __init__(self, event_type: str, stream_id: str | None = None, stream_version: int | None = None) -> None:
        where = "" if stream_id is None else f" (stream {stream_id!r}, version {stream_version})"
        super().__init__(f"unknown event type {event_type!r}{where}")
        self.event_type = event_type
        self.stream_id = stream_id
        self.stream_version = stream_version


class EventDecodeError(AggregateError):
    """A stored event could not be turned into its current class (bad payload, failed upcast)."""

    def __init__(
        self,
        event_type: str,
        schema_version: int | None,
        reason: str,
        stream_id: str | None = None,
        stream_version: int | None = None,
    ) -> None:
        where = "" if stream_id is None else f" (stream {stream_id!r}, version {stream_version})"
        super().__init__(f"cannot decode event {event_type!r} schema v{schema_version}{where}: {reason}")
        self.event_type = event_type
        self.schema_version = schema_version
        self.reason = reason
        self.stream_id = stream_id
        self.stream_version = stream_version


class MissingUpcaster(EventDecodeError):
    """A stored event is at an old schema version and no upcaster lifts it to the next one."""

    def __init__(
        self,
        event_type: str,
        from_version: int,
        stream_id: str | None = None,
        stream_version: int | None = None,
    ) -> None:
        super().__init__(
            event_type,
            from_version,
            f"no upcaster from v{from_version} to v{from_version + 1}",
            stream_id,
            stream_version,
        )
        self.from_version = from_version


class MissingHandler(AggregateError, TypeError):
    """The aggregate has no handler for an event it was asked to apply."""

    def __init__(self, aggregate_type: str, event_type: str) -> None:
        super().__init__(f"{aggregate_type} has no handler for event {event_type!r}")
        self.aggregate_type = aggregate_type
        self.event_type = event_type


class SnapshotError(AggregateError):
    """A snapshot could not be taken (snapshots not enabled, pending events, unserializable state)."""
