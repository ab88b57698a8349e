"""Planner statistics after a bulk load: `refresh_statistics` analyzes `events` only when they are stale."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from eventstore import EventStore, InvalidArgument, NewEvent, asyncpg_dsn

CHANGES = """
SELECT s.n_mod_since_analyze, s.last_analyze FROM pg_stat_user_tables AS s WHERE s.relid = 'events'::regclass
"""


async def bulk_load_after_analyze(store: EventStore, before: int, after: int) -> None:
    """`before` events, ANALYZE, then `after` more: statistics of a table a fraction of its size."""
    await store.pool.execute("ALTER TABLE events SET (autovacuum_enabled = false)")  # no ANALYZE behind our back
    await store.append("small-1", [NewEvent("Loaded", {"n": n}) for n in range(before)])
    await _changes_at_least(store, before)  # reported before the ANALYZE that counts from zero again
    await store.pool.execute("ANALYZE events")
    for chunk in range(after // 1000):
        await store.append(f"bulk-{chunk}", [NewEvent("Loaded", {"n": n}) for n in range(1000)])
    await _changes_at_least(store, after)


async def _changes_at_least(store: EventStore, count: int) -> None:
    """The writers' backends report their row counts to the statistics system a moment after commit."""
    async with asyncio.timeout(20):
        while True:
            if (await store.pool.fetchrow(CHANGES))[0] >= count:
                return
            await asyncio.sleep(0.1)


async def analyzed(store: EventStore) -> bool:
    async with asyncio.timeout(20):
        while True:
            changes, analyzed = await store.pool.fetchrow(CHANGES)
            if analyzed is not None and changes == 0:
                return True
            await asyncio.sleep(0.1)


async def test_analyzes_a_table_that_more_than_doubled_since_its_statistics_and_only_then(store: EventStore) -> None:
    await bulk_load_after_analyze(store, 200, 3000)
    assert not await store.refresh_statistics(min_changes=5000), "3,000 changed rows are below the floor"
    assert await store.refresh_statistics(min_changes=1000)
    assert await analyzed(store)
    assert not await store.refresh_statistics(min_changes=1000), "fresh statistics are left alone"


async def test_a_vacuum_after_the_load_does_not_hide_stale_statistics(store: EventStore) -> None:
    """VACUUM counts the table's rows again (`reltuples`) but leaves the planner's statistics as they were."""
    await bulk_load_after_analyze(store, 200, 3000)
    await store.pool.execute("VACUUM events")
    assert await store.refresh_statistics(min_changes=1000)


async def test_a_table_that_grew_by_less_than_its_size_is_left_to_autovacuum(store: EventStore) -> None:
    await bulk_load_after_analyze(store, 3000, 2000)
    assert not await store.refresh_statistics(min_changes=1000)


@contextlib.asynccontextmanager
async def _store_whose_sessions_run(database_url: str, statement: str) -> AsyncIterator[EventStore]:
    """A store on a pool of its own whose connections run `statement` as they are handed out."""

    async def setup(conn: asyncpg.Connection) -> None:
        await conn.execute(statement)

    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=2, setup=setup)
    try:
        async with EventStore(pool=pool, check_schema=False) as store:
            yield store
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def _role(store: EventStore) -> AsyncIterator[str]:
    role = f"reader_{uuid.uuid4().hex[:8]}"
    await store.pool.execute(f'CREATE ROLE "{role}"')
    try:
        yield role
    finally:
        await store.pool.execute(f'REVOKE ALL ON events FROM "{role}"')
        await store.pool.execute(f'DROP ROLE "{role}"')


async def test_a_role_that_may_not_analyze_gets_a_warning_and_nothing_else(
    store: EventStore, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await bulk_load_after_analyze(store, 200, 3000)
    async with _role(store) as role, _store_whose_sessions_run(database_url, f'SET ROLE "{role}"') as reader:
        with caplog.at_level(logging.WARNING, logger="eventstore.store"):
            assert not await reader.refresh_statistics(min_changes=1000)
    assert any("run ANALYZE events" in r.getMessage() for r in caplog.records)
    assert (await store.pool.fetchrow(CHANGES))[0] >= 3000, "nothing was analyzed"


async def test_never_waits_for_a_vacuum_holding_the_table_and_says_it_did_not_analyze(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    await bulk_load_after_analyze(store, 200, 3000)
    async with store.pool.acquire() as vacuum, vacuum.transaction():
        await vacuum.execute("LOCK TABLE events IN SHARE UPDATE EXCLUSIVE MODE")  # what a vacuum holds
        async with asyncio.timeout(5):
            with caplog.at_level(logging.WARNING, logger="eventstore.store"):
                assert not await store.refresh_statistics(min_changes=1000)
    assert any("not analyzed" in r.getMessage() for r in caplog.records)
    assert (await store.pool.fetchrow(CHANGES))[0] >= 3000, "nothing was analyzed"


async def test_waits_at_most_a_second_for_a_transaction_that_changed_the_table_and_holds_no_lock(
    store: EventStore,
) -> None:
    """A GRANT left open (an operator's migration) takes no lock ANALYZE would skip, yet ANALYZE waits
    for it to update the table's catalog row: a runner's start must not wait with it."""
    await bulk_load_after_analyze(store, 200, 3000)
    async with _role(store) as role:
        async with store.pool.acquire() as admin, admin.transaction():
            await admin.execute(f'GRANT SELECT ON events TO "{role}"')
            async with asyncio.timeout(5):
                assert not await store.refresh_statistics(min_changes=1000)
        assert await store.refresh_statistics(min_changes=1000), "it analyzes once the transaction ended"
    locks = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = " \
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
    assert await store.pool.fetchval(locks) == 0


async def test_a_statement_timeout_of_the_role_is_a_warning_not_an_error(
    store: EventStore, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await bulk_load_after_analyze(store, 200, 3000)
    impatient = "SET statement_timeout = '300ms'"  # shorter than the lock wait it allows itself
    async with (
        _role(store) as role, _store_whose_sessions_run(database_url, impatient) as hurried,
        store.pool.acquire() as admin,admin.transaction()
    ):
        await admin.execute(f'GRANT SELECT ON events TO "{role}"')  # ANALYZE waits for it
        with caplog.at_level(logging.WARNING, logger="eventstore.store"):
            assert not await hurried.refresh_statistics(min_changes=1000)
    assert any("statement timeout" in r.getMessage() for r in caplog.records)


async def test_refuses_a_bad_floor(store: EventStore) -> None:
    for bad in (-1, 2**63, 1.5, "10", True):
        with pytest.raises(InvalidArgument):
            await store.refresh_statistics(min_changes=bad)  # type: ignore[arg-type]
