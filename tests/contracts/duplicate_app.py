"""An application whose import fails: two classes claim the event type `Counted` (for the CLI test)."""

from __future__ import annotations

from aggregates import DomainEvent, EventRegistry
from eventstore_app import Application


class Counted(DomainEvent):
    n: int


class CountedAsText(DomainEvent, event_type="Counted"):
    n: str


APP = Application("twice", registry=EventRegistry(Counted, CountedAsText))
