"""The NATS JetStream publisher: a subject per route, one message at a time per key, acknowledged by the stream.

Each message carries `Nats-Msg-Id` = `<event id>:<topic>`, so JetStream drops a re-send within the
stream's duplicate window (2 minutes by default): a relay that crashed between the acknowledgement and
marking the message published, or a send whose acknowledgement was lost, does not store it twice.
(The topic is part of it because one event may go to two routes, whose subjects one stream may both
capture.) A key's next message goes out only once the stream acknowledged the one before, so a key's
messages are stored in outbox order whatever fails; keys go at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from outbox.cloudevents import nats_headers
from outbox.publishing import Delivery, Leased, OutboxMessage, broker_down, publish_in_key_order
from outbox.settings import NatsSettings

MSG_ID = "Nats-Msg-Id"


_STORE_FAILED = 10077
"""JetStream's error code when its store did not take a message: a stream's limits refusing it (maximum
messages or bytes exceeded, with the `discard new` policy) is an answer about this message, though it
comes as a 503; other store failures (a stream restarting) are the broker's."""


def _unreachable(exc: BaseException) -> bool:
    """Refusals are JetStream's own answers (payload too large, wrong stream, a full stream ...), except 503s."""
    if isinstance(exc, nats.js.errors.APIError):
        if exc.err_code == _STORE_FAILED and "exceeded" in (exc.description or ""):
            return False
        return isinstance(exc, nats.js.errors.ServiceUnavailableError) or exc.code == 503
    return not isinstance(exc, nats.errors.MaxPayloadError | nats.errors.BadSubjectError | nats.errors.BadHeaderError)


class NatsPublisher:
    """Publishes to JetStream through a connection of its own, which it does not reconnect: the relay does."""

    def __init__(self, settings: NatsSettings, send_timeout: float) -> None:
        self.settings = settings
        self._timeout = send_timeout
        self._client: Client | None = None
        self._js: JetStreamContext | None = None

    async def start(self) -> None:
        if self._client is not None:
            return
        try:
            client = await nats.connect(
                servers=self.settings.server_list, name=self.settings.name, allow_reconnect=False,
                connect_timeout=max(1, int(self._timeout)), **self.settings.extra,
            )
        except Exception as exc:
            raise broker_down(exc) from exc
        self._client, self._js = client, client.jetstream(timeout=self._timeout)

    async def stop(self) -> None:
        client, self._client, self._js = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def publish(self, topic: str, messages: Sequence[OutboxMessage], leased: Leased) -> list[Delivery]:
        js = self._js
        assert js is not None, "start() the publisher first"
        subject = self.settings.subject(topic)

        async def send(message: OutboxMessage) -> None:
            headers = nats_headers(message.key, **message.attribute_values())
            headers[MSG_ID] = f"{message.event_id}:{topic}"
            await js.publish(subject, message.data.encode(), timeout=self._timeout, headers=headers)

        return await publish_in_key_order(messages, leased, send, _unreachable)


async def ensure_stream(settings: NatsSettings, stream: str, topics: Sequence[str], **config: Any) -> None:
    """Create the stream capturing these topics' subjects (file storage), or add them to it if it exists."""
    client = await nats.connect(servers=settings.server_list, name=settings.name, allow_reconnect=False)
    try:
        js = client.jetstream()
        subjects = [settings.subject(topic) for topic in topics]
        try:
            info = await js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(StreamConfig(name=stream, subjects=subjects, **config))
            return
        known = list(info.config.subjects or [])
        if not set(subjects) <= set(known):
            info.config.subjects = known + [s for s in subjects if s not in known]
            await js.update_stream(info.config)
    finally:
        await client.close()
