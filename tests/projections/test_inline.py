"""Inline projections: written inside the append's transaction, so they commit or roll back with it."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from typing import Any

import pytest

from eventstore import AppendRefused, EventStore, NewEvent, RecordedEvent, StreamState, WrongExpectedVersion
from projections import (
    InlineProjections,
    InvalidProjection,
    Projection,
    ProjectionAdmin,
    ProjectionFailed,
    ProjectionNeedsRebuild,
    ProjectionRunner,
    UnknownProjection,
    handles,
)
from tests.projections.app import Ledger, Totals, balances, deposit, withdraw


async def test_read_model_commits_and_rolls_back_with_the_append(store: EventStore) -> None:
    async with InlineProjections(store, [Totals()]):
        await store.append("acc-1", [deposit("a1", 50), withdraw("a1", 8)])
        assert await balances(store) == {"a1": 42}  # no runner: already there when append returns

        async with store.unit_of_work() as uow:
            path = await uow.connection.fetchval("SELECT current_setting('search_path')")
            await uow.append("acc-2", [deposit("a2", 5)])
            assert await uow.connection.fetchval("SELECT current_setting('search_path')") == path
            assert await uow.connection.fetchval("SELECT balance FROM account_totals WHERE account = 'a2'") == 5

        with pytest.raises(RuntimeError):
            async with store.unit_of_work() as uow:
                await uow.append("acc-1", [deposit("a1", 1000)])
                raise RuntimeError("the application changed its mind")
        with pytest.raises(WrongExpectedVersion):
            async with store.unit_of_work() as uow:
                await uow.append("acc-1", [deposit("a1", 1000)])
                await uow.append("acc-2", [deposit("a2", 1000)], StreamState.NO_STREAM)
        await store.append("other-1", [NewEvent("Opened")])
    assert await balances(store) == {"a1": 42, "a2": 5}


async def test_failing_inline_handler_fails_the_append_and_writes_nothing(store: EventStore) -> None:
    async with InlineProjections(store, [Totals()]):
        await store.append("acc-1", [deposit("a1", 10)])
        with pytest.raises(ProjectionFailed, match=r"projection 'totals' failed at event Deposited .*negative amounts"):
            await store.append("acc-1", [deposit("a1", 5), deposit("a1", -1)])
    assert await store.stream_version("acc-1") == 0
    assert await balances(store) == {"a1": 10}


async def test_a_failing_inline_handler_in_a_unit_of_work_takes_back_only_its_own_append(store: EventStore) -> None:
    """The application catches the failure and goes on: what commits is what the read model holds, the
    append that failed is not in the log, and the unit of work's other appends are."""
    async with InlineProjections(store, [Totals()]), store.unit_of_work() as uow:
        await uow.append("acc-a", [deposit("a", 10)])
        with pytest.raises(ProjectionFailed):
            await uow.append("acc-b", [deposit("b", 5), deposit("b", -1)])  # Totals refuses the -1
        await uow.append("acc-c", [deposit("c", 3)])
    stored = [e.json() for e in await store.read_all(types=["Deposited"])]
    assert [(d["account"], d["amount"]) for d in stored] == [("a", 10), ("c", 3)]
    assert await balances(store) == {"a": 10, "c": 3}


async def test_attaching_fills_the_tables_from_the_existing_log(store: EventStore) -> None:
    await store.append("acc-1", [deposit("a1", 7), deposit("a1", 3)])
    await store.append("acc-2", [deposit("a2", 1)])
    async with InlineProjections(store, [Totals()]):
        assert await balances(store) == {"a1": 10, "a2": 1}
        await store.append("acc-2", [withdraw("a2", 1)])
    assert await balances(store) == {"a1": 10, "a2": 0}


async def test_a_changed_declaration_needs_a_rebuild_first(store: EventStore, database_url: str) -> None:
    class TotalsV2(Totals):
        version = 2

    async with EventStore(database_url) as old_process:
        await InlineProjections(old_process, [Totals()]).start()
        await old_process.append("acc-1", [deposit("a1", 7)])
        with pytest.raises(ProjectionNeedsRebuild, match="built by version 1, declared version is 2"):
            await InlineProjections(store, [TotalsV2()]).start()
        await ProjectionAdmin(store, [TotalsV2()]).rebuild("totals")
        async with InlineProjections(store, [TotalsV2()]):
            await store.append("acc-1", [deposit("a1", 1)])
        # A process still on the old declaration may not write into the new tables: its appends fail.
        with pytest.raises(ProjectionNeedsRebuild):
            await old_process.append("acc-1", [deposit("a1", 1000)])
    assert await balances(store) == {"a1": 8}
    assert await store.stream_version("acc-1") == 1


def test_inline_and_async_projections_are_kept_apart(store: EventStore) -> None:
    with pytest.raises(InvalidProjection, match="'totals' is inline: attach it with InlineProjections"):
        ProjectionRunner(store, [Totals()])
    with pytest.raises(InvalidProjection, match="'ledger' is not inline: run it with a ProjectionRunner"):
        InlineProjections(store, [Ledger()])


async def test_a_process_without_the_projection_cannot_append_what_it_handles(
    store: EventStore, database_url: str
) -> None:
    """The guard in the database: a script that imported only the event store is refused, writing nothing,
    instead of leaving the read model silently behind; events the projection does not handle still go."""
    async with InlineProjections(store, [Totals()]):
        await store.append("acc-1", [deposit("a1", 10)])
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from eventstore import AppendRefused, EventStore, NewEvent

        async def main():
            async with EventStore({database_url!r}) as store:
                try:
                    await store.append("acc-1", [NewEvent("Deposited", {{"account": "a1", "amount": 5}})])
                except AppendRefused as refused:
                    print("refused:", refused.reason)
                else:
                    sys.exit("appended around the inline projection")
                await store.append("other-1", [NewEvent("Opened")])
            assert not any(name.startswith(("projections", "outbox", "aggregates")) for name in sys.modules)

        asyncio.run(main())
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert "inline projection totals" in stdout.decode()
    assert await store.stream_version("acc-1") == 0
    assert await store.stream_version("other-1") == 0
    assert await balances(store) == {"a1": 10}


async def test_the_guard_holds_in_units_of_work_and_after_detaching(store: EventStore, database_url: str) -> None:
    inline = InlineProjections(store, [Totals()])
    async with EventStore(database_url) as bare:
        async with inline:
            async with store.unit_of_work() as uow:  # several appends, one transaction: all applied
                await uow.append("acc-1", [deposit("a1", 3)])
                await uow.append("acc-2", [deposit("a2", 4)])
            with pytest.raises(AppendRefused, match="inline projection totals"):
                async with bare.unit_of_work() as uow:  # refused at commit, with everything else in it
                    await uow.append("other-1", [NewEvent("Opened")])
                    await uow.append("acc-1", [deposit("a1", 100)])
            assert await bare.stream_version("other-1") == -1
        with pytest.raises(AppendRefused):  # detached: this process no longer keeps the read model
            await store.append("acc-1", [deposit("a1", 1)])
    assert await balances(store) == {"a1": 3, "a2": 4}
    assert await store.stream_version("acc-1") == 0


async def test_dropping_an_inline_projection_removes_its_guard(store: EventStore) -> None:
    async with InlineProjections(store, [Totals()]):
        await store.append("acc-1", [deposit("a1", 3)])
    with pytest.raises(AppendRefused):
        await store.append("acc-1", [deposit("a1", 1)])
    await ProjectionAdmin(store, []).drop("totals")
    await store.append("acc-1", [deposit("a1", 1)])
    assert await store.pool.fetchval("SELECT to_regclass('account_totals')") is None
    assert [s.name for s in await ProjectionAdmin(store, []).status()] == []
    with pytest.raises(UnknownProjection):
        await ProjectionAdmin(store, []).drop("totals")


async def test_a_rebuild_moves_the_guard_to_the_new_declaration(store: EventStore) -> None:
    class WithdrawalsOnly(Projection):
        name = "totals"
        inline = True
        version = 2
        tables = {"account_totals": "CREATE TABLE account_totals (account text PRIMARY KEY, balance bigint NOT NULL)"}

        @handles("Withdrawn")
        async def withdrawn(self, conn: Any, event: RecordedEvent) -> None:
            await conn.execute("INSERT INTO account_totals VALUES ($1, 0) ON CONFLICT DO NOTHING", event.stream_id)

    async with InlineProjections(store, [Totals()]):
        await store.append("acc-1", [deposit("a1", 3)])
    await ProjectionAdmin(store, [WithdrawalsOnly()]).rebuild("totals")
    await store.append("acc-1", [deposit("a1", 1)])  # no longer guarded
    with pytest.raises(AppendRefused):
        await store.append("acc-1", [withdraw("a1", 1)])


class CourseRoster(Projection):
    """A read model of one course only: it selects the events by tag."""

    name = "course_7_roster"
    tables = {"course_7_roster": "CREATE TABLE course_7_roster (student text PRIMARY KEY)"}
    tags = ("course:7",)
    inline = True

    @handles("StudentSubscribed")
    async def subscribed(self, conn: Any, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO course_7_roster VALUES ($1)", event.json()["student"])


async def test_a_projection_selects_events_by_tag(store: EventStore) -> None:
    async with InlineProjections(store, [CourseRoster()]):
        for student, course in [("ann", 7), ("bob", 8), ("cy", 7)]:
            await store.append(f"subscription-{student}-{course}", [NewEvent(
                "StudentSubscribed", {"student": student}, tags=[f"course:{course}", f"student:{student}"]
            )])
        rows = await store.pool.fetch("SELECT student FROM course_7_roster ORDER BY student")
    assert [r["student"] for r in rows] == ["ann", "cy"]
    with pytest.raises(InvalidProjection):
        Projection(name="p", tables={"t": "CREATE TABLE t ()"}, handlers={"A": CourseRoster().subscribed}, tags="x")
