"""Projection replay: 100,000 events (1,000 accounts: one `Opened` and 99 `Deposited` each, appended
ten at a time round-robin over the accounts, so a batch of 1,000 events touches about 100 accounts)
projected from the start of the log into a PostgreSQL read-model table `balances(account, balance,
deposits)`.

- ours, batch handler: a `ProjectionRunner` catching up from zero; the handler receives each batch's
  deposits and writes them with one `INSERT ... SELECT FROM unnest(...) ON CONFLICT` statement.
- ours, event handler: the same runner, one upsert statement per event (what the peer does).
- ours, rebuild: `ProjectionAdmin.rebuild` of the batch-handler projection into a new generation of tables,
  swapped in at the end (the blue/green path, with its extra bookkeeping).
- peer: `eventsourcing` 9.5's own projection machinery, the closest equivalent it has: a `Projection`
  run by its `ProjectionRunner`, subscribed to the `Deposited` topic of an `Application`'s
  notification log, writing the same table through a `PostgresTrackingRecorder` subclass (the upsert
  and its tracking record in one transaction per event, as its API processes events one at a time).
  Measured on 30,000 of the events (300 accounts): its rate does not depend on the count, and all
  100,000 would take over a minute of the benchmark's budget.
- limit: raw asyncpg keyset scan of the same events in (log_xid, position) order, 1,000 a page,
  writing nothing: how fast the events can be read at all (the median of a scan before each replay,
  after a warm-up scan).

Every figure is events per second over the events projected (99,000 deposits; the scan reads all 100,000).
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import asyncpg
import orjson

from benchmarks.common import Result, Timer, eventsourcing_env, fresh_database, rate
from eventstore import START, Checkpoint, EventStore, NewEvent, RecordedEvent, asyncpg_dsn
from projections import Projection, ProjectionAdmin, ProjectionRunner, handles

ACCOUNTS = 1_000
PER_ACCOUNT = 100  # one Opened and 99 Deposited
EVENTS = ACCOUNTS * PER_ACCOUNT
DEPOSITS = ACCOUNTS * (PER_ACCOUNT - 1)
PEER_ACCOUNTS = 300  # the peer projects 30,000 of them (see _peer)
CHUNK = 10  # events per append
BATCH = 1_000
UNIT = "events/s"

TABLE = "CREATE TABLE {name} (account text PRIMARY KEY, balance bigint NOT NULL, deposits int NOT NULL)"

UPSERT = """
INSERT INTO {name} (account, balance, deposits) VALUES ($1, $2, 1)
ON CONFLICT (account) DO UPDATE SET balance = {name}.balance + EXCLUDED.balance, deposits = {name}.deposits + 1
"""

UPSERT_MANY = """
INSERT INTO {name} (account, balance, deposits)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::int[])
ON CONFLICT (account) DO UPDATE
SET balance = {name}.balance + EXCLUDED.balance, deposits = {name}.deposits + EXCLUDED.deposits
"""

SCAN = """
SELECT event_id, event_type, data, metadata, stream_id, stream_version, position, log_xid, recorded_at
FROM events WHERE (log_xid, position) > ($1, $2)
ORDER BY log_xid, position
LIMIT $3
"""


class BatchBalances(Projection):
    name = "balances_batch"
    tables = {"balances_batch": TABLE.format(name="balances_batch")}
    sql = UPSERT_MANY.format(name="balances_batch")

    @handles("Deposited", batch=True)
    async def deposited(self, conn: Any, events: list[RecordedEvent]) -> None:
        totals: dict[str, list[int]] = {}
        for event in events:
            data = orjson.loads(event.data)
            total = totals.setdefault(data["account"], [0, 0])
            total[0] += data["amount"]
            total[1] += 1
        await conn.execute(self.sql, list(totals), [t[0] for t in totals.values()], [t[1] for t in totals.values()])


class EventBalances(Projection):
    name = "balances_each"
    tables = {"balances_each": TABLE.format(name="balances_each")}
    sql = UPSERT.format(name="balances_each")

    @handles("Deposited")
    async def deposited(self, conn: Any, event: RecordedEvent) -> None:
        data = orjson.loads(event.data)
        await conn.execute(self.sql, data["account"], data["amount"])


def _events_of(account: int, chunk: int) -> list[NewEvent]:
    """The `chunk`-th ten events of an account: its `Opened` first, then deposits."""
    stream = f"account-{account}"
    events = []
    for i in range(chunk * CHUNK, (chunk + 1) * CHUNK):
        if i == 0:
            events.append(NewEvent("Opened", {"account": stream}))
        else:
            events.append(NewEvent("Deposited", {"account": stream, "amount": _amount(account, i)}))
    return events


def _amount(account: int, i: int) -> int:
    return 1 + (account + i) % 50


async def _fill(store: EventStore) -> Checkpoint:
    """The log: ten events per append, round-robin over the accounts, several appends at a time."""
    last = START
    work = iter([(a, c) for c in range(PER_ACCOUNT // CHUNK) for a in range(ACCOUNTS)])

    async def writer() -> None:
        nonlocal last
        for account, chunk in work:
            result = await store.append(f"account-{account}", _events_of(account, chunk))
            last = max(last, result.checkpoint)

    await asyncio.gather(*(writer() for _ in range(8)))
    await store.wait_until_visible(last)
    # As autovacuum would after a load this size: without statistics the planner reads a type's events
    # with a bitmap scan and sorts all of them for every page (five times slower).
    await store.pool.execute("ANALYZE events")
    return last


async def _check(store: EventStore, table: str) -> None:
    row = await store.pool.fetchrow(f"SELECT count(*), sum(deposits), sum(balance) FROM {table}")
    assert (row[0], row[1]) == (ACCOUNTS, DEPOSITS), (table, row)
    expected = sum(_amount(a, i) for a in range(ACCOUNTS) for i in range(1, PER_ACCOUNT))
    assert row[2] == expected, (table, row[2], expected)


async def _replay(store: EventStore, projection: Projection, last: Checkpoint) -> float:
    with Timer() as timer:
        async with ProjectionRunner(store, [projection], batch_size=BATCH) as runner:
            await runner.wait_caught_up(last, interval=0.005)
    await _check(store, projection.name)  # each projection's table has its name
    return rate(DEPOSITS, timer.seconds)


async def _scan(url: str) -> float:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        after, seen = (0, 0), 0
        with Timer() as timer:
            while rows := await conn.fetch(SCAN, after[0], after[1], BATCH):
                seen += len(rows)
                after = (rows[-1][7], rows[-1][6])
        assert seen == EVENTS, seen
        return rate(EVENTS, timer.seconds)
    finally:
        await conn.close()


async def _ours(server_url: str) -> dict[str, float]:
    async with fresh_database(server_url) as url, EventStore(url) as store:
        last = await _fill(store)
        await _scan(url)  # warm: the events' pages in the server's cache
        scans = [await _scan(url)]
        out = {"batch": await _replay(store, BatchBalances(), last)}
        scans.append(await _scan(url))
        out["each"] = await _replay(store, EventBalances(), last)
        scans.append(await _scan(url))
        with Timer() as timer:
            await ProjectionAdmin(store, [BatchBalances()]).rebuild("balances_batch", batch_size=BATCH)
        await _check(store, "balances_batch")
        out["rebuild"] = rate(DEPOSITS, timer.seconds)
        out["scan"] = statistics.median(scans)  # one before each replay: the same spells of load
        return out


def _peer(url: str) -> float:
    """`eventsourcing`'s ProjectionRunner projecting the same kind of deposits into the same table.

    On `PEER_ACCOUNTS` accounts rather than all of them: at its rate the full 100,000 would take most
    of the benchmark's time budget, and one transaction per event makes its rate independent of the count.
    """
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate, event
    from eventsourcing.persistence import Tracking
    from eventsourcing.postgres import PostgresTrackingRecorder
    from eventsourcing.projection import Projection as PeerProjection
    from eventsourcing.projection import ProjectionRunner as PeerRunner
    from eventsourcing.utils import get_topic
    from psycopg.sql import SQL

    class Account(Aggregate):  # type: ignore[misc]
        @event("Opened")  # type: ignore[misc]
        def __init__(self, name: str) -> None:
            self.name = name

        @event("Deposited")  # type: ignore[misc]
        def deposit(self, amount: int) -> None:
            pass

    class Bank(Application):  # type: ignore[misc]
        pass

    class BalancesView(PostgresTrackingRecorder):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sql_create_statements.append(SQL(TABLE.format(name="balances")))
            self.upsert = SQL(UPSERT.format(name="balances").replace("$1", "%s").replace("$2", "%s"))

        def deposit(self, account: str, amount: int, tracking: Tracking) -> None:
            with self.datastore.transaction(commit=True) as curs:
                curs.execute(self.upsert, (account, amount), prepare=True)
                self._insert_tracking(curs, tracking)

    class Balances(PeerProjection[BalancesView]):  # type: ignore[misc]
        name = "balances"
        topics = (get_topic(Account.Deposited),)

        def process_event(self, domain_event: Any, tracking: Tracking) -> None:
            if isinstance(domain_event, Account.Deposited):
                self.view.deposit(str(domain_event.originator_id), domain_event.amount, tracking)

    with eventsourcing_env(url):
        bank = Bank()
        try:
            accounts = [Account(name=f"account-{a}") for a in range(PEER_ACCOUNTS)]
            for chunk in range(PER_ACCOUNT // CHUNK):  # the same interleaving as ours
                for a, account in enumerate(accounts):
                    for i in range(max(chunk * CHUNK, 1), (chunk + 1) * CHUNK):
                        account.deposit(_amount(a, i))
                    bank.save(account)
            head = bank.recorder.max_notification_id()
        finally:
            bank.close()
        with Timer() as timer, PeerRunner(
            application_class=Bank, projection_class=Balances, view_class=BalancesView
        ) as runner:
            runner.wait(head, timeout=600)
    return rate(PEER_ACCOUNTS * (PER_ACCOUNT - 1), timer.seconds)


async def _peer_check(url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = await conn.fetchrow("SELECT count(*), sum(deposits) FROM balances")
        assert (row[0], row[1]) == (PEER_ACCOUNTS, PEER_ACCOUNTS * (PER_ACCOUNT - 1)), row
    finally:
        await conn.close()


async def run(server_url: str) -> list[Result]:
    ours = await _ours(server_url)
    async with fresh_database(server_url, migrated=False) as url:
        peer = await asyncio.to_thread(_peer, url)
        await _peer_check(url)
    name = f"projection replay, {EVENTS // 1000}k events"
    return [
        Result(f"{name} (batch handler)", ours["batch"], UNIT, peer=peer, limit=ours["scan"]),
        Result(f"{name} (event handler)", ours["each"], UNIT, peer=peer, limit=ours["scan"]),
        Result(f"projection rebuild, {EVENTS // 1000}k events", ours["rebuild"], UNIT, limit=ours["scan"]),
    ]

