"""Relay and Kafka settings: bad combinations fail when built; real-Kafka options reach aiokafka intact."""

from __future__ import annotations

import ssl
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from outbox import (
    InvalidSettings,
    KafkaSettings,
    NatsSettings,
    RabbitMQSettings,
    Relay,
    RelaySettings,
    broker_settings,
)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"security_protocol": "SSL"}, "needs an ssl_context"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512"}, "needs sasl_plain_username"),
        ({"extra": {"acks": 1}}, "must not set acks"),
        ({"extra": {"transactional_id": "x"}}, "must not set transactional_id"),
        ({"bootstrap_servers": ""}, "at least 1 character"),
        ({"max_request_size": 0}, "greater than 0"),
        ({"unknown": 1}, "Extra inputs are not permitted"),
    ],
)
def test_kafka_settings_that_cannot_work_are_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSettings, match=message):
        KafkaSettings(**{"bootstrap_servers": "127.0.0.1:9092", **values})


async def test_tls_sasl_and_idempotence_pass_through_to_aiokafka() -> None:
    context = ssl.create_default_context()
    kafka = KafkaSettings(
        bootstrap_servers="broker-1:9093,broker-2:9093",
        security_protocol="SASL_SSL",
        ssl_context=context,
        sasl_mechanism="SCRAM-SHA-256",
        sasl_plain_username="relay",
        sasl_plain_password=SecretStr("s3cret"),
        enable_idempotence=True,
        compression_type="gzip",
        extra={"metadata_max_age_ms": 60_000},
    )
    options = kafka.producer_options(request_timeout_ms=5000)
    assert options["acks"] == "all" and options["ssl_context"] is context
    assert options["sasl_plain_password"] == "s3cret" and options["enable_idempotence"] is True
    assert "s3cret" not in repr(kafka)
    # aiokafka accepts the combination (it validates without connecting).
    producer = AIOKafkaProducer(**options)
    assert producer._request_timeout_ms == 5000
    assert producer.client._sasl_mechanism == "SCRAM-SHA-256"
    assert producer.client._security_protocol == "SASL_SSL"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"lease_ttl": 10.0, "send_timeout": 5.0}, "lease_ttl 10.0s is too short"),
        ({"batch_size": 0}, "greater than 0"),
        ({"max_attempts": 0}, "greater than 0"),
        ({"retention": -1.0}, "greater than or equal to 0"),
        ({"relay_id": ""}, "at least 1 character"),
        # Accepted, these overflowed at run time (2.0 ** attempts, database intervals) on every round.
        ({"max_attempts": 5000}, "less than or equal to 1000"),
        ({"retry_backoff": 1e308}, "less than or equal to 86400"),
        ({"max_retry_backoff": 1e308}, "less than or equal to 86400"),
        ({"lease_ttl": 1e300}, "less than or equal to 86400"),
    ],
)
def test_relay_settings_that_cannot_work_are_rejected(values: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSettings, match=message):
        RelaySettings(**values)


def test_the_longest_backoff_for_the_most_attempts_is_a_number() -> None:
    settings = RelaySettings(max_attempts=1000, retry_backoff=86400, max_retry_backoff=86400)
    assert settings.retry_delay(999) == 86400


def test_default_relay_ids_are_unique() -> None:
    assert RelaySettings().relay_id != RelaySettings().relay_id


def test_a_broker_is_chosen_by_its_url() -> None:
    assert isinstance(broker_settings("nats://127.0.0.1:4222"), NatsSettings)
    rabbit = broker_settings("amqp://guest:guest@127.0.0.1:5672/")
    assert isinstance(rabbit, RabbitMQSettings) and rabbit.exchange == "outbox"
    assert "guest:guest" not in repr(rabbit), "the password stays secret"
    kafka = broker_settings("kafka://a:9092,kafka://b:9092")
    assert isinstance(kafka, KafkaSettings) and kafka.bootstrap_servers == "a:9092,b:9092"
    assert broker_settings("a:9092") == KafkaSettings(bootstrap_servers="a:9092")


def test_bad_broker_settings_are_one_clear_error() -> None:
    with pytest.raises(InvalidSettings, match="no broker for mqtt://"):
        broker_settings("mqtt://127.0.0.1")
    for nothing in (None, "", "  "):
        with pytest.raises(InvalidSettings, match="non-empty string"):
            broker_settings(nothing)  # type: ignore[arg-type]
    with pytest.raises(InvalidSettings, match="not a NATS URL"):
        NatsSettings(servers="http://127.0.0.1:4222")
    with pytest.raises(InvalidSettings, match="subject_prefix"):
        NatsSettings(subject_prefix="shop")
    with pytest.raises(InvalidSettings, match="AMQP URL"):
        RabbitMQSettings(url="http://127.0.0.1")
    with pytest.raises(InvalidSettings, match="extra must not set url"):
        RabbitMQSettings(extra={"url": "amqp://x"})


async def test_a_relay_refuses_what_is_not_a_broker(store: Any) -> None:
    with pytest.raises(InvalidSettings, match="not int"):
        Relay(store, 42)  # type: ignore[arg-type]
