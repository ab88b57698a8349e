"""Outbox relay: throughput draining a backlog, and commit-to-consumer latency at a steady rate.

`limit` is raw aiokafka producing (or producing and consuming) the same messages with the same
producer settings, without PostgreSQL in the way. The broker is the embedded `tansu` unless
`KAFKA_BOOTSTRAP_SERVERS` names one. The `eventsourcing` package has no Kafka relay, so no peer.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.common import Result, Timer, fresh_database, rate
from eventstore import EventStore, NewEvent
from outbox import KafkaSettings, Outbox, Relay, RelaySettings, Route, from_record, kafka_headers
from outbox.embedded import bootstrap_servers

BACKLOG = 50_000
STREAMS = 500
RATE = 1_000  # events per second
SECONDS = 10.0
PARTITIONS = 8
DATA = {"sku": "ABC-123", "quantity": 2, "price": 1999, "note": "benchmark event"}
DATA_JSON = orjson.dumps(DATA)
SETTINGS = RelaySettings(relay_id="bench", batch_size=2000, retention=None)


async def _topic(servers: str) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1)])
    finally:
        await admin.close()
    return name


def _producer(kafka: KafkaSettings) -> AIOKafkaProducer:
    return AIOKafkaProducer(**kafka.producer_options(request_timeout_ms=int(SETTINGS.send_timeout * 1000)))


async def _throughput(url: str, kafka: KafkaSettings) -> tuple[float, float]:
    topic = await _topic(kafka.bootstrap_servers)
    async with EventStore(url, max_connections=4) as store:
        await Outbox([Route(topic)], source="/bench").declare(store)
        per_stream = BACKLOG // STREAMS
        for first in range(0, STREAMS, 50):
            async with store.unit_of_work() as uow:
                for stream in range(first, first + 50):
                    await uow.append(f"order-{stream}", [NewEvent("OrderPlaced", DATA) for _ in range(per_stream)])
        rows = await store.pool.fetch(
            "SELECT o.key, e.data::text, e.event_id::text, e.event_type, o.source, e.stream_id, e.stream_version,"
            " to_char(e.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
            " FROM outbox o JOIN events e USING (position) ORDER BY o.id"
        )
        relay = Relay(store, kafka, SETTINGS)
        with Timer() as ours:
            await relay.start()
            while relay.stats.published < BACKLOG:  # noqa: ASYNC110 - polling a counter
                await asyncio.sleep(0.005)
        await relay.stop()

    # The same messages, headers built the same way, straight from memory to the broker.
    raw_topic = await _topic(kafka.bootstrap_servers)
    producer = _producer(kafka)
    await producer.start()
    try:
        with Timer() as raw:
            futures = []
            for key, data, event_id, event_type, source, stream_id, version, recorded in rows:
                headers = kafka_headers(id=event_id, type=event_type, source=source, time=recorded,
                                        subject=stream_id, stream_version=version)
                futures.append(await producer.send(raw_topic, data.encode(), key=key.encode(), headers=headers))
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return rate(BACKLOG, ours.seconds), rate(BACKLOG, raw.seconds)


async def _steady(send: Callable[[int], Awaitable[None]]) -> None:
    """Start one send every 1/RATE seconds for SECONDS, each in its own task (a slow one delays none)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[None]] = []
    for i in range(int(RATE * SECONDS)):
        delay = start + i / RATE - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i)))
    await asyncio.gather(*tasks)


def _consumer_process(servers: str, topic: str, count: int, ready: Any, out: Any) -> None:
    """Reads `count` messages in a process of its own and reports when each first arrived (wall clock)."""

    async def main() -> dict[str, float]:
        received: dict[str, float] = {}
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=servers, auto_offset_reset="earliest", group_id=None, fetch_max_wait_ms=10
        )
        await consumer.start()
        try:
            while len(received) < count:
                batches = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for records in batches.values():
                    for record in records:
                        received.setdefault(from_record(record).id, now)
                if received:
                    ready.set()
        finally:
            await consumer.stop()
        return received

    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    out.put(asyncio.run(main()))


def _relay_process(url: str, servers: str, stop: Any) -> None:
    """The relay in a process of its own, as deployed (`eventstore outbox relay`)."""

    async def main() -> None:
        async with EventStore(url, max_connections=3, notify=False) as store, Relay(
            store, KafkaSettings(bootstrap_servers=servers), SETTINGS
        ):
            await asyncio.to_thread(stop.wait)

    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    asyncio.run(main())


class _Consumer:
    """A consumer process; `warm_up` publishes one message and waits until the consumer sees it."""

    def __init__(self, servers: str, topic: str, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._ready = context.Event()
        self._out = context.Queue()
        self._process = context.Process(
            target=_consumer_process, args=(servers, topic, count + 1, self._ready, self._out), daemon=True
        )
        self._process.start()

    async def warm_up(self, publish: Callable[[], Awaitable[None]]) -> None:
        await publish()
        if not await asyncio.to_thread(self._ready.wait, 60):
            raise RuntimeError("the consumer saw no warm-up message")

    async def received(self) -> dict[str, float]:
        result: dict[str, float] = await asyncio.to_thread(self._out.get, True, 60)
        await asyncio.to_thread(self._process.join, 10)
        return result


def _latencies(started: dict[str, float], received: dict[str, float]) -> list[float]:
    """Seconds from start to arrival; a message may arrive before its writer noted the commit: 0."""
    return [max(0.0, received[i] - t) for i, t in started.items()]


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


async def _latency(url: str, kafka: KafkaSettings) -> tuple[list[float], list[float]]:
    """Writer here, relay and consumer in processes of their own, the broker in another; then raw aiokafka."""
    count = int(RATE * SECONDS)
    servers = kafka.bootstrap_servers
    topic = await _topic(servers)
    committed: dict[str, float] = {}
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    relay = context.Process(target=_relay_process, args=(url, servers, stop), daemon=True)
    relay.start()
    consumer = _Consumer(servers, topic, count)
    try:
        async with EventStore(url, max_connections=20) as store:
            await Outbox([Route(topic)], source="/bench").declare(store)
            await consumer.warm_up(lambda: _discard(store.append("warm-up", [NewEvent("Started")])))

            async def append(i: int) -> None:
                event = NewEvent("OrderPlaced", DATA)
                await store.append(f"order-{i % STREAMS}", [event])
                committed[str(event.event_id)] = time.time()  # append returns after the commit

            await _steady(append)
            ours = _latencies(committed, await consumer.received())
    finally:
        stop.set()
        await asyncio.to_thread(relay.join, 30)

    return ours, await _raw_latency(kafka, None)


async def _raw_latency(kafka: KafkaSettings, store: EventStore | None) -> list[float]:
    """Raw aiokafka at the steady rate; with a `store`, each send follows one append of the same event to
    a database without outbox routes: how much of the gap is the appends' load on the machine's cores."""
    servers = kafka.bootstrap_servers
    raw_topic = await _topic(servers)
    produced: dict[str, float] = {}
    producer = _producer(kafka)
    await producer.start()
    consumer = _Consumer(servers, raw_topic, int(RATE * SECONDS))
    try:
        async def send(i: int) -> None:
            if store is not None:
                await store.append(f"order-{i % STREAMS}", [NewEvent("OrderPlaced", DATA)])
            event_id = str(uuid.uuid4())
            headers = kafka_headers(id=event_id, type="OrderPlaced", source="/bench",
                                    time="2026-11-26T00:00:00Z", subject=f"order-{i % STREAMS}")
            produced[event_id] = time.time()
            await (await producer.send(raw_topic, DATA_JSON, key=f"order-{i % STREAMS}".encode(), headers=headers))

        await consumer.warm_up(lambda: _discard(producer.send_and_wait(raw_topic, b"{}", key=b"warm-up",
                                                                       headers=headers_for_warm_up())))
        await _steady(send)
        return _latencies(produced, await consumer.received())
    finally:
        await producer.stop()


def headers_for_warm_up() -> list[tuple[str, bytes]]:
    return kafka_headers(id=str(uuid.uuid4()), type="Started", source="/bench", time="2026-11-26T00:00:00Z")


async def _discard(awaitable: Awaitable[Any]) -> None:
    await awaitable


async def run(server_url: str) -> list[Result]:
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    with bootstrap_servers() as servers:
        kafka = KafkaSettings(bootstrap_servers=servers)
        async with fresh_database(server_url) as url:
            ours_rate, raw_rate = await _throughput(url, kafka)
        async with fresh_database(server_url) as url:
            ours, raw = await _latency(url, kafka)
        async with fresh_database(server_url) as url, EventStore(url, max_connections=20) as store:
            loaded = await _raw_latency(kafka, store)
    label = f"@{RATE:,}/s"
    return [
        Result(f"outbox relay, {BACKLOG:,} message backlog", ours_rate, "events/s", limit=raw_rate),
        Result(f"outbox commit-to-consumer p50 {label}", _percentile(ours, 50), "ms",
               limit=_percentile(raw, 50)),
        Result(f"outbox commit-to-consumer p99 {label}", _percentile(ours, 99), "ms",
               limit=_percentile(raw, 99)),
        Result(f"outbox commit-to-consumer p50 {label}, limit beside the same appends", _percentile(ours, 50), "ms",
               limit=_percentile(loaded, 50)),
        Result(f"outbox commit-to-consumer p99 {label}, limit beside the same appends", _percentile(ours, 99), "ms",
               limit=_percentile(loaded, 99)),
    ]
