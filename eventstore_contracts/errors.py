"""Typed errors of the contracts tools, each naming the file and line a user has to fix."""

from __future__ import annotations

from pathlib import Path

from eventstore import EventStoreError, InvalidArgument


class ContractError(EventStoreError):
    """Base of every error the contracts tools raise on purpose."""


class LockFileError(ContractError, InvalidArgument):
    """A schema lock file cannot be used: not JSON, not a lock file, or written by a newer eventstore."""

    def __init__(self, path: str | Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason


class SchemaUnreadable(ContractError, InvalidArgument):
    """A schema the compatibility check cannot walk: not a JSON Schema object, or malformed inside."""


class EventSchemaError(ContractError, InvalidArgument):
    """An event class pydantic cannot describe as JSON Schema (a field of a type with no JSON form)."""

    def __init__(self, event_type: str, event_class: str, reason: str) -> None:
        super().__init__(f"{event_class} (event type {event_type!r}) has no JSON Schema: {reason}")
        self.event_type = event_type
        self.event_class = event_class
        self.reason = reason
