"""Subscriptions and writers' NOTIFYs: no event may wait for the poll interval (120 s in these tests)."""

from __future__ import annotations

import asyncio

from eventstore import EventStore, NewEvent


async def test_events_released_just_before_the_held_back_question_are_delivered(store: EventStore) -> None:
    """The older transaction holding the log back ends (no NOTIFY) just before the subscription asks
    whether it holds events back: asked after a read that found nothing, 'no' sent it to sleep."""
    start = await store.last_committed()
    async with store.pool.acquire() as blocker:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.fetchval("SELECT pg_current_xact_id()")  # holds the log's visibility line
        await store.append("held-1", [NewEvent("Held")])
        await asyncio.sleep(0.3)  # its NOTIFY is spent
        real, calls = store.held_back, 0

        async def released_then_held_back() -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                await transaction.rollback()  # released just before the question
            return await real()

        store.held_back = released_then_held_back  # type: ignore[method-assign]
        async with store.subscribe(start, poll_interval=120) as sub:
            event = await asyncio.wait_for(anext(aiter(sub)), 10)
    assert event.event_type == "Held" and calls >= 1


async def test_events_held_back_long_are_delivered_within_a_second_or_so_of_the_release(store: EventStore) -> None:
    """The looks at a log holding events back grow from 20 ms to a second, not to the poll interval: a
    six-second hold delayed them by four more seconds before."""
    loop = asyncio.get_running_loop()
    async with store.subscribe(await store.last_committed(), poll_interval=120) as sub:
        waiting = asyncio.ensure_future(anext(aiter(sub)))
        await asyncio.sleep(0.3)
        async with store.pool.acquire() as blocker:
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.fetchval("SELECT pg_current_xact_id()")
            await store.append("held-1", [NewEvent("Held")])
            await asyncio.sleep(6)  # a batch job's transaction
            await transaction.rollback()
        released = loop.time()
        await asyncio.wait_for(waiting, 60)
    assert loop.time() - released < 3


async def test_an_append_right_after_the_notifier_connection_died_still_notifies(store: EventStore) -> None:
    await store.append("warm-1", [NewEvent("Warm")])
    await asyncio.sleep(0.1)
    async with store.subscribe(await store.last_committed(), poll_interval=120) as sub:
        iterator = aiter(sub)
        for n in range(3):
            waiting = asyncio.ensure_future(anext(iterator))
            await asyncio.sleep(0.3)
            notifier = store._notifier
            assert notifier is not None and not notifier.is_closed()
            await store.pool.execute("SELECT pg_terminate_backend($1)", notifier.get_server_pid())
            await store.append("after-1", [NewEvent("After", {"n": n})])
            event = await asyncio.wait_for(waiting, 5)
            assert event.json() == {"n": n}


async def test_a_subscription_whose_listener_was_killed_listens_again(store: EventStore) -> None:
    async with store.subscribe(await store.last_committed(), poll_interval=120) as sub:
        for n in range(2):
            waiting = asyncio.ensure_future(anext(aiter(sub)))
            await asyncio.sleep(0.5)  # found nothing, sleeps on its wake-up
            listener = sub._listener
            assert listener is not None and not listener.is_closed()
            await store.pool.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
            await asyncio.sleep(0.5)
            await store.append("after-1", [NewEvent("After", {"n": n})])
            event = await asyncio.wait_for(waiting, 10)
            assert event.json() == {"n": n}


async def test_a_subscription_on_a_bare_pool_polls_at_its_poll_interval(store: EventStore) -> None:
    """Without a URL it cannot listen: that is no lost listener to hurry back to, so it polls at its pace."""
    from eventstore import EventStore as Store

    reads = 0
    bare = Store(pool=store.pool)
    real = bare.read_all

    async def counted(*args: object, **kwargs: object) -> list[object]:
        nonlocal reads
        reads += 1
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    bare.read_all = counted  # type: ignore[method-assign]
    async with bare.subscribe(await store.last_committed(), poll_interval=30) as sub:
        waiting = asyncio.ensure_future(anext(aiter(sub)))
        await asyncio.sleep(5.6)  # past the 5 s at which a subscription that lost its listener looks again
        waiting.cancel()
    assert reads == 2, f"{reads} reads in 5.6 s with a poll interval of 30 s"  # catching up, then asking first


async def test_a_subscription_closed_while_it_connects_its_listener_leaves_no_connection(
    store: EventStore,
) -> None:
    sub = store.subscribe(await store.last_committed(), poll_interval=120)
    listening = asyncio.ensure_future(sub._listen())
    await asyncio.sleep(0)  # connecting
    await sub.close()
    await listening
    assert sub._listener is None
    for _ in range(50):  # the terminated backend goes away
        left = await store.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%'"
        )
        if not left:
            break
        await asyncio.sleep(0.05)
    assert left == 0


async def test_a_listener_lost_again_soon_after_it_listened_again_is_replaced_at_once(store: EventStore) -> None:
    """Only failed attempts to listen are spaced by `LISTEN_RETRY`: after one that succeeded, the next loss
    listens again at once (a tenth of a second later at the earliest), not seconds later."""
    async with store.subscribe(await store.last_committed(), poll_interval=120) as sub:
        loop = asyncio.get_running_loop()
        for n in range(3):
            waiting = asyncio.ensure_future(anext(aiter(sub)))
            await asyncio.sleep(0.3)
            listener = sub._listener
            assert listener is not None and not listener.is_closed()
            assert sub._next_listen_attempt - loop.time() <= 0.1
            await store.pool.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
            await asyncio.sleep(0.3)
            await store.append("again-1", [NewEvent("After", {"n": n})])
            assert (await asyncio.wait_for(waiting, 10)).json() == {"n": n}
