"""Event handlers in a runner write through a queue (runs of one statement go as one `executemany`),
without changing what a handler means: it reads its own writes, and a failing statement names its event."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from eventstore import EventStore, NewEvent, RecordedEvent, asyncpg_dsn
from projections import Projection, ProjectionAdmin, ProjectionFailed, ProjectionRunner
from tests.projections.app import caught_up

TABLES = {
    "running": "CREATE TABLE running (position bigint PRIMARY KEY, amount int NOT NULL CHECK (amount >= 0),"
    " rows_before bigint NOT NULL, total_before bigint NOT NULL)"
}


class Running(Projection):
    """Each event's row records what the handler read first: the rows and total written before it."""

    name = "running"
    tables = TABLES

    def __init__(self, *, defer_writes: bool = True) -> None:
        self.defer_writes = defer_writes
        self.statuses: list[str] = []
        super().__init__(handlers={"Added": self.added, "Noted": self.noted})

    async def added(self, conn: Any, event: RecordedEvent) -> None:
        amount = event.json()["amount"]
        if event.json().get("read", True):
            row = await conn.fetchrow("SELECT count(*) AS n, coalesce(sum(amount), 0) AS total FROM running")
            before = (row["n"], row["total"])
        else:
            before = (-1, -1)
        self.statuses.append(
            await conn.execute("INSERT INTO running VALUES ($1, $2, $3, $4)", event.position, amount, *before)
        )

    async def noted(self, conn: Any, event: RecordedEvent) -> None:
        # In a savepoint of its own: a statement inside it runs at once, and its error can be handled.
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO running VALUES ($1, -1, 0, 0)", event.position)
        except Exception as exc:
            self.statuses.append(type(exc).__name__)


async def _append(store: EventStore, amounts: list[int], *, read: bool = True) -> RecordedEvent:
    result = await store.append("tally-1", [NewEvent("Added", {"amount": a, "read": read}) for a in amounts])
    return result.events[-1]


@pytest.fixture(params=["url", "pool"])
async def any_store(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[EventStore]:
    """A store with a URL (runners connect on their own) or with a pool (runners use pooled connections)."""
    if request.param == "url":
        async with EventStore(database_url) as store:
            yield store
        return
    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=10)
    try:
        async with EventStore(pool=pool) as store:
            yield store
    finally:
        await pool.close()


async def test_handlers_read_what_they_wrote_earlier_in_the_batch(any_store: EventStore) -> None:
    store = any_store
    await _append(store, [1, 2, 3])
    await _append(store, [4], read=False)
    noted = await store.append("tally-1", [NewEvent("Noted")])
    last = await _append(store, [5, 6])
    projection = Running()
    async with ProjectionRunner(store, [projection], batch_size=100) as runner:
        await caught_up(runner, last.checkpoint)
    query = "SELECT amount, rows_before, total_before FROM running ORDER BY amount"
    rows = [tuple(r) for r in await store.pool.fetch(query)]
    assert rows == [(1, 0, 0), (2, 1, 1), (3, 2, 3), (4, -1, -1), (5, 4, 10), (6, 5, 15)]
    assert projection.statuses[-1] == "" and "CheckViolationError" in projection.statuses
    assert noted.events[0].position not in [r[0] for r in await store.pool.fetch("SELECT position FROM running")]


async def test_projection_that_does_not_defer_gets_each_status(store: EventStore) -> None:
    last = await _append(store, [1, 2], read=False)
    projection = Running(defer_writes=False)
    async with ProjectionRunner(store, [projection], batch_size=100) as runner:
        await caught_up(runner, last.checkpoint)
    assert projection.statuses == ["INSERT 0 1", "INSERT 0 1"]


@pytest.mark.parametrize("read", [True, False], ids=["flushed-by-a-read", "flushed-at-the-end"])
async def test_a_failing_queued_statement_names_its_event(store: EventStore, read: bool) -> None:
    await _append(store, [1, 2, 3], read=read)
    bad = await _append(store, [-1], read=read)
    last = await _append(store, [4, 5], read=read)
    async with ProjectionAdmin(store, [Running()]).runner(batch_size=100) as runner:
        with pytest.raises(ProjectionFailed) as failed:
            await caught_up(runner, last.checkpoint)
    assert (failed.value.event_id, failed.value.position) == (bad.event_id, bad.position)
    assert "check constraint" in str(failed.value)
    assert sorted(r[0] for r in await store.pool.fetch("SELECT amount FROM running")) == [1, 2, 3]
