"""Event-sourced aggregates on the event store: typed events, repositories, snapshots, upcasting.

Given/when/then test helpers live in `aggregates.testing`.
"""

from aggregates.aggregate import Aggregate, applies
from aggregates.errors import (
    AggregateError,
    AggregateNotFound,
    EventDecodeError,
    EventRegistrationError,
    InvalidAggregateId,
    MissingHandler,
    MissingUpcaster,
    SnapshotError,
    UnknownEventType,
)
from aggregates.events import SCHEMA_VERSION_KEY, DomainEvent, EventRegistry, Upcaster
from aggregates.repository import Command, Repository

__all__ = [
    "SCHEMA_VERSION_KEY",
    "Aggregate",
    "AggregateError",
    "AggregateNotFound",
    "Command",
    "DomainEvent",
    "EventDecodeError",
    "EventRegistrationError",
    "EventRegistry",
    "InvalidAggregateId",
    "MissingHandler",
    "MissingUpcaster",
    "Repository",
    "SnapshotError",
    "UnknownEventType",
    "Upcaster",
    "applies",
]
