"""Erasing a customer of the shop: afterwards no table of the database and no message the broker got
after the erasure holds the customer's personal data, and every read path still works.
"""

from __future__ import annotations

import asyncio
import random
import uuid

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from eventstore import REDACTED, Checkpoint, EventStore, asyncpg_dsn
from eventstore_app import ApplicationSettings
from examples.shop.app import APP
from examples.shop.demo import PRODUCTS, Shop, Tally, _Commands, _customer, _ensure_topic, address_of, email_of
from outbox import RelaySettings
from outbox import status as outbox_status

CUSTOMERS = 8  # customer-0 .. customer-7, one cart and order each
VICTIM = "customer-3"


async def _tables_holding(store: EventStore, needles: list[str]) -> list[str]:
    """Every table of every schema (read-model generations included), each row as text, searched."""
    found = []
    tables = await store.pool.fetch(
        "SELECT table_schema, table_name FROM information_schema.tables "
        "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')"
    )
    for t in tables:
        name = f'"{t["table_schema"]}"."{t["table_name"]}"'
        for needle in needles:
            query = f"SELECT count(*) FROM {name} AS t WHERE t::text LIKE '%' || $1 || '%'"
            if await store.pool.fetchval(query, needle):
                found.append(f"{name}: {needle}")
    return found


async def _offsets(kafka: str) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka)
    await consumer.start()
    try:
        partitions = await _partitions(consumer)
        return dict(await consumer.end_offsets(partitions)) if partitions else {}
    finally:
        await consumer.stop()


Message = tuple[bytes, bytes, list[tuple[str, bytes]]]


async def _wait_for_the_log(store: EventStore) -> None:
    """Until readers of the log see every event written so far (other transactions may hold it back)."""
    last = await store.pool.fetchrow(
        "SELECT log_xid, position FROM events ORDER BY log_xid DESC, position DESC LIMIT 1"
    )
    assert last is not None
    await store.wait_until_visible(Checkpoint(last["log_xid"], last["position"]))


async def _partitions(consumer: AIOKafkaConsumer) -> list[TopicPartition]:
    return [TopicPartition(t, p) for t in await consumer.topics() for p in consumer.partitions_for_topic(t) or ()]


async def _messages_since(kafka: str, since: dict[TopicPartition, int]) -> list[Message]:
    """Every message of every topic after the offsets in `since` (topics created since: from the start)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = await _partitions(consumer)
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            consumer.seek(tp, since.get(tp, 0))
        found = []
        async with asyncio.timeout(30):
            while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    found += [(r.key or b"", r.value or b"", list(r.headers or ())) for r in records]
        return found
    finally:
        await consumer.stop()


async def test_an_erased_customer_leaves_no_plaintext_anywhere(database_url: str, kafka: str) -> None:
    await _ensure_topic(kafka)
    settings = ApplicationSettings(relay=RelaySettings(relay_id=f"erasure-{uuid.uuid4().hex[:6]}", poll_interval=0.2))
    plaintext = [email_of(VICTIM), address_of(VICTIM)]
    others = [email_of("customer-4"), address_of("customer-4")]
    async with APP.using(database_url=database_url, kafka=kafka, settings=settings) as app:
        store, shop, commands = app.store, Shop(app), _Commands(Tally())
        prices = {f"sku{i:03d}": 500 for i in range(PRODUCTS)}
        for sku in prices:
            await commands.run(shop.products, sku, lambda p: p.list_for_sale(500, 1000), create=True)
        for n in range(CUSTOMERS):
            await _customer(shop, commands, random.Random(n), n, prices)
        victim_order = (await shop.orders.get("o00003")).state
        assert victim_order.ship_to == address_of(VICTIM)  # read paths open the sealed fields
        # A snapshot of the victim's order (as a snapshotting aggregate would write): plaintext in a cache.
        await store.save_snapshot("order-o00003", "Order", "test", 0, victim_order.model_dump_json())
        await _wait_for_the_log(store)
        async with app.runner() as runner:
            await runner.wait_caught_up()
        before = await _tables_holding(store, plaintext + others)
        assert any("order_summary" in t for t in before) and any("snapshots" in t for t in before)
        assert not any('"events"' in t for t in before)  # the log itself only ever holds ciphertext

        # The relay has not run: the victim's messages are still pending when the erasure happens.
        offsets = await _offsets(kafka)
        erasure = await store.forget(VICTIM)
        assert erasure.snapshots_dropped == 1
        await _wait_for_the_log(store)

        async with app.running(relay=True) as running:
            await asyncio.wait_for(running.wait_caught_up(), 60)
        assert (await outbox_status(store)).pending == 0
        await app.admin.rebuild("order_summary")  # a rebuild replays the redacted events

        assert await _tables_holding(store, plaintext) == []
        assert any("order_summary" in t for t in await _tables_holding(store, others))  # the others stay
        assert (await shop.orders.get("o00003")).state.ship_to == REDACTED  # aggregates still load
        assert (await shop.carts.get("c00003")).state.email == REDACTED
        summary = await store.pool.fetchrow(
            "SELECT customer, ship_to FROM order_summary WHERE order_id = 'order-o00003'"
        )
        assert summary is not None and tuple(summary) == (VICTIM, REDACTED)

    messages = await _messages_since(kafka, offsets)
    placed = [orjson.loads(v) for _, v, h in messages if (("ce_type", b"OrderPlaced") in h)]
    placed = [p for p in placed if "customer" in p and "ship_to" in p]  # the shop's (other tests' share topics)
    assert {p["ship_to"] for p in placed if p["customer"] == VICTIM} == {REDACTED}
    assert address_of("customer-4") in {p["ship_to"] for p in placed}  # the others' data went out opened
    leaks = [
        (k, v) for k, v, headers in messages
        for needle in plaintext
        if needle.encode() in k + v + b"".join(value for _, value in headers)
    ]
    assert leaks == []
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM subject_keys WHERE wrapped_key IS NULL") == 1
    finally:
        await conn.close()
