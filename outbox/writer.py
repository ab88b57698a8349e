"""Routing rules and the append hook that writes outbox messages in the events' own transaction."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from eventstore import AppendResult, EventStore, RecordedEvent, UnitOfWork
from eventstore.model import CAUSATION_ID, CORRELATION_ID
from outbox import sql
from outbox.errors import InvalidRoute, RoutingError
from outbox.schema import SLOT_COUNT

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

KeyFunction = Callable[[RecordedEvent], str]


def slot_of(key: str) -> int:
    """The slot of a key: stable across processes and Python versions (unlike `hash`)."""
    return zlib.crc32(key.encode()) % SLOT_COUNT


@dataclass(frozen=True, slots=True, init=False)
class Route:
    """Events of `types` (and/or `category`) go to `topic`, keyed by `key(event)` (default: stream id).

    The key decides the Kafka partition and the order guarantee: messages with one key are published
    in the order they were written.
    """

    topic: str
    types: frozenset[str] | None
    category: str | None
    key: KeyFunction | None

    def __init__(
        self,
        topic: str,
        types: Collection[str] | None = None,
        *,
        category: str | None = None,
        key: KeyFunction | None = None,
    ) -> None:
        if not isinstance(topic, str) or not _TOPIC.match(topic) or topic in (".", ".."):
            raise InvalidRoute(f"{topic!r} is not a valid Kafka topic name ([A-Za-z0-9._-], 1-249 chars)")
        if isinstance(types, str):
            raise InvalidRoute(f"types must be a collection of event types, not the string {types!r}")
        chosen = None if types is None else frozenset(types)
        if chosen is not None and (not chosen or not all(isinstance(t, str) and t for t in chosen)):
            raise InvalidRoute("types must be a non-empty collection of non-empty strings (or None: all)")
        if category is not None and (not isinstance(category, str) or not category):
            raise InvalidRoute("category must be a non-empty string (or None: all)")
        if key is not None and not callable(key):
            raise InvalidRoute("key must be a function of the recorded event")
        object.__setattr__(self, "topic", topic)
        object.__setattr__(self, "types", chosen)
        object.__setattr__(self, "category", category)
        object.__setattr__(self, "key", key)

    def matches(self, event: RecordedEvent) -> bool:
        if self.types is not None and event.event_type not in self.types:
            return False
        return self.category is None or event.category == self.category

    def key_of(self, event: RecordedEvent) -> str:
        if self.key is None:
            return event.stream_id
        try:
            key = self.key(event)
        except Exception as exc:
            raise RoutingError(
                self.topic, event.event_type, event.stream_id, f"key function raised {exc!r}"
            ) from exc
        if not isinstance(key, str) or not key or "\x00" in key:
            raise RoutingError(
                self.topic, event.event_type, event.stream_id,
                f"key function returned {key!r}; a key is a non-empty string without NUL",
            )
        return key


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """One message as the outbox stores it, before the relay turns it into a Kafka record."""

    slot: int
    topic: str
    key: str
    event_id: UUID
    event_type: str
    source: str
    stream_id: str
    stream_version: int
    data: str
    correlation_id: str | None
    causation_id: str | None
    recorded_at: datetime


class Outbox:
    """Writes a message for every (event, matching route) inside the append that records the event.

    Every matching route yields a message (fan-out to several topics); events no route matches yield
    none. Topic and key are computed here, at write time, so the relay needs none of this code.
    """

    def __init__(self, routes: Sequence[Route], *, source: str = "eventstore") -> None:
        if isinstance(routes, Route) or not all(isinstance(r, Route) for r in routes):
            raise InvalidRoute("routes must be a sequence of Route")
        if not isinstance(source, str) or not source:
            raise InvalidRoute("source (the CloudEvents source attribute) must be a non-empty string")
        self.routes = tuple(routes)
        self.source = source

    def install(self, store: EventStore) -> None:
        """Write messages in every append of `store` from now on."""
        store.add_append_hook(self.on_append)

    def messages(self, events: Sequence[RecordedEvent]) -> list[OutboxMessage]:
        out: list[OutboxMessage] = []
        for event in events:
            routes = [route for route in self.routes if route.matches(event)]
            if not routes:
                continue
            meta = event.meta() if event.metadata != "{}" else {}
            correlation_id, causation_id = meta.get(CORRELATION_ID), meta.get(CAUSATION_ID)
            for route in routes:
                key = route.key_of(event)
                out.append(
                    OutboxMessage(
                        slot_of(key), route.topic, key, event.event_id, event.event_type, self.source,
                        event.stream_id, event.stream_version, event.data,
                        None if correlation_id is None else str(correlation_id),
                        None if causation_id is None else str(causation_id),
                        event.recorded_at,
                    )
                )
        return out

    async def on_append(self, uow: UnitOfWork, result: AppendResult) -> None:
        """The append hook: runs inside the append's transaction, so messages and events commit together."""
        messages = self.messages(result.events)
        if not messages:
            return
        if len(messages) == 1:  # the common case, without array round trips
            m = messages[0]
            await uow.connection.execute(
                sql.INSERT_MESSAGE, m.slot, m.topic, m.key, m.event_id, m.event_type, m.source, m.stream_id,
                m.stream_version, m.data, m.correlation_id, m.causation_id, m.recorded_at,
            )
            return
        await uow.connection.execute(
            sql.INSERT_MESSAGES,
            [m.slot for m in messages],
            [m.topic for m in messages],
            [m.key for m in messages],
            [m.event_id for m in messages],
            [m.event_type for m in messages],
            [m.source for m in messages],
            [m.stream_id for m in messages],
            [m.stream_version for m in messages],
            [m.data for m in messages],
            [m.correlation_id for m in messages],
            [m.causation_id for m in messages],
            [m.recorded_at for m in messages],
        )
