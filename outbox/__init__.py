"""Transactional outbox: messages written with the events that cause them, relayed to Kafka in order per key."""

from outbox.cloudevents import CloudEvent, from_kafka, from_record, kafka_headers
from outbox.errors import (
    BrokerUnavailable,
    InvalidRoute,
    InvalidSettings,
    NotACloudEvent,
    OutboxError,
    RoutingError,
)
from outbox.inbox import Inbox
from outbox.operations import DeadMessage, OutboxStatus, RelayStatus, TopicStatus, prune_published, retry_dead, status
from outbox.relay import KafkaSettings, Relay, RelaySettings, RelayStats
from outbox.schema import SLOT_COUNT
from outbox.writer import Outbox, OutboxMessage, Route, slot_of

__all__ = [
    "SLOT_COUNT",
    "BrokerUnavailable",
    "CloudEvent",
    "DeadMessage",
    "Inbox",
    "InvalidRoute",
    "InvalidSettings",
    "KafkaSettings",
    "NotACloudEvent",
    "Outbox",
    "OutboxError",
    "OutboxMessage",
    "OutboxStatus",
    "Relay",
    "RelaySettings",
    "RelayStats",
    "RelayStatus",
    "Route",
    "RoutingError",
    "TopicStatus",
    "from_kafka",
    "from_record",
    "kafka_headers",
    "prune_published",
    "retry_dead",
    "slot_of",
    "status",
]
