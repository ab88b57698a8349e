"""The runner: catches up from its checkpoint in batches, follows the log, owns each projection alone."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any

import pytest

from eventstore import EventStore, NewEvent, RecordedEvent
from projections import InvalidProjection, Projection, ProjectionAdmin, ProjectionRunner, ProjectionsNotMigrated
from tests.projections.app import (
    Ledger,
    StreamCounts,
    assert_ledger_exactly_once,
    caught_up,
    deposit,
    eventually,
    fill,
)


async def test_catches_up_from_the_start_exactly_once(store: EventStore) -> None:
    await fill(store, accounts=5, rounds=20)
    last = (await store.append("other-1", [NewEvent("Opened"), NewEvent("Ignored")])).checkpoint
    projections = ProjectionAdmin(store, [Ledger(), StreamCounts()])
    async with projections.runner(batch_size=7) as runner:
        await caught_up(runner, last)
    assert await assert_ledger_exactly_once(store) == 300
    counts = {r["stream_id"]: r["events"] for r in await store.pool.fetch("SELECT * FROM stream_counts")}
    assert counts == {**{f"acc-{a}": 60 for a in range(5)}, "other-1": 1}
    # The tables live in the generation's schema; readers see them through views of the same name.
    assert await store.pool.fetchval("SELECT count(*) FROM projection_ledger_g1.ledger_applied") == 300
    kinds = await store.pool.fetch(
        "SELECT relname, relkind::text FROM pg_class WHERE relnamespace = 'public'::regnamespace "
        "AND relname IN ('ledger_balances', 'ledger_applied', 'stream_counts')"
    )
    assert {r["relname"]: r["relkind"] for r in kinds} == dict.fromkeys(
        ["ledger_balances", "ledger_applied", "stream_counts"], "v"
    )
    statuses = {s.name: s for s in await projections.status()}
    assert statuses["ledger"].checkpoint == last  # past the events it does not handle, too
    assert (statuses["ledger"].lag, statuses["ledger"].state, statuses["ledger"].status) == (0, "stopped", "stopped")


async def test_restarted_runner_continues_from_its_checkpoint(store: EventStore) -> None:
    projections = ProjectionAdmin(store, [Ledger()])
    first = await fill(store, accounts=3, rounds=4)
    async with projections.runner(batch_size=5) as runner:
        await caught_up(runner, first)
    second = await fill(store, accounts=3, rounds=4, prefix="more")
    await store.wait_until_visible(second)
    (before,) = await projections.status()
    assert before.checkpoint == first and before.lag == 36
    async with projections.runner(batch_size=5) as runner:
        await caught_up(runner, second)
    assert await assert_ledger_exactly_once(store) == 72


async def test_follows_new_events_without_polling(store: EventStore) -> None:
    projections = ProjectionAdmin(store, [Ledger()])
    async with projections.runner(poll_interval=120) as runner:
        await runner.wait_caught_up()
        for i in range(3):
            result = await store.append(f"late-{i}", [deposit(f"late{i}", 5)])
            await caught_up(runner, result.checkpoint)
        # Idle between notifications: the runner's connection issues no statements.
        await asyncio.sleep(1.5)
        idle = await store.pool.fetchrow(
            "SELECT state, now() - state_change AS quiet FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'eventstore projection ledger'"
        )
        assert idle["state"] == "idle" and idle["quiet"].total_seconds() >= 1.0
    assert await assert_ledger_exactly_once(store) == 3


@pytest.mark.parametrize("partitions", [1, 2])
async def test_an_event_held_back_by_an_older_transaction_is_applied_soon_after_it_ends(
    store: EventStore, partitions: int
) -> None:
    """The transaction holding the log back sends no NOTIFY as it ends: the runner, woken by the
    append's NOTIFY to a batch that found the event held back, must look again well before its poll
    interval (120 s here)."""
    async with ProjectionAdmin(store, [Ledger(partitions=partitions)]).runner(poll_interval=120) as runner:
        await runner.wait_caught_up()
        await asyncio.sleep(0.3)  # every worker found nothing and waits for a NOTIFY
        async with store.pool.acquire() as blocker:
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.fetchval("SELECT pg_current_xact_id()")  # holds the log's visibility line
            result = await store.append("held-1", [deposit("held", 7)])  # its NOTIFY finds nothing visible
            await asyncio.sleep(0.5)
            await transaction.rollback()
        await caught_up(runner, result.checkpoint, seconds=10)
    assert await assert_ledger_exactly_once(store) == 1


@pytest.mark.parametrize("partitions", [1, 2])
async def test_a_short_hold_during_a_burst_of_appends_delays_them_by_a_second_at_most(
    store: EventStore, partitions: int
) -> None:
    """Each NOTIFY of the burst wakes the runner to find the events held back, and each such look
    doubled the next wait, up to the poll interval (120 s): the looks now wait a second at most."""
    async with ProjectionAdmin(store, [Ledger(partitions=partitions)]).runner(poll_interval=120) as runner:
        await runner.wait_caught_up()
        async with store.pool.acquire() as old:
            holder = old.transaction()
            await holder.start()
            await old.fetchval("SELECT pg_current_xact_id()")  # holds the log's visibility line
            for n in range(14):
                last = await store.append(f"burst-{n % 3}", [deposit(f"burst{n % 3}", 1)])
                await asyncio.sleep(0.03)
            await holder.rollback()  # held for about half a second; ends without a NOTIFY
        await caught_up(runner, last.checkpoint, seconds=10)
    assert await assert_ledger_exactly_once(store) == 14


async def test_batch_handlers_receive_consecutive_runs(store: EventStore) -> None:
    sizes: list[int] = []

    class RecordingLedger(Ledger):
        async def withdrawn(self, conn: Any, events: list[RecordedEvent]) -> None:
            sizes.append(len(events))
            await super().withdrawn(conn, events)

    last = await fill(store, accounts=2, rounds=3)
    async with ProjectionAdmin(store, [RecordingLedger()]).runner(batch_size=100) as runner:
        await caught_up(runner, last)
    # Each append is deposit, withdrawal, withdrawal: the two withdrawals arrive together.
    assert sizes == [2] * 6
    assert await assert_ledger_exactly_once(store) == 18


async def test_two_runners_in_one_process_share_out_the_projections(store: EventStore) -> None:
    projections = ProjectionAdmin(store, [Ledger(), StreamCounts()])
    last = await fill(store, accounts=2, rounds=2)
    first = projections.runner(lease_interval=0.1, label="first")
    second = projections.runner(lease_interval=0.1, label="second")
    async with first, second:
        await caught_up(first, last)
        owners = Counter(first.owned + second.owned)
        assert owners == Counter({"ledger": 1, "stream_counts": 1})
        await first.stop()

        async def taken_over() -> bool:
            return sorted(second.owned) == ["ledger", "stream_counts"]

        await eventually(taken_over, 10, "the second runner takes over")
        more = await fill(store, accounts=2, rounds=1, prefix="after")
        await caught_up(second, more)
    assert await assert_ledger_exactly_once(store) == 18


async def _created(store: EventStore) -> tuple[int, int]:
    rows = await store.pool.fetchval("SELECT count(*) FROM projection_checkpoints")
    schemas = await store.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projection%'")
    return rows, schemas


async def _noop(conn: Any, event: RecordedEvent) -> None:
    return None


@pytest.mark.parametrize(
    ("ddl", "message"),
    [
        ("CREATE TABLE t (x nonsense_type)", "DDL of table 't' failed: type \"nonsense_type\" does not exist"),
        ("CREATE TABLE other (x int)", "did not create a table named 't'"),
        ("CREATE TABLE public.t (x int)", "did not create a table named 't'"),
    ],
)
async def test_bad_table_ddl_is_a_clear_error_and_creates_nothing(store: EventStore, ddl: str, message: str) -> None:
    projection = Projection(name="bad", tables={"t": ddl}, handlers={"A": _noop})
    with pytest.raises(InvalidProjection, match=re.escape(message)):
        await ProjectionRunner(store, [projection]).start()
    assert await _created(store) == (0, 0)
    assert await store.pool.fetchval("SELECT to_regclass('public.t')") is None


async def test_a_table_name_already_taken_is_a_clear_error(store: EventStore) -> None:
    await store.pool.execute("CREATE TABLE ledger_applied (mine int)")
    taken = "public.ledger_applied already exists and is not this projection's view"
    with pytest.raises(InvalidProjection, match=re.escape(taken)):
        await ProjectionRunner(store, [Ledger()]).start()
    assert await _created(store) == (0, 0)
    assert await store.pool.fetchval("SELECT count(*) FROM ledger_applied") == 0


async def test_an_unmigrated_database_is_a_clear_error(store: EventStore) -> None:
    await store.pool.execute("DROP TABLE projection_rebuilds, projection_partitions, projection_checkpoints")
    with pytest.raises(ProjectionsNotMigrated, match="run `eventstore migrate`"):
        await ProjectionRunner(store, [Ledger()]).start()
    with pytest.raises(ProjectionsNotMigrated):
        await ProjectionAdmin(store, [Ledger()]).status()
    with pytest.raises(ProjectionsNotMigrated):
        await ProjectionAdmin(store, [Ledger()]).rebuild("ledger")


def _worker_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("projection ") and not t.done()]


async def _runner_sessions(store: EventStore) -> int:
    return int(await store.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'eventstore projection%'"
    ))


@pytest.mark.parametrize("partitions", [1, 3])
async def test_a_second_start_is_refused_and_stop_ends_everything_the_runner_started(
    store: EventStore, partitions: int
) -> None:
    from projections import ProjectionError

    last = await fill(store, 4, 5)
    runner = ProjectionRunner(store, [Ledger(partitions=partitions)], lease_interval=0.1)
    await runner.start()
    try:
        with pytest.raises(ProjectionError, match="already started"):
            await runner.start()
        await caught_up(runner, last)
        # A start while a stop is under way starts again once the stop is done.
        await asyncio.gather(runner.stop(), runner.start())
        assert len(_worker_tasks()) == partitions
    finally:
        await runner.stop()
    assert _worker_tasks() == [] and await _runner_sessions(store) == 0
    # A stop that overtakes a start in progress: that start starts nothing.
    await asyncio.gather(runner.start(), runner.stop())
    assert _worker_tasks() == [] and await _runner_sessions(store) == 0
    async with runner:  # and the runner can be started again
        more = await fill(store, 2, 2, prefix="more")
        await caught_up(runner, more)
    assert _worker_tasks() == [] and await _runner_sessions(store) == 0
    await assert_ledger_exactly_once(store)
