"""The store's own statements skip the pool's connection reset; everything else is still reset."""

from __future__ import annotations

from eventstore import EventStore, NewEvent


async def test_session_state_set_through_the_pool_is_reset(database_url: str) -> None:
    async with EventStore(database_url, min_connections=1, max_connections=1) as store:
        await store.append("reset-1", [NewEvent("Happened")])
        async with store.pool.acquire() as conn:
            await conn.execute("SET application_name = 'left behind'")
            await conn.execute("LISTEN somewhere")
        await store.read_stream("reset-1")
        async with store.pool.acquire() as conn:  # the one connection again
            assert await conn.fetchval("SHOW application_name") != "left behind"
            assert await conn.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
            await conn.execute("SET application_name = 'left behind'")
        # An append or a read of the store's own right after: the next user still gets a clean session.
        await store.append("reset-1", [NewEvent("Happened")])
        assert await store.pool.fetchval("SHOW application_name") != "left behind"
        async with store.unit_of_work() as uow:
            await uow.connection.execute("SET application_name = 'left behind'")
            await uow.append("reset-1", [NewEvent("Happened")])
        assert await store.pool.fetchval("SHOW application_name") != "left behind"
        assert len(await store.read_stream("reset-1")) == 3
