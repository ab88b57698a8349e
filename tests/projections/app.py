"""Projections the tests run in-process, in runner subprocesses and through the CLI (`--app`)."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import sqlalchemy as sa

from eventstore import START, Checkpoint, EventStore, NewEvent, RecordedEvent
from eventstore_app import Application
from projections import Projection, ProjectionRunner, handles

# Set by fault tests: sleep this long per event (client side, inside the batch's transaction) and
# append each handled event's position to this file, so a test can kill a runner mid-batch.
SLOW_ENV = "PROJECTION_TEST_SLOW_MS"
TRACE_ENV = "PROJECTION_TEST_TRACE"


async def _trace(event: RecordedEvent) -> None:
    slow = float(os.environ.get(SLOW_ENV, "0"))
    if slow:
        await asyncio.sleep(slow / 1000)
    trace = os.environ.get(TRACE_ENV)
    if trace:
        _append_line(trace, str(event.position))


def _append_line(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


class Ledger(Projection):
    """Balances per account, plus a log of applied events without a unique key, so a doubled event shows."""

    name = "ledger"
    tables = {
        "ledger_balances": (
            "CREATE TABLE ledger_balances (account text PRIMARY KEY, balance bigint NOT NULL, moves int NOT NULL)"
        ),
        "ledger_applied": [
            "CREATE TABLE ledger_applied (position bigint NOT NULL, event_id uuid NOT NULL)",
            "CREATE INDEX ON ledger_applied (position)",
        ],
    }

    @handles("Deposited")
    async def deposited(self, conn: Any, event: RecordedEvent) -> None:
        await _trace(event)
        data = event.json()
        await conn.execute(
            "INSERT INTO ledger_balances VALUES ($1, $2, 1) ON CONFLICT (account) DO UPDATE "
            "SET balance = ledger_balances.balance + EXCLUDED.balance, moves = ledger_balances.moves + 1",
            data["account"], data["amount"],
        )
        await conn.execute("INSERT INTO ledger_applied VALUES ($1, $2)", event.position, event.event_id)

    @handles("Withdrawn", batch=True)
    async def withdrawn(self, conn: Any, events: list[RecordedEvent]) -> None:
        for event in events:
            await _trace(event)
        rows = [(e.json()["account"], -e.json()["amount"]) for e in events]
        await conn.executemany(
            "INSERT INTO ledger_balances VALUES ($1, $2, 1) ON CONFLICT (account) DO UPDATE "
            "SET balance = ledger_balances.balance + EXCLUDED.balance, moves = ledger_balances.moves + 1",
            rows,
        )
        await conn.copy_records_to_table("ledger_applied", records=[(e.position, e.event_id) for e in events])


metadata = sa.MetaData()
stream_counts_table = sa.Table(
    "stream_counts",
    metadata,
    sa.Column("stream_id", sa.Text, primary_key=True),
    sa.Column("events", sa.Integer, nullable=False),
    sa.Index("stream_counts_by_events", "events"),
)


class StreamCounts(Projection):
    """Events per stream of any of its types; declared with a SQLAlchemy Core table."""

    name = "stream_counts"
    tables = [stream_counts_table]

    @handles("Deposited", "Withdrawn", "Opened")
    async def counted(self, conn: Any, event: RecordedEvent) -> None:
        await conn.execute(
            "INSERT INTO stream_counts VALUES ($1, 1) ON CONFLICT (stream_id) DO UPDATE "
            "SET events = stream_counts.events + 1",
            event.stream_id,
        )


class Totals(Projection):
    name = "totals"
    inline = True
    tables = {"account_totals": "CREATE TABLE account_totals (account text PRIMARY KEY, balance bigint NOT NULL)"}

    @handles("Deposited", "Withdrawn")
    async def moved(self, conn: Any, event: RecordedEvent) -> None:
        data = event.json()
        if data["amount"] < 0:
            raise ValueError("negative amounts are not allowed")
        sign = 1 if event.event_type == "Deposited" else -1
        await conn.execute(
            "INSERT INTO account_totals VALUES ($1, $2) ON CONFLICT (account) DO UPDATE "
            "SET balance = account_totals.balance + EXCLUDED.balance",
            data["account"], sign * data["amount"],
        )


async def balances(store: EventStore) -> dict[str, int]:
    return {r[0]: r[1] for r in await store.pool.fetch("SELECT account, balance FROM account_totals")}


PROJECTIONS = [Ledger(), StreamCounts(), Totals()]

APP = Application("accounts", projections=PROJECTIONS)
"""What `--app tests.projections.app:APP` loads in the CLI tests and fault tests."""


def deposit(account: str, amount: int) -> NewEvent:
    return NewEvent("Deposited", {"account": account, "amount": amount})


def withdraw(account: str, amount: int) -> NewEvent:
    return NewEvent("Withdrawn", {"account": account, "amount": amount})


async def expected_ledger(store: EventStore) -> tuple[dict[str, tuple[int, int]], int]:
    """Balances and moves per account, and the number of ledger events, computed from the log."""
    last = await store.pool.fetchrow("SELECT log_xid, position FROM events ORDER BY position DESC LIMIT 1")
    if last is not None:
        await store.wait_until_visible(Checkpoint(last[0], last[1]))
    balances: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    count = 0
    after = START
    while batch := await store.read_all(after, limit=5000, types=["Deposited", "Withdrawn"]):
        for event in batch:
            data = orjson.loads(event.data)
            sign = 1 if event.event_type == "Deposited" else -1
            balances[data["account"]][0] += sign * data["amount"]
            balances[data["account"]][1] += 1
            count += 1
        after = batch[-1].checkpoint
    return {k: (v[0], v[1]) for k, v in balances.items()}, count


async def assert_ledger_exactly_once(store: EventStore) -> int:
    """The read model equals applying every ledger event exactly once; returns the number of events."""
    expected, count = await expected_ledger(store)
    rows = await store.pool.fetch("SELECT account, balance, moves FROM ledger_balances")
    assert {r["account"]: (r["balance"], r["moves"]) for r in rows} == expected
    applied = await store.pool.fetchrow("SELECT count(*) AS n, count(DISTINCT position) AS d FROM ledger_applied")
    assert (applied["n"], applied["d"]) == (count, count)
    return count


async def fill(store: EventStore, accounts: int = 5, rounds: int = 10, prefix: str = "acc") -> Checkpoint:
    """Each round appends to every account a deposit and two withdrawals; returns the last checkpoint."""
    last = START
    for r in range(rounds):
        for a in range(accounts):
            account = f"{prefix}{a}"
            result = await store.append(
                f"{prefix}-{a}", [deposit(account, 10 + r), withdraw(account, 1), withdraw(account, r % 3)]
            )
            last = result.checkpoint
    return last


async def caught_up(runner: ProjectionRunner, until: Checkpoint, seconds: float = 30) -> None:
    async with asyncio.timeout(seconds):
        await runner.wait_caught_up(until)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 20, what: str = "condition") -> None:
    """Wait until `check()` holds; fail with `what` after `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"not within {seconds}s: {what}") from None
