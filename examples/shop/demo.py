"""The end-to-end demo: thousands of shop commands under contention, read models, a rebuild, a broker.

Everything is checked at the end against an independent source: read models against the aggregates,
the broker (Kafka, NATS JetStream or RabbitMQ) against the event store, the rebuilt read model
against the one it replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from aggregates import AggregateNotFound, Repository
from eventstore import EventStore, UnitOfWork
from eventstore_app import Application, ApplicationSettings
from outbox import CloudEvent, Inbox, NatsSettings, RabbitMQSettings, RelaySettings, broker_settings, from_record
from outbox import status as outbox_status
from projections import RebuildProgress

from .app import APP, ORDERS_TOPIC
from .domain import Cart, Order, OrderLine, Product

PRODUCTS = 24
ORDER_EVENTS = ("OrderPlaced", "PaymentCaptured", "OrderShipped", "OrderCancelled")

FEED_TABLE = """
CREATE TABLE IF NOT EXISTS demo_order_feed (
    message_id text PRIMARY KEY, order_id text NOT NULL, event_type text NOT NULL)
"""


@dataclass
class Tally:
    customers: int = 0
    commands: int = 0
    attempts: int = 0
    refused: int = 0
    orders: int = 0
    cancelled: int = 0

    @property
    def conflicts(self) -> int:
        return self.attempts - self.commands


@dataclass
class Check:
    name: str
    expected: Any
    actual: Any

    @property
    def ok(self) -> bool:
        return bool(self.expected == self.actual)


@dataclass
class Report:
    tally: Tally
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


class _Commands:
    """Runs commands through `Repository.execute`, counting attempts: every attempt past the first is a
    concurrent write that the repository reloaded and retried."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def run(self, repository: Repository[Any], aggregate_id: str, command: Any, create: bool = False) -> Any:
        result: list[Any] = []

        def counted(aggregate: Any) -> None:
            self.tally.attempts += 1
            result[:] = [command(aggregate)]

        self.tally.commands += 1
        await repository.execute(aggregate_id, counted, retries=50, create=create)
        return result[0] if result else None


class Shop:
    """The demo's handles on the shop's repositories."""

    def __init__(self, app: Application) -> None:
        self.products = app.repository(Product)
        self.carts = app.repository(Cart)
        self.orders = app.repository(Order)


def email_of(customer: str) -> str:
    """The demo customer's e-mail address: personal data, stored encrypted."""
    return f"{customer}@mail.example"


def address_of(customer: str) -> str:
    """The demo customer's postal address: personal data, stored encrypted."""
    return f"{customer.removeprefix('customer-')} Linden Street, Springfield ({customer})"


async def _customer(shop: Shop, commands: _Commands, rng: random.Random, n: int, prices: dict[str, int]) -> None:
    tally = commands.tally
    cart_id, order_id = f"c{n:05d}", f"o{n:05d}"
    customer = f"customer-{n % 97}"
    await commands.run(shop.carts, cart_id, lambda c: c.open(customer, email_of(customer)), create=True)
    skus = rng.sample(sorted(prices), rng.randint(1, 4))
    # Popular products: a skewed choice makes several customers reserve the same product at once.
    skus = [s if rng.random() < 0.5 else f"sku{rng.randint(0, 3):03d}" for s in skus]
    for sku in dict.fromkeys(skus):
        quantity = rng.randint(1, 3)
        await commands.run(shop.carts, cart_id, lambda c, s=sku, q=quantity: c.add(s, q, prices[s]))
    if rng.random() < 0.2 and len(set(skus)) > 1:
        await commands.run(shop.carts, cart_id, lambda c, s=skus[0]: c.remove(s))
    await commands.run(shop.carts, cart_id, lambda c: c.check_out(order_id))
    cart = await shop.carts.get(cart_id)
    lines = [OrderLine(sku=s, quantity=q, price=p) for s, (q, p) in sorted(cart.state.lines.items())]
    await commands.run(
        shop.orders, order_id, lambda o: o.place(cart.state.customer, lines, address_of(customer)), create=True
    )
    tally.orders += 1
    reserved: list[str] = []
    for line in lines:
        ok = await commands.run(shop.products, line.sku, lambda p, ln=line: p.reserve(order_id, ln.quantity))
        if not ok:
            tally.refused += 1
            break
        reserved.append(line.sku)
    if len(reserved) < len(lines):
        for sku in reserved:
            await commands.run(shop.products, sku, lambda p: p.release(order_id))
        await commands.run(shop.orders, order_id, lambda o: o.cancel("out of stock"))
        tally.cancelled += 1
        return
    await commands.run(shop.orders, order_id, lambda o: o.capture_payment(f"pay-{uuid.uuid4().hex[:8]}"))
    if rng.random() < 0.8:
        await commands.run(shop.orders, order_id, lambda o: o.ship())


async def _ensure_topic(servers: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(ORDERS_TOPIC, 3, 1)])
    finally:
        await admin.close()


class Feed(Protocol):
    """This run's messages on the orders topic, from one broker, readable twice (the second time: a replay)."""

    async def mark_start(self, since: datetime) -> None:
        """Remember where this run's messages begin: they are of events recorded from `since` on."""

    def read(self, replay: bool) -> AsyncGenerator[CloudEvent, None]: ...


class _KafkaFeed:
    """The topic from its start, keeping the events recorded since this run began (by the database's clock,
    which stamps them): an earlier run's messages are on a broker that keeps the topic, and the end
    offsets that would let it skip them are not reliable on every Kafka-compatible broker (tansu counts
    record batches)."""

    def __init__(self, servers: str) -> None:
        self.servers = servers
        self.since: datetime | None = None

    async def mark_start(self, since: datetime) -> None:
        await _ensure_topic(self.servers)
        self.since = since

    async def read(self, replay: bool) -> AsyncGenerator[CloudEvent, None]:
        consumer = AIOKafkaConsumer(
            ORDERS_TOPIC, bootstrap_servers=self.servers, group_id=None, auto_offset_reset="earliest",
            enable_auto_commit=False, metadata_max_age_ms=1000,
        )
        await consumer.start()
        try:
            while True:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        message = from_record(record)
                        if self.since is None or (message.time is not None and message.time >= self.since):
                            yield message
        finally:
            await consumer.stop()


class _NatsFeed:
    """A JetStream stream capturing the orders subject, read from the sequence it had when the demo began."""

    STREAM = "SHOP_ORDERS"

    def __init__(self, settings: NatsSettings) -> None:
        self.settings = settings
        self.start = 0

    async def mark_start(self, since: datetime) -> None:
        from outbox.jetstream import ensure_stream

        await ensure_stream(self.settings, self.STREAM, [ORDERS_TOPIC])
        client = await self._connect()
        try:
            self.start = (await client.jetstream().stream_info(self.STREAM)).state.last_seq
        finally:
            await client.close()

    async def _connect(self) -> Any:
        import nats

        return await nats.connect(servers=self.settings.server_list)

    async def read(self, replay: bool) -> AsyncGenerator[CloudEvent, None]:
        import nats.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        from outbox import from_nats

        client = await self._connect()
        try:
            config = ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.start + 1
            )
            sub = await client.jetstream().pull_subscribe(
                self.settings.subject(ORDERS_TOPIC), stream=self.STREAM, config=config
            )
            while True:
                try:
                    batch = await sub.fetch(500, timeout=0.2)
                except nats.errors.TimeoutError:
                    continue
                for msg in batch:
                    yield from_nats(msg)
        finally:
            await client.close()


class _RabbitFeed:
    """Two queues bound to the orders routing key before the run: one to consume, one to replay."""

    def __init__(self, settings: RabbitMQSettings) -> None:
        self.settings = settings
        self._connection: Any = None
        self._queues: list[Any] = []

    async def mark_start(self, since: datetime) -> None:
        import aio_pika

        self._connection = await aio_pika.connect(self.settings.url.get_secret_value())
        channel = await self._connection.channel()
        exchange = await channel.declare_exchange(self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        for _ in range(2):
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, routing_key=ORDERS_TOPIC)
            self._queues.append(queue)

    async def read(self, replay: bool) -> AsyncGenerator[CloudEvent, None]:
        from outbox import from_amqp

        queue = self._queues[1 if replay else 0]
        while True:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            yield from_amqp(message)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


def feed_for(broker: str) -> Feed:
    settings = broker_settings(broker)
    if isinstance(settings, NatsSettings):
        return _NatsFeed(settings)
    if isinstance(settings, RabbitMQSettings):
        return _RabbitFeed(settings)
    return _KafkaFeed(settings.bootstrap_servers)


class _Billing:
    """A downstream consumer of the orders topic, made idempotent by the inbox; it counts this run's messages."""

    def __init__(self, inbox: Inbox, feed: Feed) -> None:
        self.inbox = inbox
        self.feed = feed
        self.applied = 0
        self.skipped = 0
        self.received = 0

    async def consume(self, until: int, timeout: float) -> None:
        """Read this run's messages until `until` were applied (or `timeout`)."""
        async with asyncio.timeout(timeout), contextlib.aclosing(self.feed.read(replay=False)) as messages:
            async for message in messages:
                await self._handle(message)
                if self.applied >= until:
                    return

    async def replay_all(self, timeout: float) -> None:
        """Read this run's messages again, as after a consumer crash before its offsets were committed."""
        seen = 0
        async with asyncio.timeout(timeout), contextlib.aclosing(self.feed.read(replay=True)) as messages:
            async for message in messages:
                seen += 1
                await self._handle(message, replay=True)
                if seen >= self.received:
                    return

    async def _handle(self, message: CloudEvent, replay: bool = False) -> None:
        if not replay:
            self.received += 1

        async def effect(uow: UnitOfWork) -> None:
            await uow.connection.execute(
                "INSERT INTO demo_order_feed VALUES ($1, $2, $3)", message.id, message.subject or "", message.type
            )

        if await self.inbox.handle(message, effect):
            self.applied += 1
        else:
            self.skipped += 1


async def run_demo(url: str, broker: str, console: Console, *, customers: int = 600, concurrency: int = 32,
                   seed: int = 20261126) -> Report:
    """Run the demo against PostgreSQL at `url` and the broker at `broker` (Kafka servers, nats://, amqp://)."""
    started = time.perf_counter()
    rng = random.Random(seed)
    tally = Tally(customers=customers)
    report = Report(tally)
    settings = ApplicationSettings(
        max_connections=concurrency + 8, projection_poll_interval=0.5,
        relay=RelaySettings(relay_id=f"demo-{uuid.uuid4().hex[:6]}", poll_interval=0.5, retention=None),
    )
    feed = feed_for(broker)
    app_here = APP.using(database_url=url, broker=broker, settings=settings)
    async with app_here as app, contextlib.AsyncExitStack() as stack:
        store = app.store
        await store.pool.execute(FEED_TABLE)
        shop = Shop(app)
        await feed.mark_start(await store.pool.fetchval("SELECT now()"))
        if isinstance(feed, _RabbitFeed):
            stack.push_async_callback(feed.close)
        billing = _Billing(app.inbox("shop-billing"), feed)
        async with app.runner() as runner, app.relay():
            commands = _Commands(tally)
            prices = {f"sku{i:03d}": 500 + 250 * (i % 9) for i in range(PRODUCTS)}
            stock = stock_per_product(customers)
            for sku, price in prices.items():
                await commands.run(shop.products, sku, lambda p, pr=price: p.list_for_sale(pr, stock), create=True)

            console.print(f"[bold]1.[/] {customers} customers shop at once ({concurrency} in flight) ...", markup=True)
            gate = asyncio.Semaphore(concurrency)

            async def one(n: int) -> None:
                async with gate:
                    await _customer(shop, commands, random.Random(rng.random()), n, prices)

            with _progress(console) as bar:
                task = bar.add_task("customers", total=customers)

                async def tracked(n: int) -> None:
                    await one(n)
                    bar.advance(task)

                await asyncio.gather(*(tracked(n) for n in range(customers)))
            console.print(
                f"   {tally.commands:,} commands, {tally.conflicts:,} concurrent conflicts retried, "
                f"{tally.orders:,} orders ({tally.cancelled:,} cancelled for lack of stock)"
            )

            console.print(
                f"[bold]2.[/] projections catch up; outbox relays to {_broker_name(broker)}; billing consumes ...",
                markup=True,
            )
            await runner.wait_caught_up()
            order_events = await _count_events(store, ORDER_EVENTS)
            await billing.consume(order_events, timeout=120)
            await billing.replay_all(timeout=120)
            console.print(
                f"   billing applied {billing.applied:,} messages; a full redelivery of the topic was "
                f"skipped by the inbox ({billing.skipped:,} duplicates)"
            )

            before = await _rows(store, "SELECT * FROM order_summary ORDER BY order_id")
            console.print("[bold]3.[/] rebuilding order_summary from the log while it keeps serving ...", markup=True)
            with _progress(console) as bar:
                task = bar.add_task("rebuild order_summary", total=None)

                def shown(p: RebuildProgress) -> None:
                    bar.update(task, completed=p.done, total=max(p.total, p.done),
                               description=f"rebuild order_summary ({p.rate:,.0f} events/s)")

                done = await app.admin.rebuild("order_summary", progress=shown)
            console.print(f"   rebuilt from {done.done:,} events at {done.rate:,.0f} events/s")
            await runner.wait_caught_up()
            after = await _rows(store, "SELECT * FROM order_summary ORDER BY order_id")
            report.checks.extend(await _checks(store, shop, tally, billing, order_events, before, after))
            pending = (await outbox_status(store)).pending
            report.checks.append(Check("outbox messages left unpublished", 0, pending))
    report.seconds = time.perf_counter() - started
    return report


def _broker_name(broker: str) -> str:
    return type(broker_settings(broker)).__name__.removesuffix("Settings").replace("Nats", "NATS JetStream")


def stock_per_product(customers: int) -> int:
    """Enough stock for most orders; the popular products still run out, so some orders are cancelled."""
    return max(20, customers * 2 // 5)


async def _count_events(store: EventStore, types: tuple[str, ...]) -> int:
    """Counted in the events table itself: every committed event, whatever the log's visibility line."""
    return int(await store.pool.fetchval("SELECT count(*) FROM events WHERE event_type = ANY($1)", list(types)))


async def _rows(store: EventStore, query: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await store.pool.fetch(query)]


async def _checks(
    store: EventStore, shop: Shop, tally: Tally, billing: _Billing, order_events: int,
    before: list[tuple[Any, ...]], after: list[tuple[Any, ...]],
) -> list[Check]:
    checks: list[Check] = []
    statuses: Counter[str] = Counter()
    for n in range(tally.orders):
        try:
            order = await shop.orders.get(f"o{n:05d}")
        except AggregateNotFound:
            continue
        statuses[order.state.status] += 1
    summary = Counter({r[0]: r[1] for r in await store.pool.fetch(
        "SELECT status, count(*) FROM order_summary GROUP BY status")})
    checks.append(Check("orders placed = rows in order_summary", tally.orders, sum(summary.values())))
    checks.append(Check("order statuses: aggregates = order_summary", dict(statuses), dict(summary)))
    checks.append(Check("rebuilt order_summary = the one it replaced", len(before), len(after)))
    checks.append(Check("rebuilt rows identical", True, before == after))

    stock: dict[str, int] = {}
    for i in range(PRODUCTS):
        stock[f"sku{i:03d}"] = (await shop.products.get(f"sku{i:03d}")).state.available
    inline = {r[0]: r[1] for r in await store.pool.fetch("SELECT sku, available FROM stock_levels")}
    checks.append(Check("stock: aggregates = inline stock_levels", stock, inline))
    sold = {r[0]: r[1] for r in await store.pool.fetch("SELECT sku, units FROM product_sales")}
    initial = stock_per_product(tally.customers)
    checks.append(Check("stock: initial - product_sales = aggregates", stock,
                        {sku: initial - sold.get(sku, 0) for sku in stock}))

    checks.append(Check("order events in the store = messages applied by billing", order_events, billing.applied))
    feed = await store.pool.fetchval("SELECT count(DISTINCT message_id) FROM demo_order_feed")
    checks.append(Check("billing rows (one per message id)", order_events, feed))
    checks.append(Check("redelivered messages skipped by the inbox", billing.received, billing.skipped))
    checks.append(Check("concurrent conflicts happened and were retried", True, tally.conflicts > 0))
    return checks


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("   {task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=False,
    )


def print_report(report: Report, console: Console) -> None:
    table = Table(title=f"shop demo: {report.tally.commands:,} commands in {report.seconds:.1f} s")
    table.add_column("check")
    table.add_column("expected", overflow="fold", max_width=40)
    table.add_column("actual", overflow="fold", max_width=40)
    table.add_column("")
    for check in report.checks:
        expected, actual = _short(check.expected), _short(check.actual)
        verdict = Text("ok", style="green") if check.ok else Text("FAIL", style="bold red")
        table.add_row(check.name, expected, actual, verdict)
    console.print(table)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return f"{len(value)} entries, sum {sum(value.values()):,}" if value else "{}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
