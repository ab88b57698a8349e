"""What an operator does to an outbox: look at it, put dead messages back, prune published ones."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from eventstore import MAX_BIGINT, EventStore, InvalidArgument, check_int, storable_text
from outbox import sql


@dataclass(frozen=True, slots=True)
class TopicStatus:
    topic: str
    pending: int
    published: int
    dead: int
    oldest_pending: datetime | None


@dataclass(frozen=True, slots=True)
class RelayStatus:
    relay_id: str
    started_at: datetime
    expires_at: datetime
    slots: int


@dataclass(frozen=True, slots=True)
class DeadMessage:
    id: int
    topic: str
    key: str
    event_id: UUID
    event_type: str
    stream_id: str
    stream_version: int
    attempts: int
    last_error: str | None
    dead_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    topics: list[TopicStatus]
    relays: list[RelayStatus]
    dead: list[DeadMessage]

    @property
    def pending(self) -> int:
        return sum(t.pending for t in self.topics)

    @property
    def published(self) -> int:
        return sum(t.published for t in self.topics)

    @property
    def dead_count(self) -> int:
        return sum(t.dead for t in self.topics)


async def status(store: EventStore, *, dead_limit: int = 20) -> OutboxStatus:
    """Counts per topic, the running relays with their slots, and the first dead messages."""
    check_int("dead_limit", dead_limit, 0)
    async with store.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        topics = [TopicStatus(*r) for r in await conn.fetch(sql.STATUS_BY_TOPIC)]
        relays = [RelayStatus(*r) for r in await conn.fetch(sql.RELAYS)]
        dead = [DeadMessage(*r) for r in await conn.fetch(sql.DEAD_MESSAGES, dead_limit)]
    return OutboxStatus(topics, relays, dead)


async def retry_dead(
    store: EventStore, *, ids: Sequence[int] | None = None, topic: str | None = None
) -> list[int]:
    """Put dead messages (all, or those with `ids` / on `topic`) back in line; wake the relays."""
    if ids is not None and (
        isinstance(ids, str | bytes) or not isinstance(ids, Sequence)
        or not all(not isinstance(i, bool) and isinstance(i, int) and 0 <= i <= MAX_BIGINT for i in ids)
    ):
        raise InvalidArgument("ids must be a sequence of integer message ids")
    if topic is not None and (not isinstance(topic, str) or not topic or not storable_text(topic)):
        raise InvalidArgument(f"topic must be a non-empty string, got {topic!r}")
    async with store.pool.acquire() as conn:
        async with conn.transaction():
            rows = await conn.fetch(sql.RETRY_DEAD, list(ids) if ids is not None else None, topic)
        if rows:
            await conn.execute(sql.NOTIFY)
    return sorted(r["id"] for r in rows)


def check_age(older_than: object) -> float:
    """A pruning age: a finite number of seconds >= 0 (PostgreSQL's interval takes no infinity or NaN)."""
    if isinstance(older_than, bool) or not isinstance(older_than, int | float) or not 0 <= older_than < math.inf:
        raise InvalidArgument(f"older_than must be a number of seconds >= 0, got {older_than!r}")
    return older_than


async def prune_published(store: EventStore, older_than: float, *, chunk: int = 5000) -> int:
    """Delete messages published more than `older_than` seconds ago, in chunks; return how many."""
    check_age(older_than)
    check_int("chunk", chunk, 1)
    total = 0
    while True:
        result = await store.pool.execute(sql.PRUNE_PUBLISHED, older_than, chunk)
        deleted = int(result.split()[-1])
        total += deleted
        if deleted < chunk:
            return total


async def prune_orphans(store: EventStore) -> int:
    """Delete unpublished messages whose event was hard-deleted (`eventstore.lifecycle.delete`).

    Such a message can never be published (its payload is gone); messages of archived streams stay,
    to go out once the stream is restored.
    """
    result = await store.retrying(lambda: store.pool.execute(sql.PRUNE_ORPHANS))
    return int(result.split()[-1])
