"""How a relay reaches its broker (Kafka, NATS JetStream, RabbitMQ) and how it behaves: settings checked when built."""

from __future__ import annotations

import os
import socket
import ssl
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from outbox.cloudevents import DATASCHEMA, check_dataschema_template
from outbox.errors import InvalidSettings


def _default_relay_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


_DAY = 24 * 3600.0
"""The longest lease and backoff accepted: longer ones overflow the database's intervals, and are mistakes."""

class _Settings(BaseModel):
    """Settings whose bad values raise `InvalidSettings` (an `EventStoreError`), not pydantic's error."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidSettings(f"{type(self).__name__}: {exc}") from None


class KafkaSettings(_Settings):
    """How the relay reaches Kafka. Everything here is passed through to `aiokafka.AIOKafkaProducer`.

    `enable_idempotence` is for real Kafka clusters: the embedded `tansu` broker used by the tests
    rejects InitProducerId, so the tests run without it (acks=all, at least once, duplicates possible
    after a crash; consumers use the `Inbox` to skip them).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    bootstrap_servers: str = Field(min_length=1)
    client_id: str = "eventstore-outbox"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    enable_idempotence: bool = False
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    max_request_size: int = Field(default=1024 * 1024, gt=0)
    max_batch_size: int = Field(default=256 * 1024, gt=0)
    linger_ms: int = Field(default=0, ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)
    """Further AIOKafkaProducer keyword arguments, passed verbatim."""

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if self.security_protocol in ("SSL", "SASL_SSL") and self.ssl_context is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs an ssl_context")
        needs_password = self.security_protocol.startswith("SASL") and self.sasl_mechanism in (
            "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"
        )
        if needs_password and (self.sasl_plain_username is None or self.sasl_plain_password is None):
            raise ValueError(f"SASL {self.sasl_mechanism} needs sasl_plain_username and password")
        reserved = {"acks", "bootstrap_servers", "request_timeout_ms", "transactional_id"} & set(self.extra)
        if reserved:
            raise ValueError(f"extra must not set {', '.join(sorted(reserved))}: the relay owns them")
        return self

    def producer_options(self, request_timeout_ms: int) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "acks": "all",
            "request_timeout_ms": request_timeout_ms,
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": (
                self.sasl_plain_password.get_secret_value() if self.sasl_plain_password else None
            ),
            "enable_idempotence": self.enable_idempotence,
            "compression_type": self.compression_type,
            "max_request_size": self.max_request_size,
            "max_batch_size": self.max_batch_size,
            "linger_ms": self.linger_ms,
        }
        options.update(self.extra)
        return options


class NatsSettings(_Settings):
    """How the relay reaches NATS JetStream: a route's topic is published to subject `subject_prefix + topic`.

    Some stream must capture those subjects (`nats stream add`, or `jetstream.ensure_stream`): without
    one a publish finds no responder, which the relay treats like an unreachable broker and backs off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: str = Field(default="nats://127.0.0.1:4222", min_length=1)
    """One URL or several, comma-separated (`nats://user:password@host:4222` carries credentials)."""
    subject_prefix: str = Field(default="", pattern=r"^([A-Za-z0-9_-]+\.)*$")
    """Prepended to each topic, e.g. `"shop."`; empty or dot-terminated tokens."""
    name: str = "eventstore-outbox"
    extra: dict[str, Any] = Field(default_factory=dict)
    """Further `nats.connect` keyword arguments (tls, user_credentials, ...), passed verbatim."""

    @model_validator(mode="after")
    def _consistent(self) -> NatsSettings:
        for server in self.server_list:
            if not server.startswith(("nats://", "tls://", "ws://", "wss://")):
                raise ValueError(f"not a NATS URL: {server!r} (nats://host:4222)")
        reserved = {"servers", "allow_reconnect", "connect_timeout", "name"} & set(self.extra)
        if reserved:
            raise ValueError(f"extra must not set {', '.join(sorted(reserved))}: the relay owns them")
        return self

    @property
    def server_list(self) -> list[str]:
        return [server.strip() for server in self.servers.split(",") if server.strip()]

    def subject(self, topic: str) -> str:
        return self.subject_prefix + topic


class RabbitMQSettings(_Settings):
    """How the relay reaches RabbitMQ: each route's topic is a routing key on one durable topic exchange.

    Messages are persistent and published with confirms and `mandatory`: a message no queue is bound
    for comes back, counts as refused, and is retried and dead-lettered like any refusal, instead of
    being dropped by the broker without a word.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    url: SecretStr = Field(default=SecretStr("amqp://guest:guest@127.0.0.1:5672/"))
    exchange: str = Field(default="outbox", min_length=1, max_length=255)
    """Declared durable, type topic, at start (consumers bind their queues to it by routing key)."""
    ssl_context: ssl.SSLContext | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    """Further `aio_pika.connect` keyword arguments, passed verbatim."""

    @model_validator(mode="after")
    def _consistent(self) -> RabbitMQSettings:
        if not self.url.get_secret_value().startswith(("amqp://", "amqps://")):
            raise ValueError("url must be an AMQP URL: amqp://user:password@host:5672/vhost")
        reserved = {"url", "timeout", "ssl_context"} & set(self.extra)
        if reserved:
            raise ValueError(f"extra must not set {', '.join(sorted(reserved))}: the relay owns them")
        return self


BrokerSettings = KafkaSettings | NatsSettings | RabbitMQSettings


def broker_settings(url: str) -> BrokerSettings:
    """Settings from a URL: `nats://...`, `amqp://...` or `amqps://...`, else Kafka (`kafka://h:p` or `h:p`)."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidSettings(f"a broker URL is a non-empty string, got {url!r}")
    url = url.strip()
    if url.startswith(("nats://", "tls://")):
        return NatsSettings(servers=url)
    if url.startswith(("amqp://", "amqps://")):
        return RabbitMQSettings(url=SecretStr(url))
    if url.startswith("kafka://"):
        url = ",".join(server.removeprefix("kafka://") for server in url.split(","))
    if "://" in url:
        raise InvalidSettings(f"no broker for {url.split('://')[0]}:// (kafka://, nats://, amqp:// or host:port)")
    return KafkaSettings(bootstrap_servers=url)


class RelaySettings(_Settings):
    """Tuning and failure policy of one relay process."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    relay_id: str = Field(default_factory=_default_relay_id, min_length=1, max_length=255, pattern=r"^[^\x00]+$")
    """Unique among running relays. A restarted relay with the same id takes its slots back at once."""
    batch_size: int = Field(default=1000, gt=0, le=1_000_000)
    """Messages fetched, sent and acknowledged per round; also the bound on messages in flight."""
    poll_interval: float = Field(default=1.0, gt=0)
    """Longest sleep without a notification (NOTIFY lost, listener connection down)."""
    busy_poll_interval: float = Field(default=0.005, gt=0)
    """Sleep between looks while busy (see `Relay._idle`)."""
    busy_window: float = Field(default=1.0, ge=0)
    """How long after publishing the relay counts as busy."""
    send_timeout: float = Field(default=5.0, gt=0)
    """The producer's request timeout: how long the broker may take to acknowledge."""
    lease_ttl: float = Field(default=30.0, gt=0, le=_DAY)
    """A slot lease lasts this long unless renewed; a crashed relay's slots move on after it."""
    max_attempts: int = Field(default=5, gt=0, le=1000)
    """Refusals by the broker before a message is dead-lettered."""
    retry_backoff: float = Field(default=1.0, ge=0, le=_DAY)
    max_retry_backoff: float = Field(default=60.0, ge=0, le=_DAY)
    broker_backoff: float = Field(default=0.2, gt=0, le=_DAY)
    max_broker_backoff: float = Field(default=5.0, gt=0, le=_DAY)
    retention: float | None = Field(default=24 * 3600.0, ge=0)
    """Seconds a published message is kept before pruning; None keeps them."""
    prune_interval: float = Field(default=60.0, gt=0)
    dataschema: str | None = DATASCHEMA
    """Template of the `ce_dataschema` header of typed events (see `outbox.cloudevents.DATASCHEMA`); None: no header."""

    @field_validator("dataschema")
    @classmethod
    def _dataschema_template(cls, value: str | None) -> str | None:
        return None if value is None else check_dataschema_template(value)

    @model_validator(mode="after")
    def _lease_outlives_a_round(self) -> RelaySettings:
        if self.lease_ttl < self.send_margin + 2 * self.renew_interval:
            raise ValueError(
                f"lease_ttl {self.lease_ttl}s is too short for send_timeout {self.send_timeout}s: "
                f"it must be at least {self.send_margin + 2 * self.renew_interval:.1f}s"
            )
        return self

    @property
    def send_margin(self) -> float:
        """Lease time a slot must have left before its messages are sent.

        A round waits for metadata (≤ send_timeout), then for acknowledgements (aiokafka expires a
        queued batch after send_timeout and the request after another), so three timeouts bound it.
        """
        return 3 * self.send_timeout + 1.0

    @property
    def renew_interval(self) -> float:
        return self.lease_ttl / 6

    def retry_delay(self, attempts: int) -> float:
        """How long a message the broker refused `attempts` times before waits until it is sent again."""
        return min(self.retry_backoff * 2.0 ** min(attempts, 64), self.max_retry_backoff)
