"""What an application promises: the schema of each event type and what each routed topic carries."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import PydanticUserError

from aggregates import DomainEvent
from aggregates.events import defined_at
from eventstore_app import Application
from eventstore_contracts.errors import EventSchemaError
from outbox import Compatibility, Route
from outbox.cloudevents import dataschema_uri

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def event_schema(cls: type[DomainEvent]) -> dict[str, Any]:
    """The JSON Schema of an event's payload, as pydantic reads it (what a stored event must satisfy).

    Round-tripped through JSON, so it compares equal to the same schema read back from a lock file.
    A class pydantic cannot describe (a `Callable` field, say) raises `EventSchemaError` naming it.
    """
    try:
        described = cls.model_json_schema(by_alias=cls.stored_by_alias)  # the keys stored events have
    except PydanticUserError as exc:  # PydanticInvalidForJsonSchema, or a class not fully defined
        path, line = defined_at(cls)
        where = cls.__qualname__ if path is None else f"{cls.__qualname__} at {path}:{line}"
        raise EventSchemaError(cls.event_type, where, str(exc).split("\n", 1)[0]) from None
    schema: dict[str, Any] = json.loads(json.dumps(described))
    return schema


@dataclass(frozen=True, slots=True)
class EventContract:
    """One registered event type at its current schema version."""

    event_type: str
    version: int
    schema: Mapping[str, Any]
    upcasts_from: frozenset[int]
    """Older versions an upcaster lifts to the next one."""
    defined_at: str
    """`path:line` of the class, for messages."""


@dataclass(frozen=True, slots=True)
class TopicContract:
    """A routed topic: the event types it carries, how messages are keyed, what its consumers are promised."""

    topic: str
    event_types: tuple[str, ...]
    keys: tuple[str, ...]
    """The key of each route to this topic: a field path (`data.customer_id`) or `stream_id`."""
    compatibility: Compatibility

    @property
    def backward(self) -> bool:
        return self.compatibility in ("backward", "full")

    @property
    def forward(self) -> bool:
        return self.compatibility in ("forward", "full")


@dataclass(frozen=True, slots=True)
class Contracts:
    """Every event schema and topic of one application, read from its declaration (no database needed)."""

    name: str
    source: str
    """The CloudEvents source of its messages."""
    dataschema: str | None
    """The relay's `ce_dataschema` template (`RelaySettings.dataschema`)."""
    events: Mapping[str, EventContract]
    topics: Mapping[str, TopicContract]

    @classmethod
    def of(cls, app: Application) -> Contracts:
        events: dict[str, EventContract] = {}
        for name, event_class in sorted(app.registry.event_types.items()):
            path, line = defined_at(event_class)
            events[name] = EventContract(
                event_type=name,
                version=event_class.schema_version,
                schema=event_schema(event_class),
                upcasts_from=app.registry.upcaster_versions(name),
                defined_at=event_class.__qualname__ if path is None else f"{path}:{line}",
            )
        routes = () if app.outbox is None else app.outbox.routes
        source = app.name if app.outbox is None else app.outbox.source
        categories: dict[str, set[str]] = {}
        for aggregate in app.aggregates:
            if aggregate.category is not None:
                categories.setdefault(aggregate.category, set()).update(e.event_type for e in aggregate.event_types())
        return cls(
            name=app.name,
            source=source,
            dataschema=app.settings.relay.dataschema,
            events=events,
            topics=_topics(routes, set(events), categories),
        )

    def schema_id(self, event_type: str, version: int) -> str | None:
        """The `$id` of a schema: the URI the relay puts in `ce_dataschema` for it."""
        if self.dataschema is None:
            return None
        return dataschema_uri(self.dataschema, self.source, event_type, version)


def _topics(
    routes: tuple[Route, ...], registered: set[str], categories: dict[str, set[str]]
) -> dict[str, TopicContract]:
    """Routes grouped by topic; a topic promises the union of its routes' promises."""
    types: dict[str, set[str]] = {}
    keys: dict[str, list[str]] = {}
    backward: dict[str, bool] = {}
    forward: dict[str, bool] = {}
    for route in routes:
        if route.types is not None:
            chosen = set(route.types)
        elif route.category is not None:
            chosen = categories.get(route.category, set())
        else:
            chosen = registered
        types.setdefault(route.topic, set()).update(chosen)
        key = route.key or "stream_id"
        if key not in keys.setdefault(route.topic, []):
            keys[route.topic].append(key)
        backward[route.topic] = backward.get(route.topic, False) or route.compatibility in ("backward", "full")
        forward[route.topic] = forward.get(route.topic, False) or route.compatibility in ("forward", "full")
    topics: dict[str, TopicContract] = {}
    for topic in sorted(types):
        promise: Compatibility = (
            "full" if backward[topic] and forward[topic]
            else "backward" if backward[topic] else "forward" if forward[topic] else "none"
        )
        topics[topic] = TopicContract(topic, tuple(sorted(types[topic])), tuple(keys[topic]), promise)
    return topics
