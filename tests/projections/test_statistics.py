"""Runners and rebuilds starting after a bulk load analyze the log first (`EventStore.refresh_statistics`)."""

from __future__ import annotations

import asyncpg

from eventstore import EventStore, RecordedEvent
from projections import Projection, ProjectionAdmin, ProjectionRunner, handles
from tests.eventstore.test_statistics import analyzed, bulk_load_after_analyze


class Loaded(Projection):
    name = "loaded"
    tables = {"loaded": "CREATE TABLE loaded (n bigint NOT NULL)"}

    @handles("Loaded", batch=True)
    async def loaded(self, conn: asyncpg.Connection, events: list[RecordedEvent]) -> None:
        await conn.execute("INSERT INTO loaded SELECT count(*) FROM unnest($1::int[])", [0] * len(events))


async def test_a_runner_starting_after_a_bulk_load_analyzes_the_log_first(store: EventStore) -> None:
    await bulk_load_after_analyze(store, 200, 11_000)
    async with ProjectionRunner(store, [Loaded()], batch_size=1000) as runner:
        assert await analyzed(store)
        await runner.wait_caught_up()
    assert await store.pool.fetchval("SELECT sum(n) FROM loaded") == 11_200


async def test_a_rebuild_after_a_bulk_load_analyzes_the_log_first(store: EventStore) -> None:
    admin = ProjectionAdmin(store, [Loaded()])
    async with admin.runner(batch_size=1000) as runner:
        await runner.wait_caught_up()
    await bulk_load_after_analyze(store, 200, 11_000)
    await admin.rebuild("loaded", batch_size=1000)
    assert await analyzed(store)
    assert await store.pool.fetchval("SELECT sum(n) FROM loaded") == 11_200
