"""The store keeps the last connection of its own statements as a spare: it must never cost anyone else."""

from __future__ import annotations

import asyncio

import pytest

from eventstore import EventStore, NewEvent, WrongExpectedVersion
from eventstore.store import SPARE_IDLE


async def test_the_spare_goes_back_to_the_pool_when_idle(database_url: str) -> None:
    async with EventStore(database_url, min_connections=2, max_connections=2) as store:
        await store.append("spare-1", [NewEvent("Happened")])
        assert store.pool.get_idle_size() == store.pool.get_size() - 1, "kept as the spare"
        await asyncio.sleep(SPARE_IDLE * 4)
        assert store.pool.get_idle_size() == store.pool.get_size(), "handed back once idle"
        # Units of work and the application's own queries get every connection of the pool.
        async with store.pool.acquire() as a, store.pool.acquire() as b:
            assert await a.fetchval("SELECT 1") == await b.fetchval("SELECT 1") == 1


async def test_the_spare_is_not_kept_when_the_pool_has_nothing_else_free(database_url: str) -> None:
    async with EventStore(database_url, min_connections=1, max_connections=1) as store:
        await store.append("spare-2", [NewEvent("Happened")])
        assert store.pool.get_idle_size() == 1
        async with store.unit_of_work() as uow:
            await uow.append("spare-2", [NewEvent("Happened")])
        assert len(await store.read_stream("spare-2")) == 2


async def test_a_terminated_spare_is_replaced_and_the_append_written_once(store: EventStore) -> None:
    await store.append("spare-3", [NewEvent("First")])
    await store.pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )
    await store.append("spare-3", [NewEvent("Second")], 0)
    assert [e.event_type for e in await store.read_stream("spare-3")] == ["First", "Second"]


async def test_an_append_cancelled_on_the_spare_leaves_no_connection_behind(database_url: str) -> None:
    async with EventStore(database_url, min_connections=1, max_connections=3) as store:
        await store.append("spare-4", [NewEvent("First")])  # the spare now
        async with store.unit_of_work() as uow:
            await uow.append("spare-4", [NewEvent("Held")])  # holds the stream's row lock
            blocked = asyncio.create_task(store.append("spare-4", [NewEvent("Blocked")], 0))
            await asyncio.sleep(0.3)
            assert not blocked.done()
            blocked.cancel()
            with pytest.raises(asyncio.CancelledError):
                await blocked
        with pytest.raises(WrongExpectedVersion):
            await store.append("spare-4", [NewEvent("Stale")], 0)
        await store.append("spare-4", [NewEvent("Last")], 1)
        assert [e.event_type for e in await store.read_stream("spare-4")] == ["First", "Held", "Last"]
        await asyncio.sleep(SPARE_IDLE * 4)
        assert store.pool.get_idle_size() == store.pool.get_size(), "every connection back in the pool"


async def test_concurrent_appends_keep_spares_but_never_the_last_free_connection(database_url: str) -> None:
    async with EventStore(database_url, min_connections=1, max_connections=4) as store:
        pool = store.pool
        # Every connection opened first: on a slow machine a spare could otherwise sit out its idle time
        # while the pool connects the others, and be handed back before the appends end.
        async with pool.acquire(), pool.acquire(), pool.acquire(), pool.acquire():
            pass
        await asyncio.gather(*(store.append(f"spare-5{w}", [NewEvent("Happened")]) for w in range(6)))
        assert pool.get_idle_size() >= 1 or pool.get_size() < pool.get_max_size(), "one left for others"
        kept = pool.get_size() - pool.get_idle_size()
        assert kept >= 2, "concurrent calls left several spares"
        # A unit of work and a direct user of the pool get connections at once, and all of them at the end.
        async with store.unit_of_work() as uow:
            await uow.append("spare-5x", [NewEvent("Happened")])
        await asyncio.sleep(SPARE_IDLE * 4)
        assert pool.get_idle_size() == pool.get_size(), "every spare handed back once idle"
        async with pool.acquire() as a, pool.acquire() as b, pool.acquire() as c, pool.acquire() as d:
            assert {await x.fetchval("SELECT 1") for x in (a, b, c, d)} == {1}


async def test_a_spare_whose_session_ended_while_idle_is_dropped_without_an_error(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncpg takes a connection whose server session ended back into the pool by itself, and refuses
    every call on its proxy afterwards: the spare must be dropped, not used (the append was retried)."""
    await store.append("spare-5", [NewEvent("First")])
    await store.pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    )
    await asyncio.sleep(0.2)  # the loop sees the session end
    with caplog.at_level("WARNING"):
        await store.append("spare-5", [NewEvent("Second")], 0)
    assert "connection lost" not in caplog.text and "released back to the pool" not in caplog.text
    assert [e.event_type for e in await store.read_stream("spare-5")] == ["First", "Second"]
