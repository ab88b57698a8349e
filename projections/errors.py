"""Typed errors of projections: each names the projection and, where there is one, the event."""

from __future__ import annotations

from uuid import UUID

from eventstore import EventStoreError, InvalidArgument, RecordedEvent, SchemaNotMigrated


class ProjectionError(EventStoreError):
    """Base of every error the projections package raises on purpose."""


class InvalidProjection(ProjectionError, InvalidArgument):
    """A projection declaration is unusable (bad name, no handlers, bad table DDL, ...)."""


class UnknownProjection(ProjectionError, LookupError):
    """No projection of that name is declared."""

    def __init__(self, name: str, known: list[str]) -> None:
        choices = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown projection {name!r} (declared: {choices})")
        self.name = name
        self.known = known


class ProjectionFailed(ProjectionError):
    """A handler raised on an event; the projection stops at that event until it is resumed or rebuilt."""

    def __init__(
        self,
        name: str,
        error: str,
        *,
        event_id: UUID | None = None,
        event_type: str | None = None,
        position: int | None = None,
        log_xid: int | None = None,
    ) -> None:
        where = "" if event_id is None else f" at event {event_type} {event_id} (position {position})"
        super().__init__(f"projection {name!r} failed{where}: {error}")
        self.name = name
        self.error = error
        self.event_id = event_id
        self.event_type = event_type
        self.position = position
        self.log_xid = log_xid

    @classmethod
    def at(cls, name: str, event: RecordedEvent, error: BaseException) -> ProjectionFailed:
        return cls(
            name,
            describe(error),
            event_id=event.event_id,
            event_type=event.event_type,
            position=event.position,
            log_xid=event.log_xid,
        )


class ProjectionNeedsRebuild(ProjectionError):
    """The stored read model was built by another declaration (version, mode or tables)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"projection {name!r} needs a rebuild: {reason}; run `eventstore projections rebuild {name}`")
        self.name = name
        self.reason = reason


class RebuildInProgress(ProjectionError):
    """Another process is rebuilding this projection right now."""

    def __init__(self, name: str) -> None:
        super().__init__(f"projection {name!r} is being rebuilt by another process")
        self.name = name


class ProjectionsNotMigrated(ProjectionError, SchemaNotMigrated):
    """The database lacks the projections' tables: migration 0002 has not been applied."""

    def __init__(self) -> None:
        EventStoreError.__init__(
            self, "database lacks the projections' tables (revision 0002): run `eventstore migrate`"
        )
        self.found = None
        self.expected = "0002"


def describe(error: BaseException) -> str:
    """One line naming the error's type and message, for the status table."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
