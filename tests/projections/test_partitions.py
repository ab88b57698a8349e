"""Partitioned projections: a checkpoint and a lease per partition, runners sharing them, order per stream."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from eventstore import START, EventStore, InvalidArgument, NewEvent, RecordedEvent, asyncpg_dsn
from projections import (
    InvalidProjection,
    Projection,
    ProjectionAdmin,
    ProjectionNeedsRebuild,
    ProjectionRunner,
    handles,
    telemetry,
)
from projections.generations import partition_name
from tests.projections.app import caught_up, eventually


class StreamOrder(Projection):
    """Per stream, the versions in the order they were applied; a version out of order is a failure."""

    name = "stream_order"
    tables = {
        "stream_order": "CREATE TABLE stream_order (stream_id text PRIMARY KEY, versions int[] NOT NULL, "
        "runners text[] NOT NULL)",
    }

    @handles("Moved")
    async def moved(self, conn: Any, event: RecordedEvent) -> None:
        runner = str(await conn.fetchval("SELECT current_setting('application_name')"))
        last = await conn.fetchval("SELECT versions[cardinality(versions)] FROM stream_order WHERE stream_id = $1",
                                   event.stream_id)
        if (last if last is not None else -1) != event.stream_version - 1:
            raise AssertionError(f"{event.stream_id}: version {event.stream_version} after {last}")
        await conn.execute(
            "INSERT INTO stream_order VALUES ($1, ARRAY[$2::int], ARRAY[$3]) ON CONFLICT (stream_id) DO UPDATE "
            "SET versions = stream_order.versions || $2::int, runners = stream_order.runners || $3",
            event.stream_id, event.stream_version, runner,
        )


async def _append(store: EventStore, streams: int, versions: int, prefix: str = "s") -> Any:
    last = None
    for _ in range(versions):
        for s in range(streams):
            last = (await store.append(f"{prefix}-{s}", [NewEvent("Moved", {"account": f"a{s % 3}"})])).checkpoint
    return last


async def _versions(store: EventStore) -> dict[str, list[int]]:
    return {r["stream_id"]: list(r["versions"]) for r in await store.pool.fetch("SELECT * FROM stream_order")}


async def test_runners_share_the_partitions_and_each_stream_stays_in_order(store: EventStore) -> None:
    admin = ProjectionAdmin(store, [StreamOrder(partitions=4)])
    last = await _append(store, streams=12, versions=5)
    options: dict[str, Any] = {"batch_size": 3, "lease_interval": 0.1}
    async with admin.runner(**options) as one, admin.runner(**options) as two:
        await caught_up(one, last)
        await eventually(lambda: _split(one.owned, two.owned), what="both runners own partitions")
        more = await _append(store, streams=12, versions=3)
        await caught_up(two, more)
    assert await _versions(store) == {f"s-{s}": list(range(8)) for s in range(12)}
    rows = await store.pool.fetch("SELECT partition, log_xid, position FROM projection_partitions ORDER BY 1")
    assert [r["partition"] for r in rows] == [0, 1, 2, 3]
    assert all((r["log_xid"], r["position"]) >= tuple(more) for r in rows)
    (status,) = await admin.status()
    assert (status.state, status.lag, status.checkpoint >= more) == ("stopped", 0, True)


async def _split(first: list[str], second: list[str], names: set[str] | None = None) -> bool:
    names = names or {partition_name("stream_order", p) for p in range(4)}
    return bool(first) and bool(second) and set(first) | set(second) == names and not set(first) & set(second)


async def test_runners_share_the_partitions_of_a_projection_with_the_longest_name(store: EventStore) -> None:
    """Runners find each other by their sessions' names, which PostgreSQL cuts at 63 bytes."""
    name = "p" * 40
    admin = ProjectionAdmin(store, [StreamOrder(name=name, partitions=4)])
    last = await _append(store, streams=12, versions=2)
    options: dict[str, Any] = {"lease_interval": 0.1}
    async with admin.runner(**options) as one, admin.runner(**options) as two:
        await caught_up(one, last)
        names = {partition_name(name, p) for p in range(4)}
        await eventually(
            lambda: _split(one.owned, two.owned, names), seconds=10, what="both runners own partitions"
        )


async def test_each_event_belongs_to_exactly_one_partition_by_its_key(store: EventStore) -> None:
    by_account = StreamOrder(partitions=3, partition_key="data.account")
    await store.wait_until_visible(await _append(store, streams=9, versions=2))
    seen: dict[int, set[str]] = {}
    async with store.pool.acquire() as conn:
        from projections.generations import read_partition

        for p in range(3):
            events, _ = await read_partition(conn, by_account, p, START, 1000, store.keyring)
            seen[p] = {e.json()["account"] for e in events}
            assert len(events) == sum(1 for s in range(9) if f"a{s % 3}" in seen[p]) * 2
    assert set().union(*seen.values()) == {"a0", "a1", "a2"}
    assert sum(len(accounts) for accounts in seen.values()) == 3, "an account in two partitions"


async def test_changing_the_number_of_partitions_is_a_rebuild(store: EventStore) -> None:
    last = await _append(store, streams=6, versions=4)
    async with ProjectionAdmin(store, [StreamOrder(partitions=2)]).runner() as runner:
        await caught_up(runner, last)
    admin = ProjectionAdmin(store, [StreamOrder(partitions=3)])
    (status,) = await admin.status()
    assert status.state == "needs rebuild" and "2 partition(s), declared 3" in (status.needs_rebuild or "")
    async with admin.runner() as runner:
        with pytest.raises(ProjectionNeedsRebuild):
            await caught_up(runner, last)
    done = await admin.rebuild("stream_order")
    assert done.done == 24
    assert await store.pool.fetchval("SELECT count(*) FROM projection_partitions") == 3
    # The partitions were rebuilt side by side, each on a connection of its own.
    sessions = await store.pool.fetchval("SELECT count(DISTINCT r) FROM stream_order, unnest(runners) AS r")
    assert sessions == 3
    more = await _append(store, streams=6, versions=2)
    async with admin.runner() as runner:
        await caught_up(runner, more)
    assert await _versions(store) == {f"s-{s}": list(range(6)) for s in range(6)}


async def test_changing_the_partition_key_is_a_rebuild(store: EventStore) -> None:
    """Each partition's checkpoint says how far its key's events are applied: under another key the
    same partition holds other events, which would be applied twice or never."""
    last = await _append(store, streams=6, versions=4)
    async with ProjectionAdmin(store, [StreamOrder(partitions=4)]).runner() as runner:
        await caught_up(runner, last)
    admin = ProjectionAdmin(store, [StreamOrder(partitions=4, partition_key="data.account")])
    (status,) = await admin.status()
    assert status.state == "needs rebuild" and "data.account" in (status.needs_rebuild or "")
    async with admin.runner() as runner:
        with pytest.raises(ProjectionNeedsRebuild, match="partition key"):
            await caught_up(runner, last)
    assert (await admin.rebuild("stream_order")).done == 24
    assert await store.pool.fetchval("SELECT partition_key FROM projection_checkpoints") == "data.account"
    (status,) = await admin.status()
    assert status.needs_rebuild is None
    more = await _append(store, streams=6, versions=2)
    async with admin.runner() as runner:
        await caught_up(runner, more)
    assert await _versions(store) == {f"s-{s}": list(range(6)) for s in range(6)}
    (status,) = await ProjectionAdmin(store, [StreamOrder(partitions=4)]).status()
    assert "stream id" in (status.needs_rebuild or "")


async def test_a_failing_partition_stops_the_projection(store: EventStore) -> None:
    first = await store.append("s-0", [NewEvent("Moved")])
    admin = ProjectionAdmin(store, [StreamOrder(partitions=2)])
    async with admin.runner() as runner:
        await caught_up(runner, first.checkpoint)
        # A version that does not follow: the handler refuses it.
        await store.pool.execute(
            "UPDATE projection_stream_order_g1.stream_order SET versions = ARRAY[5] WHERE stream_id = 's-0'"
        )
        await store.append("s-0", [NewEvent("Moved")])
        await eventually(lambda: _failed(admin), what="the projection failed")


async def _failed(admin: ProjectionAdmin) -> bool:
    (status,) = await admin.status()
    return status.state == "failed" and "version 1 after 5" in (status.last_error or "")


def test_bad_partition_declarations_are_refused() -> None:
    with pytest.raises(InvalidProjection, match="partitions must be an int"):
        StreamOrder(partitions=0)
    with pytest.raises(InvalidProjection, match="partition_key"):
        StreamOrder(partitions=2, partition_key="account")
    with pytest.raises(InvalidProjection, match="inline"):
        StreamOrder(partitions=2, inline=True)


def _seen(version: int) -> Projection:
    class Seen(Projection):
        name = "seen"
        partitions = 4
        tables = {"seen": "CREATE TABLE seen (stream_id text NOT NULL, version int NOT NULL)"}

        @handles("Tick")
        async def tick(self, conn: Any, event: RecordedEvent) -> None:
            await conn.execute("INSERT INTO seen VALUES ($1, $2)", event.stream_id, event.stream_version)

    return Seen(version=version)


async def test_a_runner_of_the_old_version_takes_no_share_of_the_partitions_from_the_new_one(
    store: EventStore,
) -> None:
    """A rolling deploy: the runner of version 1 is still up after version 2 went live. It cannot run
    the projection, so it must not count in the fair share (the new runner took half and half stalled)."""
    streams = [f"t-{n}" for n in range(16)]
    for stream in streams:
        await store.append(stream, [NewEvent("Tick")])
    settings: dict[str, Any] = {"poll_interval": 0.2, "lease_interval": 0.1}
    async with ProjectionRunner(store, [_seen(1)], label="old", **settings) as old:
        async with asyncio.timeout(10):
            await old.wait_caught_up()
        await ProjectionAdmin(store, [_seen(2)]).rebuild("seen")
        async with ProjectionRunner(store, [_seen(2)], label="new", **settings) as new:
            for stream in streams:
                await store.append(stream, [NewEvent("Tick")])
            await caught_up(new, await store.last_committed(), seconds=10)
            assert len(new.owned) == 4
    rows = await store.pool.fetch("SELECT stream_id, array_agg(version ORDER BY version) AS v FROM seen GROUP BY 1")
    assert {r["stream_id"]: list(r["v"]) for r in rows} == {stream: [0, 1] for stream in streams}



def _gauges(name: str) -> list[tuple[int, str]]:
    """(lag, state) of `name` in every probe's sample, as a metrics scrape reads them (off the loop)."""
    lags = [o.value for o in telemetry._lag(None) if o.attributes == {"projection.name": name}]
    states = [
        str(o.attributes["projection.status"]) for o in telemetry._state(None)
        if o.attributes is not None and o.attributes["projection.name"] == name and o.value == 1
    ]
    return list(zip(lags, states, strict=True))


async def test_metrics_and_status_of_a_partitioned_projection_follow_its_partitions(store: EventStore) -> None:
    """Its own row keeps neither checkpoint nor runner: the partitions' rows do."""
    admin = ProjectionAdmin(store, [StreamOrder(partitions=3)])
    last = await _append(store, streams=6, versions=2)
    owner = object()
    telemetry.watch_projections(owner, store, ["stream_order"])
    try:
        async with admin.runner(label="metrics", lease_interval=0.1) as runner:
            await caught_up(runner, last)
            await eventually(lambda: _owns(runner, 3), what="the runner owns every partition")
            assert set(await asyncio.to_thread(_gauges, "stream_order")) == {(0, "running")}
            (status,) = await admin.status()
            assert (status.state, status.lag, status.runner) == ("running", 0, runner.identity)
        await eventually(
            lambda: _gauged(store, {(0, "stopped")}), what="the gauges show the projection stopped"
        )
        (status,) = await admin.status()
        assert (status.state, status.runner) == ("stopped", None)
        await _append(store, streams=2, versions=1, prefix="more")
        await eventually(lambda: _gauged(store, {(2, "stopped")}), what="the gauges show the lag")
    finally:
        telemetry.unwatch(owner)


async def _owns(runner: ProjectionRunner, count: int) -> bool:
    return len(runner.owned) == count


async def _gauged(store: EventStore, expected: set[tuple[int, str]]) -> bool:
    return set(await asyncio.to_thread(_gauges, "stream_order")) == expected


async def _sessions(store: EventStore) -> int:
    """Sessions of the runners of stream_order: a standing one per runner, and one per partition run."""
    return int(await store.pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE $1",
        "eventstore %stream_order%",
    ))


async def test_a_runner_holds_connections_only_for_the_partitions_it_runs(store: EventStore) -> None:
    admin = ProjectionAdmin(store, [StreamOrder(partitions=8)])
    last = await _append(store, streams=16, versions=2)
    options: dict[str, Any] = {"lease_interval": 0.1}
    async with admin.runner(**options) as one:
        await caught_up(one, last)
        await eventually(lambda: _owns(one, 8), what="a runner alone runs every partition")
        await eventually(lambda: _total(store, 8 + 1), what="a connection per partition, and one to be counted by")
        async with admin.runner(**options) as two:
            names = {partition_name("stream_order", p) for p in range(8)}
            await eventually(lambda: _split(one.owned, two.owned, names), what="both runners own partitions")
            await eventually(lambda: _total(store, 8 + 2), what="no connection for a partition another runner runs")
            more = await _append(store, streams=16, versions=1, prefix="more")
            await caught_up(two, more)
    assert await _sessions(store) == 0
    assert await _versions(store) == {
        **{f"s-{s}": list(range(2)) for s in range(16)}, **{f"more-{s}": [0] for s in range(16)}
    }


async def _total(store: EventStore, sessions: int) -> bool:
    return await _sessions(store) == sessions


async def test_a_runner_on_a_pool_too_small_for_it_is_refused(database_url: str) -> None:
    """On a pool, the connections a runner holds are the store's: taking them all would stall every append."""
    pool = await asyncpg.create_pool(asyncpg_dsn(database_url), min_size=1, max_size=10)
    try:
        async with EventStore(pool=pool) as store:
            with pytest.raises(InvalidArgument, match="10 connections"):
                await ProjectionRunner(store, [StreamOrder(partitions=9)]).start()
            assert await store.pool.fetchval("SELECT count(*) FROM projection_checkpoints") == 0
            last = await _append(store, streams=8, versions=2)
            async with ProjectionRunner(store, [StreamOrder(partitions=4)]) as runner:
                await caught_up(runner, last)
                more = await _append(store, streams=8, versions=1)
                await caught_up(runner, more)
            assert await _versions(store) == {f"s-{s}": list(range(3)) for s in range(8)}
    finally:
        await pool.close()
