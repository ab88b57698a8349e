"""The Kafka publisher: a topic's messages by partition, as record batches one after another.

A key's messages all go to one partition (the producer's own partitioner picks it from the key), and
each partition's messages go out as record batches one after another: the next batch is sent only
once the broker has acknowledged the one before. The broker appends a record batch whole or not at
all, so when a batch fails (the broker went away, or refused it) nothing after it in its partition has
been sent, and no message can overtake an earlier message of its key, whatever fails and however it
fails. Partitions are sent concurrently.

Failures are split in two. When the broker is unreachable (connection refused, timeouts, leader
elections: aiokafka's retriable errors) the round ends with the broker `down` and nothing is held
against the messages. When the broker refuses a message (too large, invalid, not authorized) the
message is `refused`: it waits out a backoff and is then retried alone, and while it waits the later
messages of its key wait too, so the key's order holds. A refused batch of several messages does not
say which one the broker objects to: its halves are sent again, in order, until the refusal is
narrowed down to a single message, and only that one is counted (the messages before it are
published, those after it in its partition wait for the next round).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, ProducerClosed
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from outbox.cloudevents import kafka_headers
from outbox.publishing import (
    NOT_SENT,
    BrokerDown,
    Delivery,
    Leased,
    OutboxMessage,
    RoundOutcome,
    broker_down,
    describe,
)
from outbox.settings import KafkaSettings


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, KafkaError):
        return bool(exc.retriable) or isinstance(exc, KafkaTimeoutError | ProducerClosed)
    return isinstance(exc, OSError | TimeoutError)


def _refusal(exc: BaseException) -> bool:
    """The broker answered and said no; anything else ends the round as if the broker were down."""
    return isinstance(exc, KafkaError) and not _unreachable(exc)


class KafkaPublisher:
    """The relay's Kafka producer (acks=all), and the sending of a topic's messages through it."""

    def __init__(self, kafka: KafkaSettings, send_timeout: float) -> None:
        self._options = kafka.producer_options(request_timeout_ms=int(send_timeout * 1000))
        self._max_request_size = int(self._options["max_request_size"])
        self._close_timeout = 2 * send_timeout
        self._partitioner = DefaultPartitioner()
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        """Start the producer unless it runs; raise `BrokerDown` if the broker cannot be reached."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(**self._options)
        try:
            await producer.start()
        except KafkaError as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise BrokerDown(describe(exc)) from exc
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), self._close_timeout)

    async def publish(self, topic: str, messages: Sequence[OutboxMessage], leased: Leased) -> list[Delivery]:
        """Send a topic's messages (in outbox order) by partition, partitions at once."""
        producer = self._producer
        assert producer is not None, "start() the publisher first"
        outcome = RoundOutcome()
        partitions = await self._by_partition(producer, topic, messages, outcome)
        await asyncio.gather(*(
            self._send_rows(producer, topic, partition, part, set(), leased, outcome)
            for partition, part in partitions.items()
        ))
        answers: dict[int, Delivery] = dict.fromkeys(outcome.published)
        answers.update((message.id, exc) for message, exc in outcome.refused)
        missing: Delivery = NOT_SENT if outcome.down is None else broker_down(outcome.down)
        return [answers.get(message.id, missing) for message in messages]

    async def _by_partition(
        self, producer: AIOKafkaProducer, topic: str, messages: Sequence[OutboxMessage], outcome: RoundOutcome
    ) -> dict[int, list[OutboxMessage]]:
        """Messages by the partition the producer's partitioner picks for their key, in outbox order."""
        try:
            candidates = sorted(await producer.partitions_for(topic))
        except KafkaError as exc:
            if not _refusal(exc):
                outcome.down = exc
                return {}
            # Refused for the whole topic (not authorized, ...): the first message of each key counts it.
            refused_keys: set[str] = set()
            for message in messages:
                if message.key not in refused_keys:
                    refused_keys.add(message.key)
                    outcome.refused.append((message, exc))
            return {}
        chosen: dict[str, int] = {}
        groups: dict[int, list[OutboxMessage]] = {}
        for message in messages:
            partition = chosen.get(message.key)
            if partition is None:
                partition = chosen[message.key] = self._partitioner(message.key.encode(), candidates, candidates)
            groups.setdefault(partition, []).append(message)
        return groups

    async def _send_rows(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partition: int,
        messages: Sequence[OutboxMessage],
        held: set[str],
        leased: Leased,
        outcome: RoundOutcome,
    ) -> bool:
        """Send one partition's messages as record batches, each only once the one before is acknowledged.

        Returns False when the partition must stop for this round: the broker is unreachable, or it
        refused a batch and splitting it found the message it objects to (one such search per
        partition and round; the next round goes on without that message, which waits out its backoff).
        """
        start = 0
        while start < len(messages):
            if outcome.down is not None:
                return False
            batch, members, start = self._fill(producer, messages, start, held, leased, outcome)
            if not members:
                continue
            failure = await self._send_batch(producer, topic, partition, batch)
            if failure is None:
                outcome.published.extend(message.id for message in members)
            elif not _refusal(failure):
                outcome.down = outcome.down or failure
                return False
            elif len(members) == 1:
                outcome.refused.append((members[0], failure))
                held.add(members[0].key)
                return False
            else:
                # Which message does the broker object to (if not to the batch as a whole)? Its halves
                # go again, in order, until a single message is refused; the others are published.
                half = len(members) // 2
                for part in (members[:half], members[half:]):
                    if not await self._send_rows(producer, topic, partition, part, held, leased, outcome):
                        return False
        return True

    def _fill(
        self,
        producer: AIOKafkaProducer,
        messages: Sequence[OutboxMessage],
        start: int,
        held: set[str],
        leased: Leased,
        outcome: RoundOutcome,
    ) -> tuple[Any, list[OutboxMessage], int]:
        """A record batch of the messages from `start` on that fit, and the index of the first one left."""
        batch = producer.create_batch()
        members: list[OutboxMessage] = []
        index = start
        while index < len(messages):
            message = messages[index]
            key = message.key
            if key in held:
                index += 1
                continue
            if not leased(message):  # the lease might lapse while this batch is out
                held.add(key)
                index += 1
                continue
            if message.attempts and members:
                break  # a retry goes in a batch of its own
            key_bytes, value = key.encode(), message.data.encode()
            headers = kafka_headers(**message.attribute_values())
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key_bytes, value, headers)
            if size > self._max_request_size:
                outcome.refused.append((message, MessageSizeTooLargeError(
                    f"the message is {size} bytes, more than max_request_size {self._max_request_size}"
                )))
                held.add(key)
                index += 1
                continue
            if batch.append(key=key_bytes, value=value, timestamp=None, headers=headers) is None:
                if members:
                    break  # full: the message starts the next batch
                outcome.refused.append((message, MessageSizeTooLargeError(
                    f"the message is {size} bytes, more than fits in a record batch"
                )))
                held.add(key)
                batch = producer.create_batch()  # a refused append closes the batch
                index += 1
                continue
            members.append(message)
            index += 1
            if message.attempts:
                break
        return batch, members, index

    async def _send_batch(
        self, producer: AIOKafkaProducer, topic: str, partition: int, batch: Any
    ) -> BaseException | None:
        """Send a record batch and await the broker's answer; return why it failed, if it did."""
        try:
            await (await producer.send_batch(batch, topic, partition=partition))
        except Exception as exc:
            return exc
        return None
