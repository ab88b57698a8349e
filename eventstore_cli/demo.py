"""`eventstore demo`: the shop demo end to end, on embedded PostgreSQL and a broker (Kafka unless told otherwise)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import socket
from typing import Any

from eventstore import EventStore, NewEvent, WrongExpectedVersion, expected_version
from eventstore.embedded import DATABASE_URL_ENV, embedded_postgres
from eventstore_app import migrate_async
from eventstore_cli.common import CommandError, console, run

KAFKA_ENV = "KAFKA_BOOTSTRAP_SERVERS"
NATS_ENV = "NATS_URL"
RABBITMQ_ENV = "RABBITMQ_URL"
LOCAL_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"


def register(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run the shop demo end to end (embedded services by default)")
    demo.add_argument("--customers", type=int, default=600, help="shoppers in the scenario")
    demo.add_argument("--concurrency", type=int, default=32, help="shoppers in flight at once")
    demo.add_argument("--smoke", action="store_true", help="only a quick event store check (no broker)")
    demo.add_argument("--broker", choices=["kafka", "nats", "rabbitmq"], default="kafka",
                      help="where the outbox publishes and billing consumes (default: kafka)")
    demo.set_defaults(handler=lambda a: run(_demo(a)))


async def _demo(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)
    with contextlib.ExitStack() as stack:
        url = args.database_url or os.environ.get(DATABASE_URL_ENV)
        if not url:
            console.print("starting embedded PostgreSQL ...")
            url = stack.enter_context(embedded_postgres())
        await migrate_async(url)
        if args.smoke:
            async with EventStore(url) as store:
                return await _smoke(store)
        broker = await _broker(args, stack)
        # The shop is the repository's examples/ folder, installed as `eventstore_examples`.
        shop: Any = importlib.import_module("eventstore_examples.shop.demo")
        report = await shop.run_demo(url, broker, console, customers=args.customers, concurrency=args.concurrency)
        shop.print_report(report, console)
        if not report.ok:
            raise CommandError("the demo's checks failed: see the table above")
        console.print("[bold green]all checks passed[/]: nothing lost, nothing applied twice", markup=True)
        return 0
    return 1


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _broker(args: argparse.Namespace, stack: contextlib.ExitStack) -> str:
    """The chosen broker's URL: from the environment, else a local server, else an embedded one."""
    if args.broker == "nats":
        url = os.environ.get(NATS_ENV)
        if url:
            return url
        if _listening(4222):
            return "nats://127.0.0.1:4222"
        from outbox.embedded import EmbeddedNats

        console.print("starting an embedded nats-server with JetStream ...")
        return await asyncio.to_thread(stack.enter_context(EmbeddedNats()).start)
    if args.broker == "rabbitmq":
        url = os.environ.get(RABBITMQ_ENV)
        if url:
            return url
        if not _listening(5672):
            raise CommandError(f"no RabbitMQ: nothing listens on 127.0.0.1:5672; set {RABBITMQ_ENV}")
        return LOCAL_RABBITMQ
    kafka = args.kafka or os.environ.get(KAFKA_ENV)
    if kafka:
        return str(kafka)
    from outbox.embedded import EmbeddedBroker

    console.print("starting the embedded Kafka-protocol broker (tansu) ...")
    return await asyncio.to_thread(stack.enter_context(EmbeddedBroker()).start)


async def _smoke(store: EventStore) -> int:
    streams = [f"demo_account-{i}" for i in range(20)]
    writes = 0

    async def writer(stream_id: str) -> None:
        nonlocal writes
        version = await store.stream_version(stream_id)
        for n in range(50):
            try:
                result = await store.append(
                    stream_id, [NewEvent("Deposited", {"amount": n})], expected_version(version)
                )
            except WrongExpectedVersion as conflict:
                version = conflict.actual
                continue
            version = result.next_expected_version
            writes += 1

    head_before = await store.head()
    await asyncio.gather(*(writer(s) for s in streams), *(writer(s) for s in streams[:5]))
    seen = 0
    after = head_before
    while batch := await store.read_all(after, category="demo_account"):
        seen += len(batch)
        after = batch[-1].checkpoint
    console.print(f"appended {writes} events with concurrent conflicts; read back {seen} from the log")
    if seen != writes:
        raise CommandError(f"lost events: wrote {writes}, read {seen}")
    console.print("[green]ok[/]: every committed event was read exactly once", markup=True)
    return 0
