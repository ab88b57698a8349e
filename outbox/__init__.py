"""Transactional outbox: messages written with the events that cause them, relayed in order per key.

Writing: `await Outbox([Route("orders", ["OrderPlaced"])], source="/shop").declare(store)` puts the
routes in the database; from then on a trigger turns every event a route matches into a row in
`outbox` inside the append's own transaction, whichever process appends, with its topic and key
(default: the stream id). A rolled-back append leaves no message.

Relaying: `async with Relay(store, KafkaSettings(bootstrap_servers=...)) as relay:` (or `eventstore
outbox relay`) publishes them as CloudEvents (binary mode) to Kafka (acks=all), NATS JetStream
(`NatsSettings`, or `"nats://..."`) or RabbitMQ (`RabbitMQSettings`, or `"amqp://..."`), or through a
`Publisher` of your own, at least once and in order per key, also with several relays running (keys
are hashed into `SLOT_COUNT` slots and each slot is leased to one relay: `outbox.leases`). See
`outbox.relay` and `outbox.publishing` for failures: an unreachable broker costs nothing but time; a
message the broker refuses is retried, then dead-lettered (`retry_dead`).

Consuming: `Inbox(store, "billing").handle(from_record(record), effect)` applies each message once
(`from_nats(msg)`, `from_amqp(message)` read the other brokers' messages).
"""

from outbox.cloudevents import (
    CloudEvent,
    amqp_headers,
    from_amqp,
    from_kafka,
    from_nats,
    from_record,
    kafka_headers,
    nats_headers,
)
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
from outbox.publishing import NOT_SENT, BrokerDown, Delivery, NotSent, OutboxMessage, Publisher, publish_in_key_order
from outbox.relay import Relay, RelayStats
from outbox.schema import SLOT_COUNT
from outbox.settings import (
    BrokerSettings,
    KafkaSettings,
    NatsSettings,
    RabbitMQSettings,
    RelaySettings,
    broker_settings,
)
from outbox.writer import COMPATIBILITY, Compatibility, Outbox, Route

__all__ = [
    "COMPATIBILITY",
    "NOT_SENT",
    "SLOT_COUNT",
    "BrokerDown",
    "BrokerSettings",
    "BrokerUnavailable",
    "CloudEvent",
    "Compatibility",
    "DeadMessage",
    "Delivery",
    "Inbox",
    "InvalidRoute",
    "InvalidSettings",
    "KafkaSettings",
    "NatsSettings",
    "NotACloudEvent",
    "NotSent",
    "Outbox",
    "OutboxError",
    "OutboxMessage",
    "OutboxStatus",
    "Publisher",
    "RabbitMQSettings",
    "Relay",
    "RelaySettings",
    "RelayStats",
    "RelayStatus",
    "Route",
    "TopicStatus",
    "amqp_headers",
    "broker_settings",
    "from_amqp",
    "from_kafka",
    "from_nats",
    "from_record",
    "kafka_headers",
    "nats_headers",
    "prune_orphans",
    "prune_published",
    "publish_in_key_order",
    "retry_dead",
    "status",
]
