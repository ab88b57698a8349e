"""A failing handler stops its projection at the failing event, with a clear status; the others go on."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from eventstore import Checkpoint, EventStore, NewEvent, RecordedEvent
from projections import Projection, ProjectionAdmin, ProjectionFailed, UnknownProjection
from tests.projections.app import Ledger, assert_ledger_exactly_once, caught_up, deposit, eventually, fill
from tests.projections.conftest import Cli


class Picky:
    """Records the position of every deposit; chokes on poisoned ones while `broken`."""

    def __init__(self) -> None:
        self.broken = True

    def check(self, event: RecordedEvent) -> None:
        if self.broken and event.json().get("poison"):
            raise ValueError(f"cannot digest {event.stream_id}\nsecond line of detail")

    async def one(self, conn: Any, event: RecordedEvent) -> None:
        self.check(event)
        await conn.execute("INSERT INTO picky_seen VALUES ($1)", event.position)

    async def many(self, conn: Any, events: list[RecordedEvent]) -> None:
        for event in events:
            self.check(event)
        await conn.executemany("INSERT INTO picky_seen VALUES ($1)", [(e.position,) for e in events])

    def projection(self, batch: bool) -> Projection:
        tables = {"picky_seen": "CREATE TABLE picky_seen (position bigint PRIMARY KEY)"}
        if batch:
            return Projection(name="picky", tables=tables, batch_handlers={"Deposited": self.many})
        return Projection(name="picky", tables=tables, handlers={"Deposited": self.one})


@pytest.mark.parametrize("batch", [True, False], ids=["batch-handler", "event-handler"])
async def test_failing_handler_stops_only_its_projection_until_resumed(
    store: EventStore, cli: Cli, capsys: pytest.CaptureFixture[str], batch: bool
) -> None:
    await fill(store, accounts=2, rounds=3)
    poisoned = await store.append("acc-0", [NewEvent("Deposited", {"account": "acc0", "amount": 1, "poison": True})])
    poison = poisoned.events[0]
    last = await fill(store, accounts=2, rounds=2, prefix="later")
    picky = Picky()
    projections = ProjectionAdmin(store, [Ledger(), picky.projection(batch)])
    async with projections.runner(batch_size=50, poll_interval=0.2) as runner:
        with pytest.raises(ProjectionFailed) as failed:
            await caught_up(runner, last)
        assert (failed.value.name, failed.value.event_id, failed.value.position) == (
            "picky", poison.event_id, poison.position,
        )

        async def ledger_done() -> bool:
            return {s.name: s for s in await projections.status()}["ledger"].checkpoint == last

        await eventually(ledger_done, what="the ledger projection catches up although picky failed")
        assert await assert_ledger_exactly_once(store) == 31

        status = {s.name: s for s in await projections.status()}["picky"]
        assert (status.state, status.status, status.active) == ("failed", "failed", True)
        assert (status.failed_event_id, status.failed_event_type, status.failed_position) == (
            poison.event_id, "Deposited", poison.position,
        )
        assert status.last_error == "ValueError: cannot digest acc-0"
        assert status.lag is not None and status.lag > 0
        # Everything before the poisoned event is applied, nothing after it.
        deposits_before = [
            e.position for e in await store.read_all(limit=1000, types=["Deposited"]) if e.position < poison.position
        ]
        seen = sorted(r[0] for r in await store.pool.fetch("SELECT position FROM picky_seen"))
        assert seen == deposits_before
        assert status.checkpoint is not None and status.checkpoint < Checkpoint(*poison.checkpoint)
        # The command line shows the same, and exits non-zero while a projection has failed.
        assert await cli("status") == 1
        out = " ".join(capsys.readouterr().out.split())
        assert f"failed at Deposited {poison.event_id} (position {poison.position})" in out
        assert "last error: ValueError: cannot digest acc-0" in out

        picky.broken = False
        assert await projections.resume("picky") is True
        await caught_up(runner, last)
    all_deposits = [e.position for e in await store.read_all(limit=1000, types=["Deposited"])]
    assert sorted(r[0] for r in await store.pool.fetch("SELECT position FROM picky_seen")) == all_deposits
    status = {s.name: s for s in await projections.status()}["picky"]
    assert (status.state, status.failed_event_id) == ("stopped", None)
    assert status.last_error == "ValueError: cannot digest acc-0"  # kept as the last error seen


async def test_resume_of_a_healthy_or_unknown_projection(store: EventStore) -> None:
    projections = ProjectionAdmin(store, [Ledger()])
    async with projections.runner() as runner:
        await runner.wait_caught_up()
    assert await projections.resume("ledger") is False
    with pytest.raises(UnknownProjection, match="unknown projection 'nope' \\(declared: ledger\\)"):
        await projections.resume("nope")


async def test_after_a_failed_batch_its_events_go_one_at_a_time_then_full_batches_again(store: EventStore) -> None:
    """A failed batch does not say which event failed, so its events are retried one per transaction.
    Once the runner has caught up the search is over: later events come in full batches again (the
    runner used to stay in one-event transactions for up to `batch_size` events after any failure)."""
    sizes: list[int] = []
    transient = [RuntimeError("the first try fails, whatever the events")]

    async def many(conn: Any, events: list[RecordedEvent]) -> None:
        if transient:
            raise transient.pop()
        sizes.append(len(events))
        await conn.executemany("INSERT INTO flaky_seen VALUES ($1)", [(e.position,) for e in events])

    flaky = Projection(
        name="flaky",
        tables={"flaky_seen": "CREATE TABLE flaky_seen (position bigint PRIMARY KEY)"},
        batch_handlers={"Deposited": many},
    )
    first = await fill(store, accounts=1, rounds=3)
    await store.wait_until_visible(first)  # all three in the first batch, whatever other databases do
    async with ProjectionAdmin(store, [flaky]).runner(batch_size=100, poll_interval=0.2) as runner:
        await caught_up(runner, first)
        assert sizes == [1, 1, 1]
        await asyncio.sleep(1.0)  # the runner looks again, finds nothing, and waits for events
        later = await store.append("acc-9", [deposit("acc9", n) for n in range(20)])
        await caught_up(runner, later.checkpoint)
    assert sizes == [1, 1, 1, 20]


async def test_bad_operator_input_is_a_typed_error(store: EventStore) -> None:
    """Values PostgreSQL cannot take (past a bigint, a NUL) are refused before any statement runs."""
    from eventstore import InvalidArgument
    from projections import ProjectionRunner

    projections = ProjectionAdmin(store, [Ledger()])
    for size in (0, 2**63, 1.5, True):
        with pytest.raises(InvalidArgument, match="batch_size"):
            ProjectionRunner(store, [Ledger()], batch_size=size)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="batch_size"):
            await projections.rebuild("ledger", batch_size=size)  # type: ignore[arg-type]
    for name in ("", "led\x00ger", "led\ud800ger", 7):
        with pytest.raises(InvalidArgument, match="projection name"):
            await projections.resume(name)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="projection name"):
            await projections.drop(name)  # type: ignore[arg-type]
    async with projections.runner() as runner:
        for until in ("x", (1,), (2**63, 0), (-1, 0)):
            with pytest.raises(InvalidArgument, match="checkpoint"):
                await runner.wait_caught_up(until)  # type: ignore[arg-type]
        await runner.wait_caught_up()
    assert [s.name for s in await projections.status()] == ["ledger"]


@pytest.mark.parametrize("interval", [0, -1, math.nan, math.inf, "1", None, True])
async def test_bad_intervals_are_typed_errors_that_change_nothing(store: EventStore, interval: Any) -> None:
    """A NaN interval would spin the event loop; the others fail later, half done, or never wait."""
    from eventstore import InvalidArgument
    from projections import ProjectionRunner

    projections = ProjectionAdmin(store, [Ledger()])
    for option in ("poll_interval", "lease_interval"):
        with pytest.raises(InvalidArgument, match=option):
            ProjectionRunner(store, [Ledger()], **{option: interval})
    if interval != 0:  # a progress_interval of 0 reports every batch
        with pytest.raises(InvalidArgument, match="progress_interval"):
            await projections.rebuild("ledger", progress_interval=interval, progress=lambda p: None)
    with pytest.raises(InvalidArgument, match="progress"):
        await projections.rebuild("ledger", progress="not callable")  # type: ignore[arg-type]
    assert await store.pool.fetchval("SELECT count(*) FROM projection_checkpoints") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projection_%'") == 0
    async with projections.runner() as runner:
        with pytest.raises(InvalidArgument, match="interval"):
            await runner.wait_caught_up(interval=interval)
        if interval != 0:  # a grace of 0 stops at once
            with pytest.raises(InvalidArgument, match="grace"):
                await runner.stop(grace=interval)
        await caught_up(runner, await store.last_committed())  # a refused call changed nothing


async def test_bad_names_and_declarations_are_typed_errors(store: EventStore) -> None:
    from eventstore import InvalidArgument
    from projections import InvalidProjection, ProjectionRunner

    projections = ProjectionAdmin(store, [Ledger()])
    for name in (["ledger"], {"a": 1}, None):
        with pytest.raises(InvalidArgument, match="projection name"):
            await projections.rebuild(name)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="projection name"):
            await projections.reset(name)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="projection name"):
            projections.get(name)  # type: ignore[arg-type]
    for declared in (["ledger"], "ledger", [Ledger(), None]):
        with pytest.raises(InvalidProjection, match="Projection"):
            ProjectionRunner(store, declared)  # type: ignore[arg-type]
    with pytest.raises(InvalidProjection, match="Projection"):
        ProjectionAdmin(store, "ledger")  # type: ignore[arg-type]
    assert await store.pool.fetchval("SELECT count(*) FROM projection_checkpoints") == 0


async def test_a_resumed_projection_goes_on_at_once(store: EventStore) -> None:
    """The runner of a failed projection waits for its poll interval (120 s here) or a NOTIFY: resuming
    sends one."""
    poisoned = await store.append("acc-0", [NewEvent("Deposited", {"account": "acc0", "amount": 1, "poison": True})])
    picky = Picky()
    projections = ProjectionAdmin(store, [picky.projection(batch=True)])
    async with projections.runner(poll_interval=120) as runner:
        with pytest.raises(ProjectionFailed):
            await caught_up(runner, poisoned.checkpoint)
        picky.broken = False
        assert await projections.resume("picky")
        await caught_up(runner, poisoned.checkpoint, seconds=10)
    assert await store.pool.fetchval("SELECT count(*) FROM picky_seen") == 1

