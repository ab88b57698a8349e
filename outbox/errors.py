"""Typed errors of the outbox, each with the context a caller needs to act on it."""

from __future__ import annotations

from eventstore import EventStoreError


class OutboxError(EventStoreError):
    """Base of every error the outbox raises on purpose."""


class InvalidRoute(OutboxError, ValueError):
    """A routing rule is malformed (bad topic name, empty type list, ...); raised when it is built."""


class RoutingError(OutboxError, ValueError):
    """A routing rule failed for one event (its key function raised or returned no usable key).

    Raised inside the append's transaction, so the events are not written either.
    """

    def __init__(self, topic: str, event_type: str, stream_id: str, reason: str) -> None:
        super().__init__(f"route to topic {topic!r} failed for {event_type!r} in {stream_id!r}: {reason}")
        self.topic = topic
        self.event_type = event_type
        self.stream_id = stream_id
        self.reason = reason


class InvalidSettings(OutboxError, ValueError):
    """Relay or Kafka settings that cannot work together."""


class NotACloudEvent(OutboxError, ValueError):
    """A Kafka message lacks the headers of the CloudEvents Kafka binding (binary mode)."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"not a CloudEvent in binary mode: missing header(s) {', '.join(missing)}")
        self.missing = missing


class BrokerUnavailable(OutboxError):
    """The Kafka broker could not be reached (or the embedded one could not be started)."""
