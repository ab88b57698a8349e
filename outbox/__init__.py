"""Transactional outbox: messages written with the events that cause them, relayed to Kafka in order per key.

Writing: `await Outbox([Route("orders", ["OrderPlaced"])], source="/shop").declare(store)` puts the
routes in the database; from then on a trigger turns every event a route matches into a row in
`outbox` inside the append's own transaction, whichever process appends, with its topic and key
(default: the stream id). A rolled-back append leaves no message.

Relaying: `async with Relay(store, KafkaSettings(bootstrap_servers=...)) as relay:` (or `eventstore
outbox relay`) publishes them with acks=all as CloudEvents (Kafka binding, binary mode), at least
once and in order per key, also with several relays running (keys are hashed into `SLOT_COUNT` slots
and each slot is leased to one relay: `outbox.leases`). See `outbox.relay` and `outbox.publishing` for
failures: an unreachable broker costs nothing but time; a message the broker refuses is retried, then
dead-lettered (`retry_dead`).

Consuming: `Inbox(store, "billing").handle(from_record(record), effect)` applies each message once.
"""

from outbox.cloudevents import CloudEvent, from_kafka, from_record, kafka_headers
from outbox.errors import (
    BrokerUnavailable,
    InvalidRoute,
    InvalidSettings,
    NotACloudEvent,
    OutboxError,
)
from outbox.inbox import Inbox
from outbox.operations import (
    DeadMessage,
    OutboxStatus,
    RelayStatus,
    TopicStatus,
    prune_orphans,
    prune_published,
    retry_dead,
    status,
)
from outbox.relay import Relay, RelayStats
from outbox.schema import SLOT_COUNT
from outbox.settings import KafkaSettings, RelaySettings
from outbox.writer import Outbox, Route

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
    "OutboxStatus",
    "Relay",
    "RelaySettings",
    "RelayStats",
    "RelayStatus",
    "Route",
    "TopicStatus",
    "from_kafka",
    "from_record",
    "kafka_headers",
    "prune_orphans",
    "prune_published",
    "retry_dead",
    "status",
]
