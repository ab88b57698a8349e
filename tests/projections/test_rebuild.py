"""Rebuild from the start into new tables while the old ones serve; reset in place."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import asyncpg
import pytest

from eventstore import START, Checkpoint, EventStore, NewEvent, RecordedEvent, asyncpg_dsn
from projections import (
    InlineProjections,
    Projection,
    ProjectionAdmin,
    ProjectionFailed,
    ProjectionNeedsRebuild,
    RebuildInProgress,
    RebuildProgress,
    UnknownProjection,
    handles,
)
from projections.generations import lease_key
from tests.projections.app import (
    Ledger,
    Totals,
    assert_ledger_exactly_once,
    balances,
    caught_up,
    deposit,
    eventually,
    fill,
    withdraw,
)


async def _schemas(store: EventStore, name: str) -> list[str]:
    rows = await store.pool.fetch(
        "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1 ORDER BY 1", f"projection_{name}_g%"
    )
    return [r[0] for r in rows]


async def test_rebuild_while_serving_and_writing_swaps_atomically(store: EventStore) -> None:
    await store.wait_until_visible(await fill(store, accounts=4, rounds=25))
    projections = ProjectionAdmin(store, [Ledger()])
    stop = asyncio.Event()
    reads: list[tuple[int, int]] = []

    async def writer() -> Checkpoint:
        last = START
        n = 0
        while not stop.is_set():
            account = f"live{n % 3}"
            last = (await store.append(f"live-{n % 3}", [deposit(account, n), withdraw(account, 1)])).checkpoint
            n += 1
            await asyncio.sleep(0.002)
        return last

    async def reader() -> None:
        while not stop.is_set():
            row = await store.pool.fetchrow(
                "SELECT (SELECT coalesce(sum(moves), 0) FROM ledger_balances) AS moves, "
                "(SELECT count(*) FROM ledger_applied) AS applied"
            )
            reads.append((row["moves"], row["applied"]))
            await asyncio.sleep(0.001)

    progress: list[RebuildProgress] = []
    async with projections.runner(batch_size=20, poll_interval=0.2) as runner:
        await runner.wait_caught_up()
        writing, reading = asyncio.create_task(writer()), asyncio.create_task(reader())
        result = await projections.rebuild("ledger", progress=progress.append, batch_size=25, progress_interval=0)
        stop.set()
        last = await writing
        await reading
        await caught_up(runner, last)
    count = await assert_ledger_exactly_once(store)
    assert count > 300 and result.done >= 300

    # Readers were served throughout, always from one consistent generation, never going backwards.
    assert len(reads) > 10
    assert all(moves == applied for moves, applied in reads)
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(reads))

    phases = [p.phase for p in progress]
    assert phases[0] == "building" and "swapping" in phases and phases[-1] == "done"
    assert all(a.done <= b.done for a, b in itertools.pairwise(progress))
    middle = [p for p in progress if p.phase == "building" and p.done > 0]
    assert middle and all(p.rate > 0 and p.eta is not None and p.total >= p.done for p in middle)

    (status,) = await projections.status()
    assert (status.generation, status.rebuild, status.version) == (2, None, 1)
    assert await _schemas(store, "ledger") == ["projection_ledger_g2"]


class LedgerV2(Ledger):
    """Version 2 keeps the position of each account's latest move too."""

    version = 2
    tables = {
        **Ledger.tables,
        "ledger_balances": (
            "CREATE TABLE ledger_balances (account text PRIMARY KEY, balance bigint NOT NULL, moves int NOT NULL, "
            "last_position bigint NOT NULL)"
        ),
    }

    @handles("Deposited")
    async def deposited(self, conn: Any, event: RecordedEvent) -> None:
        await self._move(conn, event, 1)

    @handles("Withdrawn")
    async def withdrawn(self, conn: Any, event: RecordedEvent) -> None:  # type: ignore[override]
        await self._move(conn, event, -1)

    async def _move(self, conn: Any, event: RecordedEvent, sign: int) -> None:
        data = event.json()
        await conn.execute(
            "INSERT INTO ledger_balances VALUES ($1, $2, 1, $3) ON CONFLICT (account) DO UPDATE "
            "SET balance = ledger_balances.balance + EXCLUDED.balance, moves = ledger_balances.moves + 1, "
            "last_position = EXCLUDED.last_position",
            data["account"], sign * data["amount"], event.position,
        )
        await conn.execute("INSERT INTO ledger_applied VALUES ($1, $2)", event.position, event.event_id)


async def test_rebuild_to_a_new_version_hands_over_to_runners_of_that_version(store: EventStore) -> None:
    first = await fill(store, accounts=3, rounds=5)
    old, new = ProjectionAdmin(store, [Ledger()]), ProjectionAdmin(store, [LedgerV2()])
    async with old.runner(poll_interval=0.1, lease_interval=0.1, label="v1") as v1, new.runner(
        poll_interval=0.1, lease_interval=0.1, label="v2"
    ) as v2:
        await caught_up(v1, first)
        assert v1.owned == ["ledger"] and v2.owned == []  # v2 finds tables of version 1: not its to run
        (status,) = await new.status()
        assert status.state == "needs rebuild"
        assert "built by version 1, declared version is 2" in str(status.needs_rebuild)
        with pytest.raises(ProjectionNeedsRebuild, match="built by version 1, declared version is 2"):
            await v2.wait_caught_up()

        await new.rebuild("ledger")

        async def handed_over() -> bool:
            return v1.owned == [] and v2.owned == ["ledger"]

        await eventually(handed_over, what="the version 2 runner takes over after the swap")
        last = await fill(store, accounts=3, rounds=2, prefix="after")
        await caught_up(v2, last)
    assert await assert_ledger_exactly_once(store) == 63
    latest = await store.pool.fetchval("SELECT max(last_position) FROM ledger_balances")
    assert latest == last.position
    (status,) = await old.status()
    assert (status.state, status.version, status.declared_version) == ("needs rebuild", 2, 1)


class Fragile(Ledger):
    """Fails on the deposit at `fail_at` while it is set."""

    fail_at: int | None = None

    @handles("Deposited")
    async def deposited(self, conn: Any, event: RecordedEvent) -> None:
        if event.position == self.fail_at:
            raise RuntimeError("disk on fire")
        await super().deposited(conn, event)


async def test_an_interrupted_rebuild_resumes_where_it_stopped(store: EventStore) -> None:
    await store.wait_until_visible(await fill(store, accounts=3, rounds=10))
    fragile = Fragile()
    projections = ProjectionAdmin(store, [fragile])
    async with projections.runner() as runner:
        await runner.wait_caught_up()
    deposits = await store.read_all(limit=1000, types=["Deposited"])
    fragile.fail_at = deposits[20].position
    with pytest.raises(ProjectionFailed, match="disk on fire"):
        await projections.rebuild("ledger", batch_size=7)
    (status,) = await projections.status()
    assert status.generation == 1 and status.rebuild is not None
    assert status.rebuild.generation == 2 and not status.rebuild.active
    assert status.rebuild.checkpoint < Checkpoint(*deposits[20].checkpoint)
    assert status.rebuild.events_done > 0 and "disk on fire" in str(status.rebuild.last_error)
    assert await assert_ledger_exactly_once(store) == 90  # the live tables were never touched

    fragile.fail_at = None
    progress: list[RebuildProgress] = []
    await projections.rebuild("ledger", batch_size=7, progress=progress.append)
    assert progress[0].done == status.rebuild.events_done  # picked up, not started over
    assert progress[-1].done == 90
    assert await assert_ledger_exactly_once(store) == 90
    assert await _schemas(store, "ledger") == ["projection_ledger_g2"]


async def test_only_one_rebuild_at_a_time(store: EventStore, database_url: str) -> None:
    projections = ProjectionAdmin(store, [Ledger()])
    other = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await other.fetchval("SELECT pg_advisory_lock($1)", lease_key("rebuild", "ledger"))
        with pytest.raises(RebuildInProgress, match="'ledger' is being rebuilt by another process"):
            await projections.rebuild("ledger")
        with pytest.raises(RebuildInProgress):
            await projections.reset("ledger")
    finally:
        await other.close()
    with pytest.raises(UnknownProjection, match="unknown projection 'ledgr'"):
        await projections.rebuild("ledgr")


async def test_reset_replays_in_place(store: EventStore) -> None:
    first = await fill(store, accounts=2, rounds=5)
    projections = ProjectionAdmin(store, [Ledger()])
    async with projections.runner(poll_interval=0.1) as runner:
        await caught_up(runner, first)
        await runner.stop()
        await projections.reset("ledger")
        (status,) = await projections.status()
        assert (status.generation, status.checkpoint, status.lag) == (2, START, 30)
        assert await store.pool.fetchval("SELECT count(*) FROM ledger_applied") == 0
        await runner.start()
        await caught_up(runner, first)
    assert await assert_ledger_exactly_once(store) == 30
    assert await _schemas(store, "ledger") == ["projection_ledger_g2"]


async def test_inline_rebuild_and_reset_under_concurrent_appends(store: EventStore) -> None:
    stop = asyncio.Event()

    async def writer(prefix: str) -> Checkpoint:
        n, last = 0, START
        while not stop.is_set():
            account = f"{prefix}{n % 4}"
            last = (await store.append(f"{prefix}-{n % 4}", [deposit(account, 2), withdraw(account, 1)])).checkpoint
            n += 1
        return last

    async with InlineProjections(store, [Totals()]):
        await fill(store, accounts=3, rounds=10)
        projections = ProjectionAdmin(store, [Totals()])
        writers = [asyncio.create_task(writer(p)) for p in ("w", "x", "y")]
        await asyncio.sleep(0.2)
        await projections.rebuild("totals", batch_size=10)
        await asyncio.sleep(0.1)
        await projections.reset("totals")
        await asyncio.sleep(0.1)
        stop.set()
        await store.wait_until_visible(max(await asyncio.gather(*writers)))
    expected: dict[str, int] = {}
    for event in await store.read_all(limit=100_000):
        data = event.json()
        sign = 1 if event.event_type == "Deposited" else -1
        expected[data["account"]] = expected.get(data["account"], 0) + sign * data["amount"]
    assert await balances(store) == expected
    (status,) = await projections.status()
    assert (status.state, status.generation) == ("inline", 3)


class _FailsOnce(Projection):
    """Records each applied (stream, version); raises once, on the event `armed` names."""

    name = "fails_once"
    partitions = 3
    tables = {
        "fails_once": "CREATE TABLE fails_once "
        "(seq bigserial PRIMARY KEY, stream_id text NOT NULL, version int NOT NULL)"
    }
    armed: tuple[str, int] | None = None

    @handles("Step")
    async def step(self, conn: Any, event: RecordedEvent) -> None:
        if _FailsOnce.armed == (event.stream_id, event.stream_version):
            _FailsOnce.armed = None
            raise RuntimeError("fails once")
        await conn.execute(
            "INSERT INTO fails_once (stream_id, version) VALUES ($1, $2)", event.stream_id, event.stream_version
        )


async def test_a_partitioned_rebuild_gets_past_a_handler_that_fails_once(store: EventStore) -> None:
    """Like the single pass, each partition retries a failed batch one event at a time: a passing error
    (a deadlock, a timeout) must not throw a long rebuild away."""
    streams = [f"step-{s}" for s in range(5)]
    for stream in streams:
        await store.append(stream, [NewEvent("Step") for _ in range(30)])
    admin = ProjectionAdmin(store, [_FailsOnce()])
    _FailsOnce.armed = ("step-2", 7)
    await admin.rebuild("fails_once", batch_size=7)
    assert _FailsOnce.armed is None, "the handler failed once"
    rows = await store.pool.fetch("SELECT stream_id, version FROM fails_once ORDER BY seq")
    applied: dict[str, list[int]] = {}
    for row in rows:
        applied.setdefault(row["stream_id"], []).append(row["version"])
    assert applied == {stream: list(range(30)) for stream in streams}


class _LosesConnectionOnce(_FailsOnce):
    """Its connection is terminated once, on the event `armed` names, by another session."""

    name = "loses_connection"
    tables = {
        "loses_connection": "CREATE TABLE loses_connection "
        "(seq bigserial PRIMARY KEY, stream_id text NOT NULL, version int NOT NULL)"
    }
    url = ""

    @handles("Step")
    async def step(self, conn: Any, event: RecordedEvent) -> None:
        if _LosesConnectionOnce.armed == (event.stream_id, event.stream_version):
            _LosesConnectionOnce.armed = None
            killer = await asyncpg.connect(self.url)
            try:
                await killer.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
            finally:
                await killer.close()
        await conn.execute(
            "INSERT INTO loses_connection (stream_id, version) VALUES ($1, $2)", event.stream_id, event.stream_version
        )


async def test_a_partitioned_rebuild_retries_after_a_partition_loses_its_connection(store: EventStore) -> None:
    """The partitions build on connections of their own: losing one is a lost connection, retried like in
    the single pass, not an error group the caller cannot handle."""
    streams = [f"step-{s}" for s in range(5)]
    for stream in streams:
        await store.append(stream, [NewEvent("Step") for _ in range(30)])
    projection = _LosesConnectionOnce()
    assert store.url is not None
    projection.url = store.url
    admin = ProjectionAdmin(store, [projection])
    _LosesConnectionOnce.armed = ("step-2", 7)
    done = await admin.rebuild("loses_connection", batch_size=7)
    assert _LosesConnectionOnce.armed is None, "a connection was lost"
    assert done.phase == "done"
    rows = await store.pool.fetch("SELECT stream_id, version FROM loses_connection ORDER BY seq")
    applied: dict[str, list[int]] = {}
    for row in rows:
        applied.setdefault(row["stream_id"], []).append(row["version"])
    assert applied == {stream: list(range(30)) for stream in streams}
    assert await store.pool.fetchval("SELECT count(*) FROM projection_rebuilds") == 0
