"""A Kafka-protocol broker for the outbox tests, and helpers to read what reached it.

`KAFKA_BOOTSTRAP_SERVERS` names a broker to use; without it the embedded `tansu` broker is started once
for the session. Tests that stop the broker start an embedded one of their own, and tests that cut the
network to it put one behind a proxy (`CuttableBroker`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from eventstore import EventStore, NewEvent
from outbox import Outbox, RelaySettings, Route
from outbox.cloudevents import CloudEvent, from_record
from outbox.embedded import EmbeddedBroker, broker_binary, free_port

PARTITIONS = 4


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, which it may stop and start again."""
    with EmbeddedBroker() as broker:
        yield broker


class CuttableBroker:
    """The embedded broker behind a TCP proxy that can cut the network between it and its clients.

    Requests take `latency` seconds to reach the broker, so one is usually on its way when the network
    is cut. While cut, nothing is delivered: a connection its client gives up on meanwhile (a request
    timeout closes it) loses what was on its way, so that request never arrives; connections still open
    when the cut heals deliver theirs. Unlike stopping the broker this loses nothing the broker stored,
    so a test can check every message.
    """

    def __init__(self, latency: float = 0.01) -> None:
        self.latency = latency
        self.port = free_port()  # advertised: clients reach the broker through the proxy only
        self._broker_port = free_port()
        self._healed = asyncio.Event()
        self._healed.set()
        self._server: asyncio.Server | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            broker_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{self._broker_port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
        )
        for _ in range(500):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self._broker_port)
                writer.close()
                break
            await asyncio.sleep(0.02)
        else:
            raise RuntimeError("the embedded broker did not start")
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)

    def cut(self) -> None:
        self._healed.clear()

    def heal(self) -> None:
        self._healed.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self._broker_port)
        except OSError:
            client_writer.close()
            return
        self._spawn(self._pump(client_reader, broker_writer, self.latency))
        self._spawn(self._pump(broker_reader, client_writer, 0.0))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency: float) -> None:
        loop = asyncio.get_running_loop()
        on_the_way: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await on_the_way.get()
                await asyncio.sleep(due - loop.time())
                await self._healed.wait()
                writer.write(data)
                await writer.drain()

        delivering = self._spawn(deliver())
        try:
            while data := await reader.read(65536):
                on_the_way.put_nowait((loop.time() + latency, data))
        except OSError:
            pass
        finally:  # the sender closed: what is still on its way is lost with the connection
            delivering.cancel()
            writer.close()


@pytest.fixture
async def cuttable_broker() -> AsyncIterator[CuttableBroker]:
    broker = CuttableBroker()
    try:
        await broker.start()
        yield broker
    finally:
        await broker.close()


async def create_topic(servers: str, name: str | None = None, partitions: int = PARTITIONS) -> str:
    name = name or f"t-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()
    return name


@pytest.fixture
async def topic(kafka: str) -> str:
    return await create_topic(kafka)


@contextlib.asynccontextmanager
async def keyed_writers(store: EventStore, keys: int) -> AsyncIterator[list[str]]:
    """Writers appending five events to `order-{key}` every 50 ms until the block ends; yields the ids
    appended so far (the list grows while the block runs, and is complete after it)."""
    appended: list[str] = []
    stop = asyncio.Event()

    async def writer(key: int) -> None:
        n = 0
        while not stop.is_set():
            events = [NewEvent("OrderPlaced", {"n": n + i}) for i in range(5)]
            await store.append(f"order-{key}", events)
            appended.extend(str(e.event_id) for e in events)
            n += 5
            await asyncio.sleep(0.05)

    writers = [asyncio.create_task(writer(k)) for k in range(keys)]
    try:
        yield appended
    finally:
        stop.set()
        await asyncio.gather(*writers)


def relay_settings(**overrides: Any) -> RelaySettings:
    """Short timeouts so failure tests finish quickly."""
    values: dict[str, Any] = {
        "send_timeout": 1.0,
        "lease_ttl": 6.0,
        "poll_interval": 0.5,
        "retry_backoff": 0.1,
        "max_retry_backoff": 0.5,
        "broker_backoff": 0.1,
        "max_broker_backoff": 0.5,
    }
    values.update(overrides)
    return RelaySettings(**values)


@pytest.fixture
async def outbox_store(store: EventStore, topic: str) -> EventStore:
    """The test's store with an outbox routing every `Order*` event to `topic`."""
    await Outbox([Route(topic, category="order")], source="/tests").declare(store)
    return store


class Collector:
    """Reads a topic from the beginning in the background and keeps every message it sees."""

    def __init__(self, servers: str, topic: str) -> None:
        self.servers = servers
        self.topic = topic
        self.records: list[Any] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            self.topic, bootstrap_servers=self.servers, auto_offset_reset="earliest", group_id=None,
            request_timeout_ms=5000, retry_backoff_ms=100, metadata_max_age_ms=1000,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200)
            except Exception:  # broker restarts in fault tests; keep reading
                await asyncio.sleep(0.1)
                continue
            for records in batches.values():
                self.records.extend(records)
            if batches:
                self._arrived.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), 5)

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> None:
        """Wait until `predicate(self)` holds; fail the test with what arrived if it never does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"timed out: {len(self.records)} message(s) arrived on {self.topic}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.5))

    async def wait_count(self, count: int, timeout: float = 20.0) -> None:
        await self.wait_for(lambda c: len(c.ids()) >= count, timeout)

    def events(self) -> list[CloudEvent]:
        return [from_record(r) for r in self.records]

    def ids(self) -> set[str]:
        return {e.id for e in self.events()}


@pytest.fixture
async def collector(kafka: str, topic: str) -> AsyncIterator[Collector]:
    c = Collector(kafka, topic)
    await c.start()
    yield c
    await c.stop()
