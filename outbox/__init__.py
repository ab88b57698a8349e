"""Transactional outbox: messages written with the events that cause them, relayed to Kafka in order per key.

Writing: `Outbox([Route("orders", ["OrderPlaced"])], source="/shop").install(store)` adds an append
hook; every event a route matches becomes a row in `outbox` inside the append's own transaction, with
its topic and key (default: the stream id) computed there. A rolled-back append leaves no message.

Relaying: `async with Relay(url, KafkaSettings(bootstrap_servers=...)) as relay:` (or `eventstore
outbox relay`) publishes them with acks=all as CloudEvents (Kafka binding, binary mode), at least
once and in order per key, also with several relays running (keys are hashed into `SLOT_COUNT` slots
and each slot is leased to one relay). See `outbox.relay` for failures: an unreachable broker costs
nothing but time; a message the broker refuses is retried, then dead-lettered (`retry_dead`).

Consuming: `Inbox(store, "billing").handle(from_record(record), effect)` applies each message once.
"""

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
