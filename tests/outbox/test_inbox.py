"""The idempotent inbox: a redelivered message is skipped, an effect and its record commit together."""

from __future__ import annotations

import asyncio
import math

import orjson
import pytest
from aiokafka import AIOKafkaConsumer

from eventstore import EventStore, InvalidArgument, NewEvent, UnitOfWork
from outbox import Inbox, Relay, from_record
from outbox.inbox import Effect
from tests.outbox.conftest import relay_settings

LEDGER = "CREATE TABLE ledger (message_id text NOT NULL, amount int NOT NULL)"


async def _ledger(store: EventStore) -> list[tuple[str, int]]:
    return [tuple(r) for r in await store.pool.fetch("SELECT message_id, amount FROM ledger ORDER BY amount")]


async def test_a_redelivered_message_is_skipped(store: EventStore) -> None:
    await store.pool.execute(LEDGER)
    inbox = Inbox(store, "billing")

    def credit(message_id: str, amount: int) -> Effect:
        async def effect(uow: UnitOfWork) -> None:
            await uow.connection.execute("INSERT INTO ledger VALUES ($1, $2)", message_id, amount)

        return effect

    assert await inbox.handle("m1", credit("m1", 10))
    assert not await inbox.handle("m1", credit("m1", 10))
    assert await inbox.handle("m2", credit("m2", 20))
    assert not await inbox.handle("m1", credit("m1", 10))
    assert await _ledger(store) == [("m1", 10), ("m2", 20)]
    assert await inbox.seen("m1") and not await inbox.seen("m3")
    # Another consumer has an inbox of its own.
    assert not await Inbox(store, "shipping").seen("m1")


async def test_a_failed_effect_records_nothing_so_the_message_is_handled_again(store: EventStore) -> None:
    await store.pool.execute(LEDGER)
    inbox = Inbox(store, "billing")

    async def failing(uow: UnitOfWork) -> None:
        await uow.connection.execute("INSERT INTO ledger VALUES ('m1', 1)")
        raise RuntimeError("downstream failed")

    async def working(uow: UnitOfWork) -> None:
        await uow.connection.execute("INSERT INTO ledger VALUES ('m1', 2)")

    with pytest.raises(RuntimeError):
        await inbox.handle("m1", failing)
    assert not await inbox.seen("m1")
    assert await inbox.handle("m1", working)
    assert await _ledger(store) == [("m1", 2)]


async def test_concurrent_deliveries_of_one_message_apply_it_once(store: EventStore) -> None:
    await store.pool.execute(LEDGER)
    inbox = Inbox(store, "billing")

    async def slow_credit(uow: UnitOfWork) -> None:
        await uow.connection.execute("INSERT INTO ledger VALUES ('m1', 5)")
        await asyncio.sleep(0.05)

    outcomes = await asyncio.gather(*(inbox.handle("m1", slow_credit) for _ in range(8)))
    assert sorted(outcomes) == [False] * 7 + [True]
    assert await _ledger(store) == [("m1", 5)]


async def test_record_joins_the_callers_transaction(store: EventStore) -> None:
    inbox = Inbox(store, "projector")
    with pytest.raises(RuntimeError):
        async with store.unit_of_work() as uow:
            assert await inbox.record(uow.connection, "m1")
            assert not await inbox.record(uow.connection, "m1")
            raise RuntimeError("rolled back")
    assert not await inbox.seen("m1")


async def test_effects_may_append_events_atomically_with_the_record(store: EventStore) -> None:
    inbox = Inbox(store, "shipping")

    async def ship(uow: UnitOfWork) -> None:
        await uow.append("shipment-1", [NewEvent("ShipmentRequested")])

    assert await inbox.handle("m1", ship)
    assert not await inbox.handle("m1", ship)
    assert await store.stream_version("shipment-1") == 0


async def test_prune_forgets_old_ids_only(store: EventStore) -> None:
    inbox = Inbox(store, "billing")
    for message in ("old", "new"):
        async with store.unit_of_work() as uow:
            await inbox.record(uow.connection, message)
    await store.pool.execute("UPDATE inbox SET handled_at = now() - interval '2 days' WHERE message_id = 'old'")
    assert await inbox.prune(24 * 3600) == 1
    assert not await inbox.seen("old") and await inbox.seen("new")


@pytest.mark.parametrize("bad", ["", None, 5, "id-with-\x00-from-the-wire", "id-with-\ud800-surrogate"])
async def test_bad_ids_and_names_are_rejected(store: EventStore, bad: object) -> None:
    with pytest.raises(InvalidArgument):
        await Inbox(store, "billing").seen(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await Inbox(store, "billing").handle(bad, lambda uow: asyncio.sleep(0))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Inbox(store, bad)  # type: ignore[arg-type]
    for older_than in ("1d", math.inf, -1):
        with pytest.raises(ValueError):
            await Inbox(store, "billing").prune(older_than)  # type: ignore[arg-type]
    assert await store.pool.fetchval("SELECT count(*) FROM inbox") == 0


async def test_duplicates_from_kafka_are_applied_once(
    outbox_store: EventStore, kafka: str, topic: str
) -> None:
    """Publish every message twice (a relay that crashed before marking), consume through the inbox."""
    await outbox_store.pool.execute(LEDGER)
    for n in range(20):
        await outbox_store.append(f"order-{n % 4}", [NewEvent("OrderPaid", {"amount": n})])
    settings = relay_settings()
    async with Relay(outbox_store, kafka, settings):
        await _wait_published(outbox_store, 20)
    await outbox_store.pool.execute("UPDATE outbox SET published_at = NULL")
    async with Relay(outbox_store, kafka, settings):
        await _wait_published(outbox_store, 20)

    inbox = Inbox(outbox_store, "ledger")
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, auto_offset_reset="earliest", group_id=None)
    await consumer.start()
    received = applied = 0
    try:
        while received < 40:
            batches = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 20)
            for records in batches.values():
                for record in records:
                    received += 1
                    event = from_record(record)

                    async def effect(uow: UnitOfWork, event_id: str = event.id, data: bytes = event.data) -> None:
                        amount = int(orjson.loads(data)["amount"])
                        await uow.connection.execute("INSERT INTO ledger VALUES ($1, $2)", event_id, amount)

                    applied += await inbox.handle(event, effect)
    finally:
        await consumer.stop()
    assert (received, applied) == (40, 20)
    assert [amount for _, amount in await _ledger(outbox_store)] == list(range(20))


async def _wait_published(store: EventStore, count: int) -> None:
    for _ in range(400):
        if await store.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL") == count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("messages were not published")
