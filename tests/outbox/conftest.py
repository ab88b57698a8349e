"""A Kafka-protocol broker for the outbox tests, and helpers to read what reached it.

`KAFKA_BOOTSTRAP_SERVERS` names a broker to use; without it the embedded `tansu` broker is started once
for the session. Tests that stop the broker start an embedded one of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from eventstore import EventStore
from outbox import Outbox, RelaySettings, Route
from outbox.cloudevents import CloudEvent, from_record
from outbox.embedded import BOOTSTRAP_ENV, EmbeddedBroker

PARTITIONS = 4


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    servers = os.environ.get(BOOTSTRAP_ENV)
    if servers:
        yield servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, which it may stop and start again."""
    with EmbeddedBroker() as broker:
        yield broker


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
    Outbox([Route(topic, category="order")], source="/tests").install(store)
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
