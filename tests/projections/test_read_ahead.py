"""A runner catching up reads its next batch while it applies the current one: nothing may change for that."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from eventstore import EventStore, NewEvent, RecordedEvent
from projections import Projection, ProjectionRunner, handles
from projections.generations import ReadAhead


class AppliedOrder(Projection):
    """Every applied event with the order it was applied in: doubles, gaps and reorderings all show."""

    name = "applied_order"
    tables = {
        "applied_order": (
            "CREATE TABLE applied_order (seq bigserial PRIMARY KEY, stream_id text NOT NULL, version int NOT NULL)"
        )
    }

    @handles("Step", batch=True)
    async def step(self, conn: Any, events: list[RecordedEvent]) -> None:
        await conn.executemany(
            "INSERT INTO applied_order (stream_id, version) VALUES ($1, $2)",
            [(e.stream_id, e.stream_version) for e in events],
        )


@pytest.fixture
def takes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, bool]]:
    """For each batch: whether a read-ahead was waiting, and whether the batch used it (a spy on the real object)."""
    taken: list[tuple[bool, bool]] = []
    take = ReadAhead.take

    async def spy(self: ReadAhead, *args: Any) -> Any:
        waiting = self._task is not None
        result = await take(self, *args)
        taken.append((waiting, result is not None))
        return result

    monkeypatch.setattr(ReadAhead, "take", spy)
    return taken


async def test_catching_up_beside_writers_and_held_back_commits_applies_each_event_once_in_order(
    store: EventStore, takes: list[tuple[bool, bool]]
) -> None:
    streams = [f"step-{s}" for s in range(8)]
    for stream in streams:
        await store.append(stream, [NewEvent("Step") for _ in range(40)])
    stop = asyncio.Event()
    rng = random.Random(7)

    async def writer() -> None:
        while not stop.is_set():
            await store.append(rng.choice(streams), [NewEvent("Step") for _ in range(rng.randint(1, 4))])
            await asyncio.sleep(0.002)

    async def slow() -> None:
        # Transactions held open across other commits: the log holds those back until they end.
        while not stop.is_set():
            async with store.unit_of_work() as uow:
                await uow.append(rng.choice(streams), [NewEvent("Step"), NewEvent("Step")])
                await asyncio.sleep(0.15)

    async with ProjectionRunner(store, [AppliedOrder()], batch_size=5, poll_interval=0.1) as runner:
        tasks = [asyncio.create_task(writer()), asyncio.create_task(writer()), asyncio.create_task(slow())]
        await asyncio.sleep(2.0)
        stop.set()
        await asyncio.gather(*tasks)
        async with asyncio.timeout(60):
            await runner.wait_caught_up()

    rows = await store.pool.fetch("SELECT stream_id, version FROM applied_order ORDER BY seq")
    applied: dict[str, list[int]] = {}
    for row in rows:
        applied.setdefault(row["stream_id"], []).append(row["version"])
    for stream in streams:
        stored = [e.stream_version for e in await store.read_stream(stream)]
        assert applied[stream] == stored, f"{stream}: applied in another order, twice, or not at all"
    assert sum(used for _, used in takes) > 10, "batches used what was read ahead"


async def test_a_batch_that_fails_drops_what_was_read_ahead_for_it(
    store: EventStore, takes: list[tuple[bool, bool]]
) -> None:
    """A failed batch is retried one event at a time: the read-ahead was for a batch that never committed."""

    class FailsOnce(AppliedOrder):
        failed = False

        @handles("Step", batch=True)
        async def step(self, conn: Any, events: list[RecordedEvent]) -> None:
            if not FailsOnce.failed and any(e.stream_version == 12 for e in events):
                FailsOnce.failed = True
                raise RuntimeError("once")
            await super().step(conn, events)

    await store.append("step-1", [NewEvent("Step") for _ in range(30)])
    async with ProjectionRunner(store, [FailsOnce()], batch_size=5, poll_interval=0.1) as runner:
        async with asyncio.timeout(30):
            await runner.wait_caught_up()
    assert FailsOnce.failed
    rows = await store.pool.fetch("SELECT version FROM applied_order ORDER BY seq")
    assert [r["version"] for r in rows] == list(range(30)), "each event once, in order"
    assert (True, False) in takes, "a read-ahead was waiting and not used (the one for the failed batch)"
    assert (True, True) in takes


class Gate(Projection):
    """Holds its handler on event 2 until released: a full batch in flight, its read-ahead done."""

    name = "gate"
    tables = {"gate_seen": "CREATE TABLE gate_seen (n bigint NOT NULL)"}

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    @handles("Tick")
    async def tick(self, conn: Any, event: RecordedEvent) -> None:
        n = event.json()["n"]
        await conn.execute("INSERT INTO gate_seen VALUES ($1)", n)
        if n == 2:
            self.entered.set()
            await self.release.wait()


@pytest.mark.parametrize("held_back", [False, True])
async def test_an_event_committed_while_the_last_full_batch_runs_is_applied_without_waiting_for_the_poll(
    store: EventStore, held_back: bool
) -> None:
    """The read-ahead of the next batch comes back short before the event is visible; the event's NOTIFY
    is spent on the batch in flight. The next batch must not take the stale read-ahead (poll: 120 s)."""
    gate = Gate()
    await store.append("t-1", [NewEvent("Tick", {"n": 1}), NewEvent("Tick", {"n": 2})])
    async with ProjectionRunner(store, [gate], batch_size=2, poll_interval=120) as runner:
        await asyncio.wait_for(gate.entered.wait(), 10)  # batch 1 (full) in its handler, reading ahead
        async with store.pool.acquire() as old:
            transaction = old.transaction()
            if held_back:
                await transaction.start()
                await old.fetchval("SELECT pg_current_xact_id()")  # holds the log's visibility line
            result = await store.append("t-2", [NewEvent("Tick", {"n": 3})])
            await asyncio.sleep(0.5)  # the read-ahead is long done: it saw nothing
            if held_back:
                await transaction.rollback()  # ends without a NOTIFY
        gate.release.set()
        async with asyncio.timeout(10):
            await runner.wait_caught_up(result.checkpoint)
    assert sorted(await store.pool.fetch("SELECT n FROM gate_seen")) == [(1,), (2,), (3,)]

