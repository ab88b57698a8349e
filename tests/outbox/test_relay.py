"""The relay against real PostgreSQL and a real Kafka-protocol broker, in this process."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from typing import Any

import asyncpg
import orjson
import pytest

from eventstore import EventStore, NewEvent, StreamState, asyncpg_dsn
from outbox import KafkaSettings, Outbox, Relay, Route, retry_dead
from outbox.embedded import EmbeddedBroker
from tests.outbox.conftest import Collector, CuttableBroker, create_topic, keyed_writers, relay_settings


def versions_by_key(collector: Collector) -> dict[str, list[int]]:
    """Stream versions per key, in the order the consumer read them (one key lives in one partition)."""
    seen: dict[str, list[int]] = defaultdict(list)
    for record in collector.records:
        seen[record.key.decode()].append(int(dict(record.headers)["ce_streamversion"]))
    return seen


async def wait_until(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_messages_arrive_as_cloud_events_in_order_per_key(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    correlation = uuid.uuid4()
    written: dict[str, NewEvent] = {}
    for version in range(10):  # interleave 20 streams so outbox order mixes keys
        for stream in range(20):
            event = NewEvent("OrderChanged", {"stream": stream, "version": version}, correlation_id=correlation)
            await outbox_store.append(f"order-{stream}", [event])
            written[str(event.event_id)] = event
    async with Relay(outbox_store, kafka, relay_settings(batch_size=64)) as relay:
        await collector.wait_count(200)
    assert relay.stats.published == 200  # counted once marked; stopping waits for the last marks
    assert len(collector.records) == 200, "no duplicates without a crash"
    for record in collector.records:
        event = dict(record.headers)
        original = written[event["ce_id"].decode()]
        assert event["ce_specversion"] == b"1.0" and event["ce_source"] == b"/tests"
        assert event["ce_type"] == b"OrderChanged" and event["content-type"] == b"application/json"
        assert event["ce_correlationid"] == str(correlation).encode()
        assert event["ce_time"].endswith(b"Z")
        assert record.key == event["ce_subject"] == f"order-{original.data['stream']}".encode()
        assert orjson.loads(record.value) == original.data
    assert versions_by_key(collector) == {f"order-{s}": list(range(10)) for s in range(20)}
    rows = await outbox_store.pool.fetch("SELECT published_at, published_by FROM outbox")
    assert all(r["published_at"] is not None and r["published_by"] == relay.relay_id for r in rows)


async def test_a_notification_wakes_an_idle_relay(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    # Without NOTIFY the relay would sleep for lease_ttl / 6 = 20 s (and polls only every 60 s).
    settings = relay_settings(poll_interval=60.0, lease_ttl=120.0)
    async with Relay(outbox_store, kafka, settings) as relay:
        await wait_until(lambda: _true(relay.owned_slots), what="slots")
        await asyncio.sleep(0.3)  # the relay found nothing and went to sleep
        await outbox_store.append("order-1", [NewEvent("OrderPlaced")])
        await collector.wait_count(1, timeout=10.0)


async def test_a_relay_looks_again_soon_when_a_transaction_that_wrote_no_event_ends(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    """No NOTIFY comes when the transaction holding the log back ends without writing events."""
    settings = relay_settings(poll_interval=60.0, lease_ttl=120.0)
    async with Relay(outbox_store, kafka, settings) as relay:
        await wait_until(lambda: _true(relay.owned_slots), what="slots")
        async with outbox_store.pool.acquire() as blocker:
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.fetchval("SELECT pg_current_xact_id()")  # holds the log's visibility line
            await outbox_store.append("order-1", [NewEvent("OrderPlaced")])  # its NOTIFY finds nothing
            await asyncio.sleep(0.3)
            await transaction.rollback()
        await collector.wait_count(1, timeout=10.0)


async def _true(value: object) -> bool:
    return bool(value)


async def test_in_flight_messages_are_bounded_by_the_batch_size(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    async with outbox_store.unit_of_work() as uow:
        for stream in range(10):
            await uow.append(f"order-{stream}", [NewEvent("OrderPlaced", {"n": n}) for n in range(30)])
    async with Relay(outbox_store, kafka, relay_settings(batch_size=25)) as relay:
        await collector.wait_count(300)
    assert relay.stats.max_in_flight <= 25
    assert relay.stats.rounds >= 12
    assert versions_by_key(collector) == {f"order-{s}": list(range(30)) for s in range(10)}


async def test_a_refused_message_is_dead_lettered_without_blocking_other_keys_and_can_be_retried(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    big = NewEvent("OrderPlaced", {"blob": "x" * 5000})
    await outbox_store.append("order-bad", [NewEvent("OrderPlaced", {"n": 0}), big, NewEvent("OrderPlaced", {"n": 2})])
    for stream in range(5):
        await outbox_store.append(f"order-good{stream}", [NewEvent("OrderPlaced", {"n": n}) for n in range(3)])
    small = KafkaSettings(bootstrap_servers=kafka, max_request_size=2000)
    settings = relay_settings(max_attempts=3, retry_backoff=0.2)
    async with Relay(outbox_store, small, settings) as relay:
        await collector.wait_count(17)
        assert relay.stats.dead == 1 and relay.stats.refused == 3
    pool = outbox_store.pool
    dead = await pool.fetchrow(
        "SELECT o.* FROM outbox o JOIN events e USING (position) WHERE e.event_id = $1", big.event_id
    )
    assert dead["dead_at"] is not None and dead["published_at"] is None and dead["attempts"] == 3
    assert "MessageSizeTooLarge" in dead["last_error"]
    others = await pool.fetch(
        "SELECT o.key, e.stream_version, o.published_at FROM outbox o JOIN events e USING (position)"
        " WHERE o.id <> $1",
        dead["id"],
    )
    # Other keys went out at once, not after the poison message died ...
    assert all(r["published_at"] < dead["dead_at"] for r in others if r["key"] != "order-bad")
    # ... while the next message of its own key waited until it was dead, then flowed (progress over order).
    successor = next(r for r in others if r["key"] == "order-bad" and r["stream_version"] == 2)
    assert successor["published_at"] >= dead["dead_at"]
    assert versions_by_key(collector)["order-bad"] == [0, 2]

    assert await retry_dead(outbox_store, ids=[dead["id"]]) == [dead["id"]]
    async with Relay(outbox_store, kafka, settings):  # default max_request_size: 1 MiB
        await collector.wait_count(18)
    assert versions_by_key(collector)["order-bad"] == [0, 2, 1]
    row = await pool.fetchrow("SELECT published_at, dead_at FROM outbox WHERE id = $1", dead["id"])
    assert row["published_at"] is not None and row["dead_at"] is None


async def test_retention_prunes_old_published_messages_only(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    await outbox_store.append("order-1", [NewEvent("OrderPlaced", {"n": n}) for n in range(10)])
    settings = relay_settings(retention=3600.0, prune_interval=0.1)
    pool = outbox_store.pool
    async with Relay(outbox_store, kafka, settings):
        await collector.wait_count(10)
        await wait_until(lambda: _none_pending(pool), what="published")
        await pool.execute(
            "UPDATE outbox SET published_at = now() - interval '2 hours'"
            " WHERE position IN (SELECT position FROM events WHERE stream_version < 4)"
        )
        # A dead message and a pending one are never pruned, however old.
        await pool.execute(
            "UPDATE outbox SET published_at = NULL, dead_at = now() - interval '2 hours',"
            " recorded_at = now() - interval '2 hours'"
            " WHERE position IN (SELECT position FROM events WHERE stream_version = 0)"
        )
        await wait_until(lambda: _count(pool, 7), what="pruning")
    left = await pool.fetch("SELECT e.stream_version FROM outbox JOIN events e USING (position) ORDER BY 1")
    assert [r[0] for r in left] == [0, 4, 5, 6, 7, 8, 9]


async def _none_pending(pool: asyncpg.Pool) -> bool:
    return await _pending(pool) == 0


async def _count(pool: asyncpg.Pool, expected: int) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM outbox") == expected)


@pytest.mark.fault
async def test_relay_survives_its_connections_being_terminated(
    outbox_store: EventStore, database_url: str, kafka: str, collector: Collector
) -> None:
    admin = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        terminated = 0
        async with Relay(outbox_store, kafka, relay_settings(batch_size=20)):
            for round_ in range(10):
                for stream in range(10):
                    await outbox_store.append(f"order-{stream}", [NewEvent("OrderPlaced", {"n": round_})])
                terminated += await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                await asyncio.sleep(0.05)
            await collector.wait_count(100)
        # The relay's own connections among them (its listener's at least); whether a query of its was
        # under way when one went (and counted in stats.database_errors) is up to timing.
        assert terminated >= 10
    finally:
        await admin.close()
    assert versions_by_key(collector) == {f"order-{s}": list(range(10)) for s in range(10)}


@pytest.mark.fault
async def test_broker_down_for_a_while_then_back_loses_nothing(
    store: EventStore, own_broker: EmbeddedBroker
) -> None:
    servers = own_broker.bootstrap_servers
    topic = await create_topic(servers)
    await Outbox([Route(topic, category="order")], source="/tests").declare(store)
    before, after = Collector(servers, topic), Collector(servers, topic)
    await before.start()
    try:
        async with Relay(store, servers, relay_settings()) as relay:
            for n in range(10):
                await store.append(f"order-{n % 3}", [NewEvent("OrderPlaced", {"n": n})])
            await before.wait_count(10)  # memory storage: read them now, a restart loses them
            await before.stop()
            own_broker.stop()
            for n in range(10, 20):
                await store.append(f"order-{n % 3}", [NewEvent("OrderPlaced", {"n": n})])
            await wait_until(lambda: _true(relay.stats.broker_errors >= 2), what="broker errors")
            assert await _pending(store.pool) == 10
            own_broker.start()  # the topic is gone; the relay's producer has it created again
            await after.start()
            await after.wait_count(10, timeout=30.0)
            await wait_until(lambda: _none_pending(store.pool), what="marked published")
    finally:
        await before.stop()
        await after.stop()
    ids = {r[0] for r in await store.pool.fetch("SELECT e.event_id::text FROM outbox JOIN events e USING (position)")}
    assert len(ids) == 20
    assert before.ids() | after.ids() == ids
    assert before.ids().isdisjoint(after.ids())


@pytest.mark.fault
async def test_order_per_key_holds_when_the_network_to_the_broker_fails_mid_stream(
    store: EventStore, cuttable_broker: CuttableBroker
) -> None:
    """A request on its way when the network fails is lost and times out; a later batch of its
    partition must not reach the broker first once the network is back (later messages of a key
    would come first), and nothing may be lost."""
    servers = cuttable_broker.bootstrap_servers
    topic = await create_topic(servers)
    await Outbox([Route(topic, category="order")], source="/tests").declare(store)
    # Small record batches: a busy partition has later batches waiting behind the one in flight.
    kafka = KafkaSettings(bootstrap_servers=servers, max_batch_size=1024)
    collector = Collector(servers, topic)
    keys = 4
    await collector.start()
    try:
        async with Relay(store, kafka, relay_settings(send_timeout=1.0)) as relay:
            async with keyed_writers(store, keys) as appended:
                for cut in range(1, 4):
                    await collector.wait_count(len(collector.ids()) + 30)  # mid-stream
                    cuttable_broker.cut()
                    # What is in flight times out (send_timeout 1 s); the cut lasts until the relay saw it.
                    await asyncio.sleep(1.5)
                    await wait_until(lambda c=cut: _true(relay.stats.broker_errors >= c), what="a broker error")
                    cuttable_broker.heal()
            await collector.wait_for(lambda c: set(appended) <= c.ids(), timeout=30)
    finally:
        await collector.stop()
    assert relay.stats.broker_errors >= 3
    assert collector.ids() == set(appended), "every appended event arrived"
    seen: dict[tuple[str, int], list[int]] = defaultdict(list)
    for record in collector.records:
        seen[(record.key.decode(), record.partition)].append(int(dict(record.headers)["ce_streamversion"]))
    assert len(seen) == keys
    for key, versions in seen.items():
        firsts = list(dict.fromkeys(versions))  # at least once: a repeat may come late, a first may not
        inversions = [firsts[i - 1 : i + 5] for i in range(1, len(firsts)) if firsts[i - 1] > firsts[i]]
        assert not inversions, f"{key}: a later stream version came first: {inversions[:3]}"


async def _pending(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))


async def test_relays_split_the_slots_fairly_and_take_over_from_one_that_stops(
    store: EventStore, kafka: str
) -> None:
    first = Relay(store, kafka, relay_settings(relay_id="first"))
    second = Relay(store, kafka, relay_settings(relay_id="second"))
    await first.start()
    try:
        await wait_until(lambda: _true(len(first.owned_slots) == 64), what="first relay takes every slot")
        await second.start()
        await wait_until(
            lambda: _true(len(first.owned_slots) == len(second.owned_slots) == 32), what="a fair split"
        )
        assert set(first.owned_slots).isdisjoint(second.owned_slots)
        await first.stop()
        await wait_until(lambda: _true(len(second.owned_slots) == 64), what="the second takes over")
    finally:
        await first.stop()
        await second.stop()
    assert await store.pool.fetchval("SELECT count(*) FROM outbox_slots WHERE owner IS NOT NULL") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM outbox_relays") == 0


async def test_an_open_transaction_holds_back_what_comes_after_it_then_goes_out_under_traffic(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    """Messages go out in log order: nothing that comes after an open transaction's events in the log is
    published before it commits (it could still add a message of the same key before them); once it
    commits, its message goes out at once, though writers keep the relay busy."""
    late = NewEvent("OrderPlaced", {"late": True})
    stop = asyncio.Event()

    async def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            await outbox_store.append(f"order-busy{w}-{n % 5}", [NewEvent("OrderPlaced", {"n": n})])
            n += 1

    async def traffic() -> None:  # enough that every round of the relay finds something new
        await asyncio.gather(*(writer(w) for w in range(4)))

    async with Relay(outbox_store, kafka, relay_settings()):
        busy: asyncio.Task[None] | None = None
        try:
            async with outbox_store.unit_of_work() as uow:
                await uow.append("order-late", [late])  # its transaction id is older than any of the traffic's
                busy = asyncio.create_task(traffic())
                await asyncio.sleep(0.5)
                assert collector.records == [], "a message after the open transaction went out first"
            await collector.wait_for(lambda c: str(late.event_id) in c.ids(), timeout=10)
            assert not busy.done(), "the late message came only after the traffic stopped"
        finally:
            stop.set()
            if busy is not None:
                await busy
    first = await outbox_store.pool.fetchrow(
        "SELECT e.event_id FROM outbox o JOIN events e USING (position) ORDER BY o.log_xid, o.position LIMIT 1"
    )
    assert first["event_id"] == late.event_id, "the late message comes first in the log"


async def test_a_late_commit_is_never_overtaken_by_the_next_message_of_its_key(
    store: EventStore, cuttable_broker: CuttableBroker
) -> None:
    """A transaction holds `order-late` v0 open (its outbox row comes first) while a backlog of other keys
    commits and a relay drains it; then v0 commits and v1 follows. The broker must get v0 before v1.

    The broker sits behind a proxy with 10 ms of latency, so the drain takes long enough for the commit
    to land in the middle of it (if the relay rightly waits for the open transaction, nothing arrives
    and the commit comes after a second); a long lease keeps the relay from starting over from the
    first pending message meanwhile. The relay before the log order fix sent v1, v0 here every time.
    """
    servers = cuttable_broker.bootstrap_servers
    topic = await create_topic(servers)
    await Outbox([Route(topic, category="order")], source="/tests").declare(store)
    collector = Collector(servers, topic)
    await collector.start()
    late = store.unit_of_work()
    uow = await late.__aenter__()
    await uow.append("order-late", [NewEvent("OrderPlaced")], StreamState.NO_STREAM)
    for stream in range(60):
        await store.append(f"order-{stream}", [NewEvent("OrderChanged", {"n": n}) for n in range(100)])
    try:
        async with Relay(store, servers, relay_settings(batch_size=100, lease_ttl=60)):
            with contextlib.suppress(AssertionError):
                await collector.wait_for(lambda c: len(c.records) >= 500, timeout=1.0)
            await late.__aexit__(None, None, None)
            await store.append("order-late", [NewEvent("OrderPaid")], 0)
            await collector.wait_for(lambda c: len(c.records) >= 6_002, timeout=60)
    finally:
        await collector.stop()
    assert versions_by_key(collector)["order-late"] == [0, 1]
    assert all(v == list(range(100)) for k, v in versions_by_key(collector).items() if k != "order-late")
