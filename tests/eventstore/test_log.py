"""The global log and the catch-up subscription under concurrent writers."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from eventstore import START, EventStore, NewEvent, RecordedEvent, Subscription


async def _write(store: EventStore, writer: int, rounds: int, committed: set[uuid.UUID], rng: random.Random) -> None:
    """Append inside transactions that stay open for a random while, so commits land out of order."""
    for n in range(rounds):
        events = [NewEvent("Written", {"writer": writer, "n": n, "i": i}) for i in range(rng.randint(1, 3))]
        abort = rng.random() < 0.15
        try:
            async with store.unit_of_work() as uow:
                await asyncio.sleep(rng.random() * 0.004)
                await uow.append(f"w{writer}-{rng.randint(0, 3)}", events)
                await asyncio.sleep(rng.random() * 0.01)
                if abort:
                    raise _Abort
        except _Abort:
            continue
        committed.update(e.event_id for e in events)


class _Abort(Exception):
    pass


async def test_subscriber_sees_every_committed_event_exactly_once(store: EventStore) -> None:
    rng = random.Random(20261126)
    for round_ in range(25):
        start = await store.head()
        committed: set[uuid.UUID] = set()
        received: list[RecordedEvent] = []
        async with store.subscribe(start, batch_size=7, poll_interval=0.05) as sub:

            async def subscriber(sub: Subscription = sub, received: list[RecordedEvent] = received) -> None:
                async for batch in sub.batches():
                    received.extend(batch)

            reader = asyncio.create_task(subscriber())
            await asyncio.gather(*(_write(store, w, 15, committed, rng) for w in range(8)))
            final = await store.last_committed()
            async with asyncio.timeout(30):
                while sub.checkpoint < final:  # noqa: ASYNC110 - the subscription has no "reached" event
                    await asyncio.sleep(0.01)
            reader.cancel()

        ids = [e.event_id for e in received]
        assert len(ids) == len(set(ids)), f"round {round_}: an event was delivered twice"
        assert set(ids) == committed, f"round {round_}: missing {len(committed - set(ids))} events"
        checkpoints = [e.checkpoint for e in received]
        assert checkpoints == sorted(checkpoints) and len(set(checkpoints)) == len(checkpoints)


async def test_reader_does_not_pass_an_open_transaction(store: EventStore) -> None:
    first = await store.append("a-1", [NewEvent("First")])
    await store.wait_until_visible(first.checkpoint)  # other databases on a shared server may hold it back
    async with store.unit_of_work() as slow:
        await slow.append("slow-1", [NewEvent("Late")])
        early = await store.append("fast-1", [NewEvent("Early")])  # commits while `slow` is still open
        seen = await store.read_all(START)
        assert [e.event_type for e in seen] == ["First"]
        assert await store.head() == seen[-1].checkpoint
    await store.wait_until_visible(early.checkpoint)
    after = await store.read_all(seen[-1].checkpoint)
    assert sorted(e.event_type for e in after) == ["Early", "Late"]


async def test_last_committed_reaches_past_what_an_open_transaction_holds_back(store: EventStore) -> None:
    first = await store.append("a-1", [NewEvent("First")])
    await store.wait_until_visible(first.checkpoint)
    async with store.unit_of_work() as slow:
        await slow.append("slow-1", [NewEvent("Late")])
        early = await store.append("fast-1", [NewEvent("Early")])
        assert await store.head() == first.checkpoint
        assert await store.last_committed() == early.checkpoint
        assert await store.held_back()
    await store.wait_until_visible(early.checkpoint)
    assert await store.head() == await store.last_committed() == early.checkpoint  # "Late" sorts before


async def test_a_subscription_looks_again_soon_when_a_transaction_that_wrote_no_event_ends(
    store: EventStore,
) -> None:
    """The transaction holding the log back sends no NOTIFY as it ends: the subscription must not
    sleep its whole poll interval (30 s here) before it delivers the event it held back."""
    async with store.subscribe(await store.last_committed(), poll_interval=30) as sub:
        waiting = asyncio.ensure_future(anext(aiter(sub)))
        await asyncio.sleep(0.3)  # it found nothing and sleeps
        async with store.pool.acquire() as blocker:
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.fetchval("SELECT pg_current_xact_id()")  # holds the log's visibility line
            await store.append("held-1", [NewEvent("Held")])  # its NOTIFY finds nothing visible yet
            await asyncio.sleep(0.3)
            await transaction.rollback()
        event = await asyncio.wait_for(waiting, 5)
    assert event.event_type == "Held"


async def test_subscription_catches_up_then_follows(store: EventStore) -> None:
    await store.append("s-1", [NewEvent("Old", {"n": i}) for i in range(5)])
    got: list[str] = []
    async with store.subscribe(START, batch_size=2, poll_interval=30) as sub:
        iterator = aiter(sub)
        for _ in range(5):
            got.append((await anext(iterator)).event_type)
        # The poll interval is 30 s: only the NOTIFY sent after commit can deliver this within 10 s.
        await store.append("s-1", [NewEvent("New")])
        got.append((await asyncio.wait_for(anext(iterator), 10)).event_type)
    assert got == ["Old"] * 5 + ["New"]


async def test_subscription_polls_when_nobody_notifies(database_url: str) -> None:
    async with EventStore(database_url, notify=False) as quiet, quiet.subscribe(START, poll_interval=0.05) as sub:
        iterator = aiter(sub)
        await quiet.append("q-1", [NewEvent("Quiet")])
        event = await asyncio.wait_for(anext(iterator), 10)
    assert event.event_type == "Quiet"


async def test_subscription_filters_by_category_and_type(store: EventStore) -> None:
    await store.append("order-1", [NewEvent("Placed"), NewEvent("Paid")])
    await store.append("cart-1", [NewEvent("Placed")])
    async with store.subscribe(START, category="order", types=["Paid"], poll_interval=0.05) as sub:
        event = await asyncio.wait_for(anext(aiter(sub)), 10)
    assert (event.stream_id, event.event_type) == ("order-1", "Paid")


async def test_subscription_survives_terminated_connections(store: EventStore) -> None:
    await store.append("t-1", [NewEvent("Before")])
    got: list[str] = []
    async with store.subscribe(START, poll_interval=0.1) as sub:
        iterator = aiter(sub)
        got.append((await anext(iterator)).event_type)
        await store.pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        await store.append("t-1", [NewEvent("After")])
        got.append((await asyncio.wait_for(anext(iterator), 20)).event_type)
    assert got == ["Before", "After"]


async def test_wait_until_visible_waits_for_older_transactions(store: EventStore) -> None:
    async with store.unit_of_work() as slow:
        await slow.append("slow-2", [NewEvent("Late")])
        result = await store.append("fast-2", [NewEvent("Early")])
        with pytest.raises(TimeoutError):
            await store.wait_until_visible(result.checkpoint, timeout=0.3)
    await store.wait_until_visible(result.checkpoint, timeout=10)
    assert {e.event_type for e in await store.read_all()} == {"Early", "Late"}
