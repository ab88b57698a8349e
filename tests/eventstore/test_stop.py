"""A store stopping while calls run: the calls under way finish, later ones get `NotStarted`, and nothing
fails with the driver's errors (before, closing the pool under them broke statements in flight)."""

from __future__ import annotations

import asyncio

from eventstore import EventStore, NewEvent, NotStarted


async def test_calls_under_way_finish_and_new_ones_are_refused_while_the_store_stops(database_url: str) -> None:
    store = EventStore(database_url, max_connections=4)
    await store.start()

    async def one(i: int) -> str:
        await asyncio.sleep(i * 0.002)
        try:
            if i % 3 == 0:
                async with store.unit_of_work() as uow:
                    await uow.append(f"u-{i}", [NewEvent("Y")])
                    await asyncio.sleep(0.01)
            elif i % 3 == 1:
                await store.append(f"s-{i}", [NewEvent("X")])
            else:
                await store.read_all()
                return "read"
        except NotStarted:
            return "refused"
        return f"{'u' if i % 3 == 0 else 's'}-{i}"

    tasks = [asyncio.ensure_future(one(i)) for i in range(150)]
    await asyncio.sleep(0.08)
    await asyncio.wait_for(store.stop(), 30)
    outcomes = await asyncio.gather(*tasks)  # any other error fails the test here
    appended = {o for o in outcomes if o not in ("read", "refused")}
    assert appended and "refused" in outcomes
    async with EventStore(database_url) as again:
        stored = {e.stream_id for e in await again.read_all(limit=1000)}
    assert stored == appended
