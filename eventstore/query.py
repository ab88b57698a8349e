"""Queries of events by type and tag, and the conditions of conditional appends (dynamic consistency boundaries).

A decision reads the events that matter to it with a `Query`, then appends with a `Condition`: the query
and the checkpoint of its read. The append fails, writing nothing, if any event matching the query was
appended after that checkpoint.

Concurrency is settled by transaction-level advisory locks on hashes of (type, tag) pairs, never by a
table lock, so only appends whose decisions overlap wait for each other:

- a condition locks, exclusively, one key per item and type: (type, tag) for an item with types and
  tags (any one of its tags will do: every matching event has all of them), (any type, tag) for an
  item with tags only, and (type, no tag) for an item with types only;
- an append takes, shared, every key a condition matching one of its events could lock: for an event
  of type T with tags S, (T, no tag) and, for each s in S, (T, s) and (any type, s).

So writers never wait for writers, a check waits for the writers of the events it could match (and
then sees them), and those writers wait for the check's transaction to end. Keys are taken in one
sorted pass, so two appends never deadlock each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import orjson

from eventstore.errors import InvalidAppend, InvalidArgument
from eventstore.model import UNSTORABLE, Checkpoint, RecordedEvent, storable_text
from eventstore.schema import MAX_EVENT_TYPE_LENGTH

MAX_TAG_LENGTH = 255
MAX_TAGS_PER_EVENT = 32
MAX_LOCK_KEYS = 1024
"""Distinct lock keys one append may take: each is an entry in PostgreSQL's shared lock table."""

# Bits of a lock key's mode, as the append function reads them.
WRITTEN = 1
CHECKED = 2


def check_tag(tag: object, error: type[InvalidArgument] = InvalidArgument) -> str:
    if not isinstance(tag, str):
        raise error(f"a tag must be a string, got {type(tag).__name__}")
    if not tag:
        raise error("a tag must not be empty")
    if len(tag) > MAX_TAG_LENGTH:
        raise error(f"tag is {len(tag)} characters, over the limit of {MAX_TAG_LENGTH}")
    if not storable_text(tag):
        raise error(f"a tag must not contain {UNSTORABLE}")
    return tag


def check_tags(tags: object, error: type[InvalidArgument] = InvalidArgument) -> tuple[str, ...]:
    """Tags as given (a collection of strings, not one string), deduplicated in their first order."""
    if type(tags) is tuple and not tags:  # most events have none: no ABC check (µs of every event of a batch)
        return ()
    if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
        raise error(f"tags must be a collection of strings, got {tags!r}")
    checked = tuple(dict.fromkeys(check_tag(t, error) for t in tags))
    if len(checked) > MAX_TAGS_PER_EVENT:
        raise error(f"{len(checked)} tags, over the limit of {MAX_TAGS_PER_EVENT}")
    return checked


def _check_types(types: object) -> tuple[str, ...]:
    if isinstance(types, str | bytes) or not isinstance(types, Iterable):
        raise InvalidArgument(f"types must be a collection of event type names, got {types!r}")
    out: list[str] = []
    for t in types:
        if not isinstance(t, str) or not t or len(t) > MAX_EVENT_TYPE_LENGTH or not storable_text(t):
            raise InvalidArgument(f"bad event type {t!r} in a query item")
        out.append(t)
    return tuple(sorted(set(out)))


@dataclass(frozen=True, slots=True, init=False)
class QueryItem:
    """Events of one of `types` (any type if none) that carry all of `tags` (any tags if none)."""

    types: tuple[str, ...]
    tags: tuple[str, ...]

    def __init__(self, types: Iterable[str] = (), tags: Iterable[str] = ()) -> None:
        checked_types = _check_types(types)
        checked_tags = tuple(sorted(check_tags(tags)))
        if not checked_types and not checked_tags:
            raise InvalidArgument("a query item needs at least one event type or tag")
        object.__setattr__(self, "types", checked_types)
        object.__setattr__(self, "tags", checked_tags)

    def matches(self, event_type: str, tags: Iterable[str]) -> bool:
        if self.types and event_type not in self.types:
            return False
        return not self.tags or set(self.tags).issubset(tags)


@dataclass(frozen=True, slots=True, init=False)
class Query:
    """Events matching any of its items. `Query(QueryItem(...), ...)`, or `Query.of(types=..., tags=...)`."""

    items: tuple[QueryItem, ...]

    def __init__(self, *items: QueryItem) -> None:
        if not items:
            raise InvalidArgument("a query needs at least one item")
        for item in items:
            if not isinstance(item, QueryItem):
                raise InvalidArgument(f"query items must be QueryItem instances, got {type(item).__name__}")
        object.__setattr__(self, "items", tuple(dict.fromkeys(items)))

    @classmethod
    def of(cls, types: Iterable[str] = (), tags: Iterable[str] = ()) -> Query:
        """A query of one item."""
        return cls(QueryItem(types, tags))

    def __or__(self, other: Query) -> Query:
        """Events matching either query: how a decision combines the queries of its projections."""
        return Query(*self.items, *other.items)

    def matches(self, event: RecordedEvent) -> bool:
        tags = event.tags
        return any(item.matches(event.event_type, tags) for item in self.items)


class Condition(NamedTuple):
    """Fail the append if an event matching `query` was appended after `after` (the read's checkpoint).

    `seen` are the positions of matching events after `after` that the decision did read: a read of
    everything committed (`EventStore.read_with_condition`) sees some events the log does not show yet.
    """

    query: Query
    after: Checkpoint
    seen: tuple[int, ...] = ()


# -- what the SQL takes ------------------------------------------------------------------------------


class Branches(NamedTuple):
    """A query as parallel arrays, one entry per index scan the statements run.

    An item with tags scans the tag index for its first tag and filters on its types and other tags;
    an item with types only scans the type index once per type.
    """

    tags: list[str | None]
    types: list[str | None]
    type_sets: list[str | None]
    other_tags: list[str | None]


def branches(query: Query) -> Branches:
    out = Branches([], [], [], [])
    for item in query.items:
        if item.tags:
            out.tags.append(item.tags[0])
            out.types.append(None)
            out.type_sets.append(orjson.dumps(item.types).decode() if item.types else None)
            out.other_tags.append(orjson.dumps(item.tags[1:]).decode())
        else:
            for event_type in item.types:
                out.tags.append(None)
                out.types.append(event_type)
                out.type_sets.append(None)
                out.other_tags.append(None)
    return out


def _key(*parts: str) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8, person=b"eventstore-dcb").digest()
    return int.from_bytes(digest, "big", signed=True)


def condition_keys(query: Query) -> set[int]:
    keys: set[int] = set()
    for item in query.items:
        if not item.tags:
            keys.update(_key("type", t) for t in item.types)
        elif not item.types:
            keys.add(_key("tag", item.tags[0]))
        else:
            keys.update(_key("type+tag", t, item.tags[0]) for t in item.types)
    return keys


def written_keys(types: Sequence[str], tags: Sequence[Sequence[str]]) -> set[int]:
    keys: set[int] = set()
    for event_type, event_tags in zip(types, tags, strict=True):
        keys.add(_key("type", event_type))
        for tag in event_tags:
            keys.add(_key("type+tag", event_type, tag))
            keys.add(_key("tag", tag))
    return keys


def lock_plan(
    condition: Query | None, types: Sequence[str], tags: Sequence[Sequence[str]]
) -> tuple[list[int], list[int]]:
    """Sorted lock keys and their modes (bits WRITTEN, CHECKED; checked ones are taken exclusively)."""
    modes: dict[int, int] = dict.fromkeys(written_keys(types, tags), WRITTEN)
    if condition is not None:
        for key in condition_keys(condition):
            modes[key] = modes.get(key, 0) | CHECKED
    if len(modes) > MAX_LOCK_KEYS:
        raise InvalidAppend(
            f"this append would take {len(modes)} locks, over the limit of {MAX_LOCK_KEYS}: "
            "split it, or use fewer distinct tags"
        )
    keys = sorted(modes)
    return keys, [modes[k] for k in keys]
