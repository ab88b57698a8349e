"""`eventstore outbox status|relay|retry-dead|prune`: run and operate the relay (Kafka, NATS, RabbitMQ)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from pydantic import SecretStr, ValidationError
from rich.table import Table

from eventstore import EventStore
from eventstore_cli.common import CommandError, add_metrics_options, console, open_store, run, start_metrics
from outbox import (
    BrokerSettings,
    InvalidSettings,
    KafkaSettings,
    NatsSettings,
    RabbitMQSettings,
    Relay,
    RelaySettings,
    broker_settings,
    prune_published,
    retry_dead,
    status,
)
from outbox.brokers import describe_broker
from outbox.cloudevents import DATASCHEMA
from outbox.embedded import BOOTSTRAP_ENV

BROKER_ENV = "EVENTSTORE_BROKER_URL"

SASL_PASSWORD_ENV = "KAFKA_SASL_PASSWORD"

RELAY_PATIENCE = 60.0
"""Seconds the relay waits at start for PostgreSQL to accept connections (it may be restarting)."""


def register(commands: Any) -> None:
    outbox = commands.add_parser("outbox", help="the transactional outbox and its relay").add_subparsers(
        dest="outbox_command", required=True
    )

    show = outbox.add_parser("status", help="pending, published and dead messages; running relays")
    show.add_argument("--dead", type=int, default=20, help="list up to this many dead messages")
    show.set_defaults(handler=lambda a: run(_status(a)))

    relay = outbox.add_parser("relay", help="publish outbox messages to Kafka, NATS or RabbitMQ until stopped")
    relay.add_argument("--broker", help=f"nats://..., amqp://... or kafka://... (default: ${BROKER_ENV}, else --kafka)")
    relay.add_argument("--subject-prefix", default="", help="NATS: prepended to each topic (e.g. 'shop.')")
    relay.add_argument("--exchange", default="outbox", help="RabbitMQ: the durable topic exchange")
    relay.add_argument("--relay-id", help="unique per running relay; reuse it to take slots back at restart")
    relay.add_argument("--batch-size", type=int, default=1000)
    relay.add_argument("--max-attempts", type=int, default=5, help="refusals before a message is dead")
    relay.add_argument("--send-timeout", type=float, default=5.0, help="seconds the broker may take to ack")
    relay.add_argument("--lease-ttl", type=float, default=30.0, help="seconds a crashed relay holds its slots")
    relay.add_argument("--poll-interval", type=float, default=1.0)
    relay.add_argument("--retry-backoff", type=float, default=1.0, help="first retry delay (doubles)")
    relay.add_argument("--retention", type=float, default=24 * 3600.0,
                       help="seconds to keep published messages (negative: keep them)")
    relay.add_argument("--max-request-size", type=int, default=1024 * 1024)
    add_metrics_options(relay)
    relay.add_argument("--security-protocol", default="PLAINTEXT",
                       choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
    relay.add_argument("--ssl-cafile", help="CA bundle for SSL / SASL_SSL")
    relay.add_argument("--sasl-mechanism", default="PLAIN",
                       choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"])
    relay.add_argument("--sasl-username")
    relay.add_argument("--dataschema", default=DATASCHEMA, metavar="TEMPLATE",
                       help="URI template of the ce_dataschema header, with {type}, {version} and {source}"
                            " ('' for none; default: %(default)s)")
    relay.add_argument("--idempotent", action="store_true",
                       help="idempotent producer (real Kafka only; the embedded broker rejects it)")
    relay.set_defaults(handler=lambda a: run(_relay(a)))

    retry = outbox.add_parser("retry-dead", help="put dead-lettered messages back in line")
    retry.add_argument("--id", type=int, action="append", dest="ids", help="only this message (repeatable)")
    retry.add_argument("--topic", help="only messages to this topic")
    retry.set_defaults(handler=lambda a: run(_retry_dead(a)))

    prune = outbox.add_parser("prune", help="delete published messages older than a given age")
    prune.add_argument("--older-than", type=float, required=True, help="seconds")
    prune.set_defaults(handler=lambda a: run(_prune(a)))


def kafka_settings(args: argparse.Namespace) -> KafkaSettings:
    servers = getattr(args, "kafka", None) or os.environ.get(BOOTSTRAP_ENV)
    if not servers:
        raise CommandError(f"no Kafka: pass --kafka or set {BOOTSTRAP_ENV}")
    password = os.environ.get(SASL_PASSWORD_ENV)
    context = None
    if args.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=args.ssl_cafile)
    try:
        return KafkaSettings(
            bootstrap_servers=servers,
            security_protocol=args.security_protocol,
            ssl_context=context,
            sasl_mechanism=args.sasl_mechanism,
            sasl_plain_username=args.sasl_username,
            sasl_plain_password=SecretStr(password) if password else None,
            enable_idempotence=args.idempotent,
            max_request_size=args.max_request_size,
        )
    except ValidationError as exc:
        raise CommandError(_first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(p) for p in error["loc"])
    return f"{where}: {error['msg']}" if where else str(error["msg"])


def relay_settings(args: argparse.Namespace) -> RelaySettings:
    values: dict[str, Any] = {
        "batch_size": args.batch_size,
        "max_attempts": args.max_attempts,
        "send_timeout": args.send_timeout,
        "lease_ttl": args.lease_ttl,
        "poll_interval": args.poll_interval,
        "retry_backoff": args.retry_backoff,
        "retention": None if args.retention < 0 else args.retention,
        "dataschema": args.dataschema or None,
    }
    if args.relay_id:
        values["relay_id"] = args.relay_id
    try:
        return RelaySettings(**values)
    except ValidationError as exc:
        raise CommandError(_first_error(exc)) from None


@contextlib.asynccontextmanager
async def _outbox_store(args: argparse.Namespace, **options: Any) -> AsyncIterator[EventStore]:
    store = await open_store(args, notify=False, **options)
    try:
        yield store
    except asyncpg.UndefinedTableError:
        raise CommandError("the outbox tables are missing: run `eventstore migrate`") from None
    finally:
        await store.stop()


async def _status(args: argparse.Namespace) -> int:
    async with _outbox_store(args) as store:
        current = await status(store, dead_limit=args.dead)
    topics = Table("topic", "pending", "published", "dead", "oldest pending", title="outbox")
    for t in current.topics:
        oldest = t.oldest_pending.isoformat(timespec="seconds") if t.oldest_pending else "-"
        topics.add_row(t.topic, str(t.pending), str(t.published), str(t.dead), oldest)
    console.print(topics)
    relays = Table("relay", "slots", "started", "lease until", title="relays")
    for r in current.relays:
        relays.add_row(r.relay_id, str(r.slots), r.started_at.isoformat(timespec="seconds"),
                       r.expires_at.isoformat(timespec="seconds"))
    console.print(relays)
    if current.dead:
        dead = Table("id", "topic", "key", "type", "attempts", "last error", title="dead messages")
        for d in current.dead:
            dead.add_row(str(d.id), d.topic, d.key, d.event_type, str(d.attempts), d.last_error or "")
        console.print(dead)
    console.print(f"pending {current.pending}, published {current.published}, dead {current.dead_count}",
                  highlight=False)
    return 0


def relay_broker(args: argparse.Namespace) -> BrokerSettings:
    """The broker of `--broker` (or `$EVENTSTORE_BROKER_URL`), else Kafka from `--kafka` and its options."""
    url = getattr(args, "broker", None) or os.environ.get(BROKER_ENV)
    if not url:
        return kafka_settings(args)
    try:
        broker = broker_settings(url)
        if isinstance(broker, NatsSettings) and args.subject_prefix:
            broker = NatsSettings(servers=broker.servers, subject_prefix=args.subject_prefix)
        if isinstance(broker, RabbitMQSettings):
            broker = RabbitMQSettings(url=broker.url, exchange=args.exchange)
    except InvalidSettings as exc:
        raise CommandError(str(exc)) from None
    if isinstance(broker, KafkaSettings):
        args.kafka = broker.bootstrap_servers
        return kafka_settings(args)
    return broker


async def _relay(args: argparse.Namespace) -> int:
    broker = relay_broker(args)
    settings = relay_settings(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    metrics = start_metrics(args)
    # A store of the relay's own, as small as the relay needs; a server that is restarting gets time.
    async with _outbox_store(args, min_connections=1, max_connections=3, connect_timeout=RELAY_PATIENCE) as store:
        relay = Relay(store, broker, settings)
        await relay.start()
        console.print(f"relay {settings.relay_id} publishing to {describe_broker(broker)}", highlight=False)
        try:
            stopped = asyncio.create_task(stop.wait())
            running = asyncio.create_task(relay.wait())
            await asyncio.wait([stopped, running], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            running.cancel()
        finally:
            await relay.stop()
            if metrics is not None:
                metrics.close()
    s = relay.stats
    console.print(f"relay stopped: published {s.published}, refused {s.refused}, dead {s.dead}",
                  highlight=False)
    return 0


async def _retry_dead(args: argparse.Namespace) -> int:
    async with _outbox_store(args) as store:
        ids = await retry_dead(store, ids=args.ids, topic=args.topic)
    if not ids:
        console.print("no dead messages matched")
        return 0
    console.print(f"{len(ids)} dead message(s) put back in line: {', '.join(map(str, ids))}", highlight=False)
    return 0


async def _prune(args: argparse.Namespace) -> int:
    if args.older_than < 0:
        raise CommandError("--older-than must not be negative")
    async with _outbox_store(args) as store:
        deleted = await prune_published(store, args.older_than)
    console.print(f"pruned {deleted} published message(s)")
    return 0
