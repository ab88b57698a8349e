"""Sending one round of outbox messages to Kafka: by partition, as record batches one after another.

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
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, ProducerClosed
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from outbox.cloudevents import DataSchemas, kafka_headers
from outbox.leases import SlotLeases
from outbox.settings import KafkaSettings, RelaySettings


class OutboxMessage(NamedTuple):
    """A pending message as the relay fetches it (`sql.FETCH_PENDING`, in this column order)."""

    id: int
    slot: int
    topic: str
    key: str
    data: str
    event_id: str
    event_type: str
    source: str
    stream_id: str
    stream_version: int
    correlation_id: str | None
    causation_id: str | None
    time: str
    attempts: int
    log_xid: int
    position: int
    schema_version: str | None
    """The metadata's `schema_version` as text: set by typed events (`aggregates`), absent on raw ones."""
    traceparent: str | None = None
    tracestate: str | None = None

    @property
    def place(self) -> tuple[int, int, int]:
        """The message's place in the log: (log_xid, position, id)."""
        return self.log_xid, self.position, self.id


@dataclass
class RoundOutcome:
    """What the broker answered in one round, collected from the round's partitions."""

    published: list[int] = field(default_factory=list)
    refused: list[tuple[OutboxMessage, BaseException]] = field(default_factory=list)
    down: BaseException | None = None
    in_flight: int = 0
    max_in_flight: int = 0


class BrokerDown(Exception):
    """The broker could not be reached; nothing is held against the messages."""


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, KafkaError):
        return bool(exc.retriable) or isinstance(exc, KafkaTimeoutError | ProducerClosed)
    return isinstance(exc, OSError | TimeoutError)


def _refusal(exc: BaseException) -> bool:
    """The broker answered and said no; anything else ends the round as if the broker were down."""
    return isinstance(exc, KafkaError) and not _unreachable(exc)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Publisher:
    """The relay's Kafka producer, and the sending of a round's messages through it."""

    def __init__(self, kafka: KafkaSettings, settings: RelaySettings, leases: SlotLeases) -> None:
        self._options = kafka.producer_options(request_timeout_ms=int(settings.send_timeout * 1000))
        self._max_request_size = int(self._options["max_request_size"])
        self._close_timeout = 2 * settings.send_timeout
        self._partitioner = DefaultPartitioner()
        self._producer: AIOKafkaProducer | None = None
        self._leases = leases
        self._dataschemas = DataSchemas(settings.dataschema)

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

    async def send(self, messages: list[OutboxMessage]) -> RoundOutcome:
        """Send a round's messages (in outbox order) and collect the broker's answers."""
        producer = self._producer
        assert producer is not None, "start() the publisher first"
        outcome = RoundOutcome()
        partitions = await self._by_partition(producer, messages, outcome)
        await asyncio.gather(*(
            self._send_rows(producer, topic, partition, part, set(), outcome)
            for (topic, partition), part in partitions.items()
        ))
        return outcome

    async def _by_partition(
        self, producer: AIOKafkaProducer, messages: list[OutboxMessage], outcome: RoundOutcome
    ) -> dict[tuple[str, int], list[OutboxMessage]]:
        """Messages by the partition the producer's partitioner picks for their key, in outbox order."""
        partitions: dict[str, list[int] | BaseException] = {}
        for topic in dict.fromkeys(message.topic for message in messages):
            try:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            except KafkaError as exc:
                if not _refusal(exc):
                    outcome.down = exc
                    return {}
                partitions[topic] = exc
        chosen: dict[tuple[str, str], int] = {}
        groups: dict[tuple[str, int], list[OutboxMessage]] = {}
        refused_keys: set[str] = set()
        for message in messages:
            topic, key = message.topic, message.key
            candidates = partitions[topic]
            if isinstance(candidates, BaseException):  # refused for the whole topic (not authorized, ...)
                if key not in refused_keys:
                    refused_keys.add(key)
                    outcome.refused.append((message, candidates))
                continue
            partition = chosen.get((topic, key))
            if partition is None:
                partition = chosen[topic, key] = self._partitioner(key.encode(), candidates, candidates)
            groups.setdefault((topic, partition), []).append(message)
        return groups

    async def _send_rows(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partition: int,
        messages: Sequence[OutboxMessage],
        held: set[str],
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
            batch, members, start = self._fill(producer, messages, start, held, outcome)
            if not members:
                continue
            failure = await self._send_batch(producer, topic, partition, batch, len(members), outcome)
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
                    if not await self._send_rows(producer, topic, partition, part, held, outcome):
                        return False
        return True

    def _fill(
        self,
        producer: AIOKafkaProducer,
        messages: Sequence[OutboxMessage],
        start: int,
        held: set[str],
        outcome: RoundOutcome,
    ) -> tuple[Any, list[OutboxMessage], int]:
        """A record batch of the messages from `start` on that fit, and the index of the first one left."""
        batch = producer.create_batch()
        members: list[OutboxMessage] = []
        usable = self._leases.usable()
        index = start
        while index < len(messages):
            message = messages[index]
            key = message.key
            if key in held:
                index += 1
                continue
            if message.slot not in usable:  # the lease might lapse while this batch is out
                held.add(key)
                index += 1
                continue
            if message.attempts and members:
                break  # a retry goes in a batch of its own
            key_bytes, value = key.encode(), message.data.encode()
            headers = kafka_headers(
                id=message.event_id, type=message.event_type, source=message.source, time=message.time,
                subject=message.stream_id, correlation_id=message.correlation_id,
                causation_id=message.causation_id, stream_version=message.stream_version,
                dataschema=self._dataschemas.uri(message.source, message.event_type, message.schema_version),
                traceparent=message.traceparent, tracestate=message.tracestate,
            )
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
        self, producer: AIOKafkaProducer, topic: str, partition: int, batch: Any, count: int, outcome: RoundOutcome
    ) -> BaseException | None:
        """Send a record batch and await the broker's answer; return why it failed, if it did."""
        outcome.in_flight += count
        outcome.max_in_flight = max(outcome.max_in_flight, outcome.in_flight)
        try:
            await (await producer.send_batch(batch, topic, partition=partition))
        except Exception as exc:
            return exc
        finally:
            outcome.in_flight -= count
        return None
