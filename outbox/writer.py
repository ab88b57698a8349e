"""Routing rules, declared in the database so that every append, by any process, writes its messages.

A trigger on the events table (`outbox_write`, migration 0005) turns each inserted event that a route
matches into an outbox row inside the append's own transaction: a rolled-back append leaves no
message, and a process that never heard of the outbox (a script that imported only `eventstore`, a
psql session) writes the messages all the same. The routes it follows are the rows of
`outbox_routes`, which `Outbox.declare` replaces with the application's declaration.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from eventstore import EventStore, storable_text
from eventstore.model import UNSTORABLE
from eventstore.query import check_tag
from outbox import sql
from outbox.errors import InvalidRoute

log = logging.getLogger(__name__)

Compatibility = Literal["backward", "forward", "full", "none"]
"""What a topic promises its consumers when an event's schema changes (checked by `eventstore schemas check`).

backward: consumers on the new schema read messages written with the old one (upgrade consumers first);
forward: consumers still on the old schema read messages written with the new one (upgrade producers
first); full: both; none: no promise.
"""
COMPATIBILITY: tuple[Compatibility, ...] = get_args(Compatibility)

_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_KEY_PATH = re.compile(r"^(data|metadata)(\.[^.\s]+)+$")


def _array_literal(items: Sequence[str] | None) -> str:
    """A PostgreSQL text[] literal; '' for none (see `sql.INSERT_ROUTES`)."""
    if items is None:
        return ""
    quoted = ('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"' for item in items)
    return "{" + ",".join(quoted) + "}"


@dataclass(frozen=True, slots=True, init=False)
class Route:
    """Events of `types` (and/or `category`, and/or carrying `tag`) go to `topic`, keyed by `key` (default: the
    stream id).

    `key` names a field of the event: `"data.customer_id"` or `"metadata.tenant"` (dots go deeper). The
    key decides the Kafka partition and the order guarantee: a key's messages are published in the
    order of the log. An event without that field is refused (`AppendRefused`), so no message is ever
    keyed by accident.

    `compatibility` is the promise the topic makes its consumers about schema changes (see
    `Compatibility`); the relay ignores it, `eventstore schemas check` enforces it.
    """

    topic: str
    types: frozenset[str] | None
    category: str | None
    key: str | None
    tag: str | None
    compatibility: Compatibility

    def __init__(
        self,
        topic: str,
        types: Collection[str] | None = None,
        *,
        category: str | None = None,
        key: str | None = None,
        tag: str | None = None,
        compatibility: Compatibility = "backward",
    ) -> None:
        if not isinstance(topic, str) or not _TOPIC.match(topic) or topic in (".", ".."):
            raise InvalidRoute(f"{topic!r} is not a valid Kafka topic name ([A-Za-z0-9._-], 1-249 chars)")
        if isinstance(types, str) or not (types is None or isinstance(types, Iterable)):
            raise InvalidRoute(f"types must be a collection of event types, got {types!r}")
        listed = None if types is None else list(types)
        if listed is not None and (
            not listed or not all(isinstance(t, str) and t and storable_text(t) for t in listed)
        ):
            raise InvalidRoute(
                f"types must be a non-empty collection of non-empty strings without {UNSTORABLE} (or None: all)"
            )
        chosen = None if listed is None else frozenset(listed)
        if category is not None and (not isinstance(category, str) or not category or not storable_text(category)):
            raise InvalidRoute(f"category must be a non-empty string without {UNSTORABLE} (or None: all)")
        if key is not None and (not isinstance(key, str) or not _KEY_PATH.match(key) or not storable_text(key)):
            raise InvalidRoute(
                f"key must name a field of the event, like 'data.customer_id' or 'metadata.tenant', got {key!r}"
            )
        if compatibility not in COMPATIBILITY:
            raise InvalidRoute(f"compatibility must be one of {', '.join(COMPATIBILITY)}, got {compatibility!r}")
        object.__setattr__(self, "topic", topic)
        object.__setattr__(self, "types", chosen)
        object.__setattr__(self, "category", category)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "tag", None if tag is None else check_tag(tag, InvalidRoute))
        object.__setattr__(self, "compatibility", compatibility)

    @property
    def key_path(self) -> list[str] | None:
        return None if self.key is None else self.key.split(".")


class Outbox:
    """The application's routes, and the CloudEvents `source` its messages carry.

    `await outbox.declare(store)` makes the database follow exactly these routes from then on, for every
    writer. Every matching route yields a message (fan-out to several topics); events no route matches
    yield none. Declare the same routes from every process of one application: the last declaration wins.
    """

    def __init__(self, routes: Sequence[Route], *, source: str = "eventstore") -> None:
        if isinstance(routes, Route) or not isinstance(routes, Iterable):
            raise InvalidRoute(f"routes must be a sequence of Route, got {routes!r}")
        routes = tuple(routes)
        if not all(isinstance(r, Route) for r in routes):
            raise InvalidRoute("routes must be a sequence of Route")
        topics = [r.topic for r in routes]
        twice = sorted({t for t in topics if topics.count(t) > 1})
        if twice:  # a message is one per event and topic: the second route's message would never be written
            raise InvalidRoute(f"topic {twice[0]!r} has more than one route: give each topic one route")
        if not isinstance(source, str) or not source:
            raise InvalidRoute("source (the CloudEvents source attribute) must be a non-empty string")
        self.routes = tuple(routes)
        self.source = source

    def _rows(self) -> list[tuple[int, str, str, str | None, str | None, str, str]]:
        return [
            (
                number,
                route.topic,
                _array_literal(None if route.types is None else sorted(route.types)),
                route.category,
                route.tag,
                _array_literal(route.key_path),
                self.source,
            )
            for number, route in enumerate(self.routes)
        ]

    async def declare(self, store: EventStore) -> bool:
        """Replace the routes in the database with these; return whether they changed."""
        rows = self._rows()

        async def replace() -> bool:
            async with store.pool.acquire() as conn, conn.transaction():
                await conn.execute(sql.LOCK_ROUTES)
                current = [
                    (r["route"], r["topic"], _array_literal(r["event_types"]), r["category"], r["tag"],
                     _array_literal(r["key_path"]), r["source"])
                    for r in await conn.fetch(sql.ROUTES)
                ]
                if current == rows:
                    return False
                await conn.execute(sql.DELETE_ROUTES)
                if rows:
                    await conn.execute(sql.INSERT_ROUTES, *(list(column) for column in zip(*rows, strict=True)))
                return True

        changed = await store.retrying(replace)
        if changed:
            log.info("outbox routes declared: %s", ", ".join(r.topic for r in self.routes) or "none")
        return changed
