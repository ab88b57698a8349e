"""Reading back what the relay published to NATS JetStream and RabbitMQ, as CloudEvents in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from typing import Any

import aio_pika
import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from outbox import CloudEvent, NatsSettings, RabbitMQSettings, from_amqp, from_nats


class NatsReader:
    """A stream of its own capturing this test's subjects (a unique prefix), read with a pull consumer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"test_{uuid.uuid4().hex[:10]}"
        self.settings = NatsSettings(servers=url, subject_prefix=f"{self.name}.")

    async def create(self, topics: list[str], **config: Any) -> None:
        client = await nats.connect(self.url)
        try:
            subjects = [self.settings.subject(t) for t in topics]
            await client.jetstream().add_stream(StreamConfig(name=self.name, subjects=subjects, **config))
        finally:
            await client.close()

    async def read(self, count: int, timeout: float = 20.0) -> list[CloudEvent]:
        """Every message of the stream, once it holds `count` (fails with what it has after `timeout`)."""
        async with asyncio.timeout(timeout):
            while True:
                with contextlib.suppress(Exception):  # the server may be restarting
                    client = await nats.connect(self.url, allow_reconnect=False)
                    try:
                        js = client.jetstream()
                        if (await js.stream_info(self.name)).state.messages >= count:
                            sub = await js.pull_subscribe(
                                f"{self.name}.>", stream=self.name, config=ConsumerConfig(ack_policy=AckPolicy.NONE)
                            )
                            events: list[CloudEvent] = []
                            while True:
                                try:
                                    batch = await sub.fetch(500, timeout=0.5)
                                except nats.errors.TimeoutError:
                                    return events
                                events.extend(from_nats(msg) for msg in batch)
                    finally:
                        await client.close()
                await asyncio.sleep(0.05)

    async def delete(self) -> None:
        with contextlib.suppress(Exception):
            client = await nats.connect(self.url, allow_reconnect=False)
            try:
                await client.jetstream().delete_stream(self.name)
            finally:
                await client.close()


class RabbitReader:
    """An exchange of its own and a queue bound to the given topics, drained in arrival order.

    The relay's connections carry a name, so a test can cut just those (`cut_relay_connections`).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"test-{uuid.uuid4().hex[:10]}"
        self.settings = RabbitMQSettings(
            url=url, exchange=self.name, extra={"client_properties": {"connection_name": self.name}}
        )
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self.events: list[CloudEvent] = []

    async def create(self, topics: list[str]) -> None:
        self._connection = await aio_pika.connect(self.url)
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(self.name, aio_pika.ExchangeType.TOPIC, durable=True)
        self._queue = await channel.declare_queue(exclusive=True)
        for topic in topics:
            await self._queue.bind(exchange, routing_key=topic)

    async def bind(self, topic: str) -> None:
        assert self._queue is not None
        await self._queue.bind(self.name, routing_key=topic)

    async def read(self, count: int, timeout: float = 20.0) -> list[CloudEvent]:
        assert self._queue is not None
        async with asyncio.timeout(timeout):
            while len(self.events) < count:
                message = await self._queue.get(no_ack=True, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                self.events.append(from_amqp(message))
        with contextlib.suppress(Exception):  # and nothing more, for a moment
            while (message := await self._queue.get(no_ack=True, fail=False, timeout=0.5)) is not None:
                self.events.append(from_amqp(message))
        return list(self.events)

    async def delete(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                channel = await self._connection.channel()
                await channel.exchange_delete(self.name)
            await self._connection.close()


def cut_relay_connections(name: str) -> int:
    """Close the broker side of every RabbitMQ connection named `name` (`rabbitmqctl`); return how many."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "-q", "--no-table-headers"],
        capture_output=True, text=True, check=True, timeout=30,
    )
    cut = 0
    for line in listed.stdout.splitlines():
        pid, _, properties = line.partition("\t")
        if f'{{"connection_name","{name}"}}' in properties:
            subprocess.run(["rabbitmqctl", "close_connection", pid.strip(), "test: broker connection cut"],
                           capture_output=True, check=True, timeout=30)
            cut += 1
    return cut
