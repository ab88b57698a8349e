"""The RabbitMQ publisher: persistent messages on a durable topic exchange, routing key = topic, with confirms.

A key's next message goes out only once the broker confirmed the one before (publisher confirms:
the message is routed and, for durable queues, written), so a key's messages reach its queues in
outbox order whatever fails; keys go at once on one channel. RabbitMQ has no duplicate window: a
message whose confirmation was lost is sent again (at least once; consumers skip it with the `Inbox`,
by the AMQP `message_id` = event id, which is also the CloudEvents id).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import aio_pika
import aio_pika.exceptions
import aiormq.exceptions
from aio_pika.abc import AbstractConnection, AbstractExchange

from outbox.cloudevents import CONTENT_TYPE, amqp_headers
from outbox.publishing import Delivery, Leased, OutboxMessage, broker_down, publish_in_key_order
from outbox.settings import RabbitMQSettings

_CHANNEL_REFUSALS = (aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelAccessRefused)
"""The broker's answer to one message (too large, not allowed) that closes the whole channel."""


def _closes_channel(exc: BaseException) -> bool:
    return isinstance(exc, _CHANNEL_REFUSALS)


def _unreachable(exc: BaseException) -> bool:
    """A nack, or a message returned as unroutable, is the broker's answer; anything else means it is gone."""
    return not isinstance(exc, aio_pika.exceptions.DeliveryError | aio_pika.exceptions.PublishError)


class RabbitMQPublisher:
    """Publishes on one confirming channel of a connection of its own, which it does not reconnect: the relay does."""

    def __init__(self, settings: RabbitMQSettings, send_timeout: float) -> None:
        self.settings = settings
        self._timeout = send_timeout
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._one_at_a_time = False
        """After a refusal that closed the channel: every message in flight failed with it, so whose it was is
        found by sending one at a time, until a round goes through without one."""

    async def start(self) -> None:
        if self._connection is not None:
            return
        connection: AbstractConnection | None = None
        try:
            connection = await aio_pika.connect(
                self.settings.url.get_secret_value(), timeout=self._timeout,
                ssl_context=self.settings.ssl_context, **self.settings.extra,
            )
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True, timeout=self._timeout
            )
        except Exception as exc:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
            raise broker_down(exc) from exc
        self._connection, self._exchange = connection, exchange

    async def stop(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def publish(self, topic: str, messages: Sequence[OutboxMessage], leased: Leased) -> list[Delivery]:
        exchange = self._exchange
        assert exchange is not None, "start() the publisher first"

        async def send(message: OutboxMessage) -> None:
            body = aio_pika.Message(
                message.data.encode(),
                headers=dict(amqp_headers(message.key, **message.attribute_values())),
                content_type=CONTENT_TYPE,
                message_id=message.event_id,
                type=message.event_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(body, routing_key=topic, mandatory=True, timeout=self._timeout)

        careful = self._one_at_a_time
        closed = False

        def unreachable(exc: BaseException) -> bool:
            nonlocal closed
            closed = closed or isinstance(exc, _CHANNEL_REFUSALS)
            if careful:  # one message in flight: a refusal that closed the channel is its own
                return _unreachable(exc) and not isinstance(exc, _CHANNEL_REFUSALS)
            return closed or _unreachable(exc)  # whose it was is unknown: nothing is held against any

        results = await publish_in_key_order(
            messages, leased, send, unreachable, one_at_a_time=careful, last=_closes_channel
        )
        self._one_at_a_time = closed  # until a round goes through without such a refusal
        return results
