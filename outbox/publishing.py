"""The relay's side of a broker: one `Publisher` interface, and the sending of a round through it.

A publisher is told to publish a topic's messages (in outbox order) and answers for each message:
`None` when the broker acknowledged it; `BrokerDown` when the broker could not be reached (the round
ends, nothing is held against the message); `NotSent` when it did not try (an earlier message of its
key failed, or the message's slot lease would not outlast the send); any other exception when the
broker refused the message (it waits out a backoff, is retried, then dead-lettered).

Its one duty beyond that is order: a key's messages reach the broker in the order given, and once one
of them fails none after it is sent in that call. Then nothing can overtake a message that failed,
whatever failed and however. `publish_in_key_order` does this for any broker that acknowledges one
message at a time (NATS JetStream, RabbitMQ); Kafka sends partitions of record batches instead
(`outbox.kafka`). Implementations: `KafkaPublisher`, `NatsPublisher` (`outbox.jetstream`),
`RabbitMQPublisher` (`outbox.rabbitmq`); a user's own class needs only these three methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from outbox.cloudevents import DataSchemas
from outbox.leases import SlotLeases


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
    dataschema: str | None
    """The URI of the schema that shaped the data: fetched as NULL, filled in by the `Sender`."""
    sealed: str | None
    """The event's metadata when `data` holds sealed personal fields (opened before publishing)."""
    traceparent: str | None = None
    tracestate: str | None = None
    """The W3C trace context of the append (its metadata); the relay puts its publish span's in place."""

    @property
    def place(self) -> tuple[int, int, int]:
        """The message's place in the log: (log_xid, position, id)."""
        return self.log_xid, self.position, self.id

    def attribute_values(self) -> dict[str, Any]:
        """Keyword arguments of `outbox.cloudevents.attributes` (and of each binding's headers)."""
        return {
            "id": self.event_id, "type": self.event_type, "source": self.source, "time": self.time,
            "subject": self.stream_id, "correlation_id": self.correlation_id,
            "causation_id": self.causation_id, "stream_version": self.stream_version,
            "dataschema": self.dataschema, "traceparent": self.traceparent, "tracestate": self.tracestate,
        }


class BrokerDown(Exception):
    """The broker could not be reached; nothing is held against the messages."""


class NotSent(Exception):
    """The publisher did not try to send this message; it stays pending for the next round."""


NOT_SENT = NotSent("not sent")

Delivery = BaseException | None
"""A publisher's answer for one message: None (acknowledged), `BrokerDown`, `NotSent`, or a refusal."""

Leased = Callable[[OutboxMessage], bool]
"""Whether a message may still be sent now: its slot's lease outlasts the longest send."""


@runtime_checkable
class Publisher(Protocol):
    """What the relay needs of a broker. Implement it to relay to another one.

    `start` connects (raise `BrokerDown` when the broker cannot be reached: the relay backs off and
    starts it again), `stop` disconnects and must not raise. `publish` sends `messages`, all of one
    topic and in outbox order, and returns one `Delivery` per message, in the same order.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, topic: str, messages: Sequence[OutboxMessage], leased: Leased) -> Sequence[Delivery]: ...


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def broker_down(exc: BaseException) -> BrokerDown:
    down = BrokerDown(describe(exc))
    down.__cause__ = exc
    return down


async def publish_in_key_order(
    messages: Sequence[OutboxMessage],
    leased: Leased,
    send: Callable[[OutboxMessage], Awaitable[object]],
    unreachable: Callable[[BaseException], bool],
    *,
    one_at_a_time: bool = False,
    last: Callable[[BaseException], bool] | None = None,
) -> list[Delivery]:
    """Send each key's messages one after another, each once the one before is acknowledged; keys at once.

    A key stops at its first failure; every key stops starting new sends once the broker is found
    unreachable (what is already in flight is still answered). `one_at_a_time`: one message in flight
    in all, so a refusal that fails every send in flight (a closed channel) is known to be that
    message's; `last` tells such a refusal, after which nothing more is sent in this call.
    """
    results: list[Delivery] = [NOT_SENT] * len(messages)
    by_key: dict[str, list[int]] = {}
    for index, message in enumerate(messages):
        by_key.setdefault(message.key, []).append(index)
    down = False
    turn: contextlib.AbstractAsyncContextManager[Any] = asyncio.Lock() if one_at_a_time else contextlib.nullcontext()

    async def one_key(indexes: list[int]) -> None:
        nonlocal down
        for index in indexes:
            message = messages[index]
            async with turn:
                if down or not leased(message):
                    return
                try:
                    await send(message)
                except Exception as exc:
                    if unreachable(exc):
                        down = True
                        results[index] = broker_down(exc)
                    else:
                        down = down or (last is not None and last(exc))
                        results[index] = exc
                    return
            results[index] = None

    await asyncio.gather(*(one_key(indexes) for indexes in by_key.values()))
    return results


@dataclass
class RoundOutcome:
    """What the broker answered in one round, collected from the round's topics."""

    published: list[int] = field(default_factory=list)
    refused: list[tuple[OutboxMessage, BaseException]] = field(default_factory=list)
    down: BaseException | None = None
    max_in_flight: int = 0


class Sender:
    """Sends a relay's rounds through a `Publisher`: topics at once, only messages of usable slots."""

    def __init__(
        self, publisher: Publisher, leases: SlotLeases, close_timeout: float, dataschema: str | None = None
    ) -> None:
        self.publisher = publisher
        self._leases = leases
        self._dataschemas = DataSchemas(dataschema)
        self._close_timeout = close_timeout
        self._started = False
        self._usable: set[int] = set()
        self._usable_at = 0.0

    async def start(self) -> None:
        """Start the publisher unless it runs; raise `BrokerDown` if the broker cannot be reached."""
        if self._started:
            return
        try:
            await self.publisher.start()
        except BrokerDown:
            await self.stop()
            raise
        except Exception as exc:
            await self.stop()
            raise broker_down(exc) from exc
        self._started = True

    async def stop(self) -> None:
        self._started = False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.publisher.stop(), self._close_timeout)

    def _leased(self, message: OutboxMessage) -> bool:
        now = time.monotonic()
        if now - self._usable_at > 0.05:  # a set of the usable slots, at most 50 ms old
            self._usable, self._usable_at = self._leases.usable(), now
        return message.slot in self._usable

    async def send(self, messages: list[OutboxMessage]) -> RoundOutcome:
        """Send a round's messages (in outbox order) and collect the broker's answers."""
        outcome = RoundOutcome(max_in_flight=len(messages))
        topics: dict[str, list[OutboxMessage]] = {}
        for message in messages:
            if message.schema_version is not None:
                uri = self._dataschemas.uri(message.source, message.event_type, message.schema_version)
                message = message._replace(dataschema=uri)
            topics.setdefault(message.topic, []).append(message)
        self._usable_at = 0.0
        answers = await asyncio.gather(
            *(self._publish(topic, part) for topic, part in topics.items()), return_exceptions=True
        )
        for part, answer in zip(topics.values(), answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception):
                    raise answer
                outcome.down = outcome.down or (answer.__cause__ if isinstance(answer, BrokerDown) else answer)
                continue
            for message, delivery in zip(part, answer, strict=True):
                if delivery is None:
                    outcome.published.append(message.id)
                elif isinstance(delivery, BrokerDown):
                    outcome.down = outcome.down or delivery.__cause__ or delivery
                elif not isinstance(delivery, NotSent):
                    outcome.refused.append((message, delivery))
        return outcome

    async def _publish(self, topic: str, messages: list[OutboxMessage]) -> Sequence[Delivery]:
        answers = await self.publisher.publish(topic, messages, self._leased)
        if len(answers) != len(messages):
            raise RuntimeError(
                f"{type(self.publisher).__name__}.publish answered {len(answers)} times for {len(messages)} messages"
            )
        return answers
