"""From a broker's settings (or URL) to its `Publisher`; a broker's client library is imported only when used."""

from __future__ import annotations

from outbox.errors import InvalidSettings
from outbox.publishing import Publisher
from outbox.settings import BrokerSettings, KafkaSettings, NatsSettings, RabbitMQSettings, broker_settings

Broker = BrokerSettings | Publisher | str
"""What a relay publishes to: a broker URL, a broker's settings, or a publisher of the user's own."""


def resolve(broker: Broker) -> BrokerSettings | Publisher:
    if isinstance(broker, str):
        return broker_settings(broker)
    if isinstance(broker, KafkaSettings | NatsSettings | RabbitMQSettings | Publisher):
        return broker
    raise InvalidSettings(
        f"a relay publishes to a broker URL, KafkaSettings, NatsSettings, RabbitMQSettings or a Publisher, "
        f"not {type(broker).__name__}"
    )


def publisher_for(broker: BrokerSettings | Publisher, send_timeout: float) -> Publisher:
    """The publisher of these settings (a `Publisher` given as it is)."""
    if isinstance(broker, KafkaSettings):
        from outbox.kafka import KafkaPublisher

        return KafkaPublisher(broker, send_timeout)
    if isinstance(broker, NatsSettings):
        try:
            from outbox.jetstream import NatsPublisher
        except ImportError:
            raise InvalidSettings("NATS needs nats-py: pip install 'eventstore[nats]'") from None
        return NatsPublisher(broker, send_timeout)
    if isinstance(broker, RabbitMQSettings):
        try:
            from outbox.rabbitmq import RabbitMQPublisher
        except ImportError:
            raise InvalidSettings("RabbitMQ needs aio-pika: pip install 'eventstore[rabbitmq]'") from None
        return RabbitMQPublisher(broker, send_timeout)
    return broker


def describe_broker(broker: BrokerSettings | Publisher) -> str:
    """Where a relay publishes, for logs (no credentials)."""
    if isinstance(broker, KafkaSettings):
        return f"Kafka {broker.bootstrap_servers}"
    if isinstance(broker, NatsSettings):
        return "NATS " + ",".join(s.split("@")[-1] for s in broker.server_list)
    if isinstance(broker, RabbitMQSettings):
        return f"RabbitMQ {broker.url.get_secret_value().split('@')[-1]} exchange {broker.exchange!r}"
    return type(broker).__name__
