"""The relay's wake-ups: no message may wait for the poll interval or the next lease check (20 s here)."""

from __future__ import annotations

import asyncio

from eventstore import EventStore, NewEvent
from outbox import Relay
from tests.outbox.conftest import Collector, relay_settings


async def test_messages_released_just_before_the_held_back_question_go_out(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    """The older transaction holding the log back ends (no NOTIFY) just before the relay asks whether it
    holds messages back: asked after a round that found nothing, 'no' sent the relay to sleep."""
    settings = relay_settings(poll_interval=60.0, lease_ttl=120.0)
    async with outbox_store.pool.acquire() as blocker:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.fetchval("SELECT pg_current_xact_id()")  # holds the log's visibility line
        await outbox_store.append("order-1", [NewEvent("OrderPlaced")])
        await asyncio.sleep(0.3)  # its NOTIFY is spent before the relay listens
        relay = Relay(outbox_store, kafka, settings)
        real, calls = relay._held_back, 0

        async def released_then_held_back(slots: list[int]) -> bool:
            nonlocal calls
            calls += 1
            if calls == 1:
                await transaction.rollback()
            return await real(slots)

        relay._held_back = released_then_held_back  # type: ignore[method-assign]
        async with relay:
            await collector.wait_count(1, timeout=10.0)
    assert calls >= 1


async def test_a_relay_whose_listener_was_killed_listens_again(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    settings = relay_settings(poll_interval=60.0, lease_ttl=120.0)
    async with Relay(outbox_store, kafka, settings) as relay:
        for n in range(2):
            await asyncio.sleep(1.5)  # slots taken, nothing to do: idle, listening
            listener = relay._wakeups._listener
            assert listener is not None and not listener.is_closed()
            await outbox_store.pool.execute("SELECT pg_terminate_backend($1)", listener.get_server_pid())
            await asyncio.sleep(0.5)
            await outbox_store.append(f"order-{n}", [NewEvent("OrderPlaced")])
            await collector.wait_count(n + 1, timeout=8.0)
