"""Inline projections: written inside the append's transaction, so they commit or roll back with it."""

from __future__ import annotations

import pytest

from eventstore import EventStore, NewEvent, StreamState, WrongExpectedVersion
from projections import (
    InlineProjections,
    InvalidProjection,
    ProjectionFailed,
    ProjectionNeedsRebuild,
    ProjectionRunner,
    Projections,
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
        await Projections(store, [TotalsV2()]).rebuild("totals")
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
