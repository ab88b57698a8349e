"""Typed errors of the outbox, each with the context a caller needs to act on it."""

from __future__ import annotations

from eventstore import EventStoreError, InvalidArgument


class OutboxError(EventStoreError):
    """Base of every error the outbox raises on purpose."""


class InvalidRoute(OutboxError, InvalidArgument):
    """A routing rule is malformed (bad topic name, empty type list, ...); raised when it is built."""


class InvalidSettings(OutboxError, InvalidArgument):
    """Relay or Kafka settings that cannot work together."""


class NotACloudEvent(OutboxError, InvalidArgument):
    """A Kafka message lacks the headers of the CloudEvents Kafka binding (binary mode)."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"not a CloudEvent in binary mode: missing header(s) {', '.join(missing)}")
        self.missing = missing


class BrokerUnavailable(OutboxError):
    """The Kafka broker could not be reached (or the embedded one could not be started)."""
