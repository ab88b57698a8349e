"""Soak run: the shop demo's workload for a long time under random faults, checked for loss and for leaks.

    python -m benchmarks.soak [--minutes 30] [--faults terminate,kill-runner,...] [--seed N]
    make soak MINUTES=3

Everything runs on servers of its own: a private PostgreSQL (`EmbeddedPostgres`, which it restarts) and
an embedded broker (tansu), whatever EVENTSTORE_DATABASE_URL says. Three long-running processes do the
work: a writer (this module with `writer`: the demo's customers, journaling every command), the
projection runner and the outbox relay (the `eventstore` command). One fault at a time, at random
intervals:

    terminate     every client session is terminated (pg_terminate_backend)
    kill-runner   the projection runner is SIGKILLed and started again
    kill-relay    the outbox relay is SIGKILLed and started again with the same relay id
    broker        the broker is stopped and started again
    postgres      PostgreSQL is stopped (fast, or immediate: a crash) and started again 1-3 s later

The broker keeps everything in memory, so a restart loses what it held. To still check every message,
the relay is paused (SIGSTOP) just before, the checking consumer reads every partition to its end, then
the broker stops, the relay resumes (to find it gone, with batches possibly in flight) and the broker
comes back empty: every message any incarnation of the broker acknowledged was read before it was lost.

Runner and relay live only from one kill to the next: to watch the memory of long-lived ones, leave
their kills out (`--faults terminate,broker,postgres`).

Every few minutes, and at the end, it prints a report: the zero-loss checks (every acknowledged
command's events in the log exactly once, a command that raised at most once, the read models equal to
an independent fold of the log at their checkpoints, every routed event on the broker at least once and
in order per key, dead letters) and the resident memory of each long-running process, sampled every
30 s. It exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from rich.console import Console
from rich.table import Table

from aggregates import Repository
from eventstore import Checkpoint, EventStore, migrate
from eventstore.embedded import EmbeddedPostgres, ShutdownMode
from examples.shop.app import ORDERS_TOPIC, OUTBOX, PROJECTIONS, Shop
from examples.shop.demo import PRODUCTS, Tally, _Commands, _customer, _ensure_topic
from outbox import from_record
from outbox.embedded import EmbeddedBroker
from projections import ProjectionAdmin

# -- what this script relies on of the store and outbox APIs (being reworked: adapt here) -------------


async def install_outbox(store: EventStore) -> None:
    """Declare the shop's routes: from then on every append writes its outbox messages."""
    await OUTBOX.declare(store)


ROUTED_TYPES = frozenset(t for route in OUTBOX.routes for t in route.types or ())
LOG = """
SELECT event_id, stream_id, stream_version, event_type, log_xid AS xid, position, data::text AS data,
       metadata->>'correlation_id' AS command
FROM events ORDER BY log_xid, position
"""
CHECKPOINTS = "SELECT name, log_xid AS xid, position, status FROM projection_checkpoints WHERE mode = 'async'"
OUTBOX_STATE = """
SELECT count(*) FILTER (WHERE published_at IS NULL AND dead_at IS NULL) AS pending,
       count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,
       coalesce(array_agg(DISTINCT key) FILTER (WHERE dead_at IS NOT NULL), '{}') AS dead_keys
FROM outbox
"""

# -----------------------------------------------------------------------------------------------------

FAULTS = ("terminate", "kill-runner", "kill-relay", "broker", "postgres")
SHUTDOWNS: tuple[ShutdownMode, ...] = ("fast", "immediate")
ROOT = Path(__file__).resolve().parents[1]
EVENTSTORE = str(Path(sys.executable).with_name("eventstore"))
POPULAR_STOCK = 10**9  # the demo's popular products (sku000-sku003) never run out; the others do
TERMINATE = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
"""
WARM_UP = 60.0  # memory growth is measured from the first sample after this many seconds

console = Console(width=None if sys.stdout.isatty() else 132)


# -- the writer process ------------------------------------------------------------------------------


class _JournaledCommands(_Commands):
    """The demo's command runner, journaling each command: its id (its events' correlation id), its
    stream, how many events its last attempt wrote, and whether the store acknowledged it."""

    def __init__(self, tally: Tally, journal: BinaryIO) -> None:
        super().__init__(tally)
        self.journal = journal

    async def run(self, repository: Repository[Any], aggregate_id: str, command: Any, create: bool = False) -> Any:
        command_id = str(uuid.uuid4())
        result: list[Any] = []
        pending = 0

        def counted(aggregate: Any) -> None:
            nonlocal pending
            self.tally.attempts += 1
            result[:] = [command(aggregate)]
            pending = len(aggregate.pending_events)

        self.tally.commands += 1
        entry: dict[str, Any] = {"id": command_id, "stream": repository.stream_id(aggregate_id)}
        try:
            await repository.execute(aggregate_id, counted, retries=50, create=create, correlation_id=command_id)
        except Exception as exc:
            self._journal({**entry, "events": pending, "ok": False, "error": type(exc).__name__})
            raise
        self._journal({**entry, "events": pending, "ok": True})
        return result[0] if result else None

    def _journal(self, entry: dict[str, Any]) -> None:
        self.journal.write(orjson.dumps(entry) + b"\n")  # unbuffered: one write per line


async def _write(args: argparse.Namespace, journal: BinaryIO) -> int:
    """Customers shop at `rate` per second (at most `concurrency` at once) until SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    rng = random.Random(args.seed)
    failed: Counter[str] = Counter()
    async with EventStore(args.database_url, max_connections=args.concurrency + 4, retry_for=args.retry_for) as store:
        await install_outbox(store)
        async with ProjectionAdmin(store, PROJECTIONS).inline():
            shop = Shop(store)
            commands = _JournaledCommands(Tally(), journal)
            prices = {f"sku{i:03d}": 500 + 250 * (i % 9) for i in range(PRODUCTS)}
            for i, (sku, price) in enumerate(prices.items()):
                stock = POPULAR_STOCK if i < 4 else args.stock
                await commands.run(
                    shop.products, sku, lambda p, pr=price, st=stock: p.list_for_sale(pr, st), create=True
                )
            gate = asyncio.Semaphore(args.concurrency)
            running: set[asyncio.Task[None]] = set()

            async def customer(n: int) -> None:
                try:
                    await _customer(shop, commands, random.Random(rng.random()), n, prices)
                except Exception as exc:  # a command raised: this customer gives up
                    failed[type(exc).__name__] += 1
                finally:
                    gate.release()

            print("writing", flush=True)
            started = loop.time()
            n = 0
            while not stop.is_set():
                delay = started + n / args.rate - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                await gate.acquire()
                task = loop.create_task(customer(n))
                running.add(task)
                task.add_done_callback(running.discard)
                n += 1
            await asyncio.gather(*running)
    tally = commands.tally
    print(f"customers {n}, commands {tally.commands}, conflicts retried {tally.conflicts}, "
          f"customers given up {dict(failed)}", flush=True)
    return 0


# -- supervised processes and their memory -------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (Linux /proc), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


@dataclass
class Incarnation:
    pid: int
    started: float
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since started, RSS bytes)

    def sample(self, now: float) -> None:
        rss = rss_bytes(self.pid)
        if rss is not None:
            self.samples.append((now - self.started, rss))


class Supervised:
    """One long-running process of the soak: started, killed and restarted by the faults, watched for
    exits nobody asked for, its memory sampled per incarnation."""

    def __init__(self, role: str, argv: Sequence[str], log: Path, ready: str) -> None:
        self.role = role
        self.argv = list(argv)
        self.log = log
        self.ready = ready
        self.incarnations: list[Incarnation] = []
        self.unexpected_exits: list[str] = []
        self._process: asyncio.subprocess.Process | None = None
        self._ending = False  # it was told to end (SIGTERM, SIGKILL)

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self, timeout: float = 60.0) -> None:
        """Start it and wait until it says it is at work (its `ready` line)."""
        seen = self._ready_lines()
        self._ending = False
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as out:
            self._process = await asyncio.create_subprocess_exec(
                *self.argv, cwd=ROOT, env=env, stdout=out, stderr=out, stdin=asyncio.subprocess.DEVNULL
            )
        self.incarnations.append(Incarnation(self._process.pid, time.monotonic()))
        deadline = time.monotonic() + timeout
        while self._ready_lines() == seen:
            if self._process.returncode is not None:
                raise RuntimeError(f"{self.role} exited with {self._process.returncode} at start:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.role} did not start within {timeout}s:\n{self.tail()}")
            await asyncio.sleep(0.1)

    def _ready_lines(self) -> int:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace").count(self.ready)
        return 0

    def exited(self) -> int | None:
        """The exit status if the process ended without being asked to."""
        return None if self._process is None or self._ending else self._process.returncode

    async def kill(self) -> None:
        assert self._process is not None
        self._ending = True
        self.signal(signal.SIGKILL)
        await self._process.wait()

    def signal(self, signum: signal.Signals) -> None:
        assert self._process is not None
        with contextlib.suppress(ProcessLookupError):
            self._process.send_signal(signum)

    async def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; the exit status (None if it had to be killed)."""
        if self._process is None or self._process.returncode is not None:
            return None if self._process is None else self._process.returncode
        self._ending = True
        self.signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self._process.wait(), timeout)
        except TimeoutError:
            await self.kill()
            return None

    def sample(self, now: float) -> None:
        if self.incarnations and self._process is not None and self._process.returncode is None:
            self.incarnations[-1].sample(now)

    def tail(self, size: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_bytes()[-size:].decode(errors="replace")
        return ""


# -- what reached the broker ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    incarnation: int
    partition: int
    offset: int
    key: str
    event_id: str
    version: int


class Deliveries:
    """Reads the orders topic from the start in the background, through every incarnation of the broker."""

    def __init__(self, servers: str) -> None:
        self.servers = servers
        self.records: list[Delivery] = []
        self.incarnation = 0
        self._next: dict[int, int] = {}  # partition -> next offset to read, this incarnation
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._next = {}
        self._consumer = AIOKafkaConsumer(
            ORDERS_TOPIC, bootstrap_servers=self.servers, auto_offset_reset="earliest", group_id=None,
            request_timeout_ms=5000, retry_backoff_ms=100, metadata_max_age_ms=1000,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200)
            except Exception:  # the broker restarts; keep reading
                await asyncio.sleep(0.2)
                continue
            for records in batches.values():
                for record in records:
                    event = from_record(record)
                    self.records.append(Delivery(
                        self.incarnation, record.partition, record.offset, record.key.decode(), event.id,
                        int(event.extensions["streamversion"]),
                    ))
                    self._next[record.partition] = record.offset + 1

    async def drain(self, timeout: float = 60.0) -> bool:
        """Read every partition up to its end now; False if that took longer than `timeout`."""
        assert self._consumer is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            partitions = self._consumer.partitions_for_topic(ORDERS_TOPIC)
            if partitions:
                try:
                    ends = await self._consumer.end_offsets([TopicPartition(ORDERS_TOPIC, p) for p in partitions])
                except Exception:  # metadata still loading
                    ends = None
                if ends is not None and all(self._next.get(tp.partition, 0) >= end for tp, end in ends.items()):
                    return True
            await asyncio.sleep(0.1)
        return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), 5)
            self._consumer = None

    def ids(self) -> set[str]:
        return {d.event_id for d in self.records}


# -- checks -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """One line of the writer's journal."""

    id: str
    stream: str
    events: int
    ok: bool
    error: str | None


class Journal:
    """The writer's journal, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.commands: dict[str, Command] = {}
        self._offset = 0

    def read(self) -> None:
        with contextlib.suppress(FileNotFoundError), self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self._offset += len(complete)
            for line in complete.splitlines():
                entry = orjson.loads(line)
                self.commands[entry["id"]] = Command(
                    entry["id"], entry["stream"], entry["events"], entry["ok"], entry.get("error")
                )


Rows = dict[str, tuple[Any, ...]]
"""A read model's rows by key."""


@dataclass
class Snapshot:
    """The log, the read models and their checkpoints, and the outbox, read in one database snapshot."""

    events: list[asyncpg.Record]
    checkpoints: dict[str, asyncpg.Record]
    order_summary: Rows
    product_sales: Rows
    stock_levels: Rows
    pending: int
    dead: int
    dead_keys: set[str]


async def _snapshot(store: EventStore) -> Snapshot:
    async with store.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        checkpoints = {r["name"]: r for r in await conn.fetch(CHECKPOINTS)}
        orders = {r[0]: tuple(r[1:]) for r in await conn.fetch(
            "SELECT order_id, customer, status, total, paid, lines FROM order_summary")}
        sales = {r[0]: tuple(r[1:]) for r in await conn.fetch("SELECT sku, units, reservations FROM product_sales")}
        stock = {r[0]: tuple(r[1:]) for r in await conn.fetch("SELECT sku, available, reserved FROM stock_levels")}
        outbox = await conn.fetchrow(OUTBOX_STATE)
        events = list(await conn.fetch(LOG))
    assert outbox is not None
    return Snapshot(events, checkpoints, orders, sales, stock, outbox["pending"], outbox["dead"],
                    set(outbox["dead_keys"]))


def _before(event: asyncpg.Record, checkpoint: asyncpg.Record | None) -> bool:
    return checkpoint is not None and (event["xid"], event["position"]) <= (checkpoint["xid"], checkpoint["position"])


def _fold(snapshot: Snapshot) -> tuple[Rows, Rows, Rows]:
    """The three read models computed from the log alone: the runner's two up to their checkpoints (which
    they commit with their tables), the inline one from every event (it commits with them)."""
    orders: Rows = {}
    sales: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    stock: dict[str, list[int]] = {}
    summary_at, sales_at = snapshot.checkpoints.get("order_summary"), snapshot.checkpoints.get("product_sales")
    for e in snapshot.events:
        kind, stream = e["event_type"], e["stream_id"]
        if kind in ("OrderPlaced", "PaymentCaptured", "OrderShipped", "OrderCancelled"):
            if not _before(e, summary_at):
                continue
            data = orjson.loads(e["data"])
            if kind == "OrderPlaced":
                orders[stream] = (data["customer"], "placed", data["total"], 0, len(data["lines"]))
            elif stream in orders:
                customer, status, total, paid, lines = orders[stream]
                if kind == "PaymentCaptured":
                    status, paid = "paid", paid + data["amount"]
                else:
                    status = "shipped" if kind == "OrderShipped" else "cancelled"
                orders[stream] = (customer, status, total, paid, lines)
        elif kind in ("StockReserved", "StockReleased"):
            sku, data = stream.split("-", 1)[1], orjson.loads(e["data"])
            sign = 1 if kind == "StockReserved" else -1
            if _before(e, sales_at):
                sales[sku][0] += sign * data["quantity"]
                sales[sku][1] += sign
            if sku in stock:
                stock[sku][0] -= sign * data["quantity"]
                stock[sku][1] += sign * data["quantity"]
        elif kind == "ProductListed":
            data = orjson.loads(e["data"])
            stock[data["sku"]] = [data["stock"], 0]
    return orders, {k: tuple(v) for k, v in sales.items()}, {k: tuple(v) for k, v in stock.items()}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


def _first(items: Sequence[str], count: int = 3) -> str:
    shown = ", ".join(items[:count])
    return f"{len(items)}: {shown}{' ...' if len(items) > count else ''}"


def _checks(snapshot: Snapshot, journal: Journal, deliveries: Deliveries, final: bool) -> list[Check]:
    """Every check that holds at any moment; with `final`, also those that hold once everything settled."""
    checks: list[Check] = []
    stored = Counter(e["command"] for e in snapshot.events)
    commands = journal.commands.values()
    acked = [c for c in commands if c.ok]
    raised = [c for c in commands if not c.ok]
    missing = [c.id for c in acked if stored[c.id] != c.events]
    checks.append(Check("acknowledged commands: their events in the log exactly once", not missing,
                        f"{len(acked):,} commands" if not missing else f"wrong count for {_first(missing)}"))
    doubled = [c.id for c in raised if stored[c.id] not in (0, c.events)]
    written = sum(1 for c in raised if c.events and stored[c.id] == c.events)
    checks.append(Check("commands that raised: their events at most once", not doubled,
                        f"{len(raised):,} raised, {written} of them stored anyway" if not doubled
                        else f"partly or twice stored: {_first(doubled)}"))
    if final:
        unknown = [str(k) for k in stored if k not in journal.commands]
        checks.append(Check("no event without a journaled command", not unknown,
                            "" if not unknown else _first(unknown)))

    versions: dict[str, list[int]] = defaultdict(list)
    for e in snapshot.events:  # in log order
        versions[e["stream_id"]].append(e["stream_version"])
    disordered = [s for s, v in versions.items() if v != list(range(len(v)))]
    checks.append(Check("every stream gap-free, in version order in the log", not disordered,
                        f"{len(versions):,} streams, {len(snapshot.events):,} events" if not disordered
                        else _first(disordered)))

    orders, sales, stock = _fold(snapshot)
    for name, folded, table in (("order_summary", orders, snapshot.order_summary),
                                ("product_sales", sales, snapshot.product_sales),
                                ("stock_levels (inline)", stock, snapshot.stock_levels)):
        differ = sorted(k for k in folded.keys() | table.keys() if folded.get(k) != table.get(k))
        checks.append(Check(f"{name} = a fold of the log at its checkpoint", not differ,
                            f"{len(table):,} rows" if not differ else f"rows differ: {_first(differ)}"))
    failed = [n for n, r in snapshot.checkpoints.items() if r["status"] == "failed"]
    checks.append(Check("no projection failed", not failed, ", ".join(failed)))

    checks.append(Check("dead letters", snapshot.dead == 0, str(snapshot.dead)))
    by_key: dict[str, list[int]] = defaultdict(list)
    for d in sorted(deliveries.records, key=lambda d: (d.incarnation, d.partition, d.offset)):
        by_key[d.key].append(d.version)
    counts = Counter(e["stream_id"] for e in snapshot.events if e["event_type"] in ROUTED_TYPES)
    unordered: list[str] = []
    for key, seen in by_key.items():
        firsts = list(dict.fromkeys(seen))
        if key not in snapshot.dead_keys and firsts != list(range(len(firsts))):
            unordered.append(f"{key} {firsts}")
    checks.append(Check("broker: in order per key (every incarnation)", not unordered,
                        f"{len(deliveries.records):,} messages, {len(by_key):,} keys" if not unordered
                        else _first(unordered)))
    if final:
        routed = {str(e["event_id"]) for e in snapshot.events if e["event_type"] in ROUTED_TYPES}
        lost = sorted(routed - deliveries.ids())
        checks.append(Check("broker: every routed event published at least once", not lost,
                            f"{len(routed):,} events" if not lost else f"never received: {_first(lost)}"))
        short = [k for k, n in counts.items() if k not in snapshot.dead_keys and len(set(by_key.get(k, []))) != n]
        checks.append(Check("broker: every key complete", not short, "" if not short else _first(short)))
        checks.append(Check("outbox: nothing left unpublished", snapshot.pending == 0, str(snapshot.pending)))
    return checks


# -- faults -------------------------------------------------------------------------------------------


@dataclass
class Soak:
    """The servers, the processes and what has been seen so far."""

    postgres: EmbeddedPostgres
    broker: EmbeddedBroker
    store: EventStore
    writer: Supervised
    runner: Supervised
    relay: Supervised
    deliveries: Deliveries
    journal: Journal
    rng: random.Random
    started: float = field(default_factory=time.monotonic)
    faults: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)  # faults that could not be injected or recovered from

    @property
    def processes(self) -> list[Supervised]:
        return [self.writer, self.runner, self.relay]

    def note(self, text: str) -> None:
        console.print(f"[{time.monotonic() - self.started:7.1f}s] {text}", highlight=False)

    async def fault(self, kind: str) -> None:
        self.faults[kind] += 1
        try:
            await self._inject(kind)
        except Exception as exc:
            self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            self.note(f"fault {kind} failed: {type(exc).__name__}: {exc}")

    async def _inject(self, kind: str) -> None:
        if kind == "terminate":
            count = await self.store.retrying(lambda: self.store.pool.fetchval(TERMINATE))
            self.note(f"terminated {count} sessions")
        elif kind in ("kill-runner", "kill-relay"):
            process = self.runner if kind == "kill-runner" else self.relay
            await process.kill()
            await asyncio.sleep(self.rng.uniform(0.0, 2.0))
            await process.start()
            self.note(f"{process.role} SIGKILLed and started again (pid {process.pid})")
        elif kind == "broker":
            self.relay.signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(0.5)  # what the relay had sent reaches the broker
                drained = await self.deliveries.drain()
                await self.deliveries.stop()
                await asyncio.to_thread(self.broker.stop)
            finally:
                self.relay.signal(signal.SIGCONT)
            down = self.rng.uniform(1.0, 3.0)
            await asyncio.sleep(down)
            await asyncio.to_thread(self.broker.start)
            await _ensure_topic(self.broker.bootstrap_servers)  # before the relay's producer creates it
            self.deliveries.incarnation += 1
            await self.deliveries.start()
            self.note(f"broker restarted after {down:.1f}s down")
            if not drained:
                self.errors.append("broker: not drained before its restart, its last messages cannot be checked")
        elif kind == "postgres":
            mode = self.rng.choice(SHUTDOWNS)
            down = self.rng.uniform(1.0, 3.0)
            await asyncio.to_thread(self.postgres.stop, mode)
            await asyncio.sleep(down)
            await asyncio.to_thread(self.postgres.start)
            self.note(f"PostgreSQL stopped ({mode}) and started again after {down:.1f}s down")
        else:
            raise ValueError(f"unknown fault {kind!r}")

    async def supervise(self) -> None:
        """Processes that ended without being asked to are a failure; runner and relay are started again."""
        for process in self.processes:
            code = process.exited()
            if code is None:
                continue
            process.unexpected_exits.append(f"exit {code}")
            self.note(f"{process.role} exited by itself with status {code}:\n{process.tail(1500)}")
            if process is self.writer:
                raise RuntimeError("the writer exited by itself")
            try:
                await process.start()
            except RuntimeError as exc:  # looked at again at the next turn
                self.errors.append(f"{process.role} could not be started again: {exc}")

    def sample(self) -> None:
        now = time.monotonic()
        for process in self.processes:
            process.sample(now)

    async def settle(self, timeout: float) -> bool:
        """Wait until the runner has projected the whole log and the relay published every message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            await self.supervise()
            head = await self.store.head()
            rows = await self.store.retrying(lambda: self.store.pool.fetch(CHECKPOINTS))
            state = await self.store.retrying(lambda: self.store.pool.fetchrow(OUTBOX_STATE))
            caught_up = all(Checkpoint(r["xid"], r["position"]) >= head for r in rows)
            if caught_up and state is not None and state["pending"] == 0:
                return True
            await asyncio.sleep(0.5)
        return False

    async def report(self, final: bool) -> bool:
        self.journal.read()  # before the snapshot: a journaled acknowledgement's events are in it
        snapshot = await self.store.retrying(lambda: _snapshot(self.store))
        checks = _checks(snapshot, self.journal, self.deliveries, final)
        exits = [f"{p.role}: {', '.join(p.unexpected_exits)}" for p in self.processes if p.unexpected_exits]
        checks.append(Check("no process exited by itself", not exits, "; ".join(exits)))
        checks.append(Check("every fault injected", not self.errors, "; ".join(self.errors)[-300:]))
        elapsed = time.monotonic() - self.started
        commands = self.journal.commands.values()
        errors = Counter(c.error for c in commands if not c.ok)
        console.rule(f"{'final' if final else 'interim'} report after {elapsed / 60:.1f} min")
        console.print(
            f"commands acknowledged {sum(1 for c in commands if c.ok):,}, raised {dict(errors)}; "
            f"events {len(snapshot.events):,}; faults {dict(self.faults)}; "
            f"broker incarnations {self.deliveries.incarnation + 1}, "
            f"messages received {len(self.deliveries.records):,}",
            highlight=False,
        )
        table = Table("check", "", "detail")
        for check in checks:
            table.add_row(check.name, "[green]ok[/]" if check.ok else "[bold red]FAIL[/]", check.detail)
        console.print(table)
        console.print(self._memory_table())
        return all(c.ok for c in checks)

    def _memory_table(self) -> Table:
        table = Table("process", "incarnations", "longest life", "RSS start", f"RSS at {WARM_UP:.0f}s", "RSS end",
                      "RSS max", "growth after warm-up", title="resident memory (sampled)")
        mb = 1024 * 1024
        for process in self.processes:
            lives = [i for i in process.incarnations if i.samples]
            if not lives:
                continue
            longest = max(lives, key=lambda i: i.samples[-1][0])
            samples = longest.samples
            warm = next((rss for t, rss in samples if t >= WARM_UP), None)
            table.add_row(
                process.role, str(len(process.incarnations)), f"{samples[-1][0]:.0f}s",
                f"{samples[0][1] / mb:.1f} MB", "-" if warm is None else f"{warm / mb:.1f} MB",
                f"{samples[-1][1] / mb:.1f} MB", f"{max(r for _, r in samples) / mb:.1f} MB",
                "-" if warm is None else f"{(samples[-1][1] - warm) / mb:+.1f} MB",
            )
        return table


async def _every(seconds: float, action: Callable[[], Awaitable[None]], until: float) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(min(seconds, max(until - time.monotonic(), 0.0)))
        await action()


async def _soak(args: argparse.Namespace, workdir: Path) -> bool:
    rng = random.Random(args.seed)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        raise SystemExit(f"unknown faults {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    with EmbeddedPostgres() as postgres, EmbeddedBroker() as broker:
        url, servers = postgres.url, broker.bootstrap_servers
        await asyncio.to_thread(migrate, url)
        await _ensure_topic(servers)
        console.print(f"PostgreSQL {url}, broker {servers}, seed {args.seed}, work directory {workdir}")
        writer = Supervised("writer", [
            sys.executable, "-m", "benchmarks.soak", "writer", "--database-url", url,
            "--journal", str(workdir / "journal.jsonl"), "--rate", str(args.rate),
            "--concurrency", str(args.concurrency), "--stock", str(args.stock), "--seed", str(args.seed),
            "--retry-for", str(args.writer_retry_for),
        ], workdir / "writer.log", "writing")
        runner = Supervised("runner", [
            EVENTSTORE, "--database-url", url, "projections", "run", "--app", "examples.shop.app:PROJECTIONS",
            "--batch-size", "200", "--poll-interval", "0.5", "--lease-interval", "1",
        ], workdir / "runner.log", "running ")
        relay = Supervised("relay", [
            EVENTSTORE, "--database-url", url, "--kafka", servers, "outbox", "relay", "--relay-id", "soak",
            "--send-timeout", "2", "--lease-ttl", "20", "--poll-interval", "0.5", "--batch-size", "500",
            "--retention", "300",
        ], workdir / "relay.log", "publishing to")
        deliveries = Deliveries(servers)
        await deliveries.start()
        async with EventStore(url, retry_for=120, check_schema=False) as store:
            soak = Soak(postgres, broker, store, writer, runner, relay, deliveries,
                        Journal(workdir / "journal.jsonl"), rng)
            try:
                for process in (runner, relay, writer):
                    await process.start()
                end = soak.started + args.minutes * 60
                ok = True

                async def interim() -> None:
                    nonlocal ok
                    ok = await soak.report(final=False) and ok

                async def sample() -> None:
                    soak.sample()

                soak.sample()
                sampler = asyncio.create_task(_every(args.sample_every, sample, end))
                reporter_due = soak.started + args.report_every
                while time.monotonic() < end and faults:
                    pause = min(max(rng.expovariate(1 / args.fault_every), 3.0), 4 * args.fault_every)
                    await asyncio.sleep(min(pause, max(end - time.monotonic(), 0.0)))
                    await soak.supervise()
                    if time.monotonic() >= end:
                        break
                    if time.monotonic() >= reporter_due:
                        await interim()
                        reporter_due = time.monotonic() + args.report_every
                    await soak.fault(rng.choice(faults))
                while time.monotonic() < end:  # no faults chosen: just the workload
                    await asyncio.sleep(min(args.report_every, end - time.monotonic()))
                    if time.monotonic() < end:
                        await interim()
                await sampler
                soak.sample()
                soak.note("stopping the writer; waiting for the runner and the relay to finish")
                code = await writer.stop()
                console.print(writer.tail(400).strip().splitlines()[-1] if writer.tail() else "", highlight=False)
                if code != 0:
                    soak.note(f"the writer ended with status {code}:\n{writer.tail()}")
                    ok = False
                if not await soak.settle(args.settle_timeout):
                    soak.note(f"not settled within {args.settle_timeout}s")
                    ok = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(deliveries.drain(), 60)
                soak.sample()
                ok = await soak.report(final=True) and ok
            finally:
                for process in (relay, runner, writer):
                    await process.stop(10)
                await deliveries.stop()
    return ok


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the workload runs (default 30)")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of: {', '.join(FAULTS)}")
    parser.add_argument("--fault-every", type=float, default=20.0, help="mean seconds between faults")
    parser.add_argument("--report-every", type=float, default=300.0, help="seconds between interim reports")
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds between memory samples")
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    parser.add_argument("--rate", type=float, default=10.0, help="customers per second")
    parser.add_argument("--concurrency", type=int, default=16, help="customers shopping at once, at most")
    parser.add_argument("--stock", type=int, default=300, help="initial stock of the less popular products")
    parser.add_argument("--writer-retry-for", type=float, default=2.0,
                        help="seconds the writer's store retries after a lost connection: shorter than the longest "
                        "PostgreSQL outage (3 s), so some commands raise and are checked to be stored at most once")
    parser.add_argument("--seed", type=int, help="of the fault schedule and the workload (default: random, printed)")
    parser.add_argument("--workdir", type=Path, help="logs and the journal (default: a new temporary directory)")
    sub = parser.add_subparsers(dest="role")
    writer = sub.add_parser("writer", help="(internal) the writer process")
    writer.add_argument("--database-url", required=True)
    writer.add_argument("--journal", type=Path, required=True)
    writer.add_argument("--rate", type=float, default=10.0)
    writer.add_argument("--concurrency", type=int, default=16)
    writer.add_argument("--stock", type=int, default=300)
    writer.add_argument("--seed", type=int, default=0)
    writer.add_argument("--retry-for", type=float, default=15.0)
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if args.role == "writer":
        with args.journal.open("ab", buffering=0) as journal:
            sys.exit(asyncio.run(_write(args, journal)))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eventstore-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(  # the checker's own reconnect warnings: not on the report's screen
        filename=workdir / "soak.log", level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    ok = asyncio.run(_soak(args, workdir))
    console.print("[green]soak passed[/]" if ok else f"[bold red]soak FAILED[/] (logs in {workdir})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
