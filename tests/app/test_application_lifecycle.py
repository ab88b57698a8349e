"""The application object starts and stops without leaving connections behind, whatever goes wrong."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from aggregates import Aggregate, AggregateError, EventRegistrationError
from eventstore import EventStore, InvalidArgument, SchemaNotMigrated, asyncpg_dsn
from eventstore_app import Application
from tests.aggregates.domain import Account, AccountState
from tests.conftest import with_database


async def _sessions(server_url: str, database: str) -> int:
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        for _ in range(50):  # a closed connection's backend ends a moment later
            count = int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = $1", database))
            if count == 0:
                return 0
            await asyncio.sleep(0.1)
        return count
    finally:
        await admin.close()


def _database(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


async def test_starting_a_started_application_is_a_typed_error_and_leaks_nothing(
    database_url: str, server_url: str
) -> None:
    app = Application("bank", aggregates=[Account], database_url=database_url)
    await app.start()
    with pytest.raises(InvalidArgument, match="started already"):
        await app.start()
    await app.stop()
    assert await _sessions(server_url, _database(database_url)) == 0


async def test_a_start_on_an_unmigrated_database_leaves_no_connection(server_url: str) -> None:
    name = f"es_unmigrated_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        app = Application("bank", aggregates=[Account], database_url=with_database(server_url, name))
        with pytest.raises(SchemaNotMigrated):
            await app.start()
        await app.stop()
        assert await _sessions(server_url, name) == 0
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_stopping_while_commands_run_leaves_no_connection(database_url: str, server_url: str) -> None:
    app = Application("bank", aggregates=[Account], database_url=database_url)
    await app.start()
    store: EventStore = app.store
    accounts = app.repository(Account)
    await accounts.execute("1", lambda a: a.open("ann"), create=True)

    async def worker() -> None:
        while True:
            await accounts.execute("1", lambda a: a.deposit(1), retries=1000)

    tasks = [asyncio.create_task(worker()) for _ in range(8)]
    await asyncio.sleep(0.5)
    await app.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.sleep(0.3)
    assert store._notifier is None or store._notifier.is_closed()
    assert await _sessions(server_url, _database(database_url)) == 0


class _NoCategory(Aggregate[AccountState]):
    pass


async def test_odd_arguments_get_typed_errors(database_url: str) -> None:
    for retention in (None, 5):
        with pytest.raises(InvalidArgument, match="retention"):
            Application("bank", aggregates=[Account], retention=retention)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="declares no category"):
        Application("bank", aggregates=[_NoCategory])
    async with Application("bank", aggregates=[Account], database_url=database_url) as app:
        for odd in ("Account", None):
            with pytest.raises(InvalidArgument, match="is not an aggregate"):
                app.repository(odd)  # type: ignore[arg-type]
        accounts = app.repository(Account)
        with pytest.raises(AggregateError):
            await accounts.save("1")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="metadata must be a mapping"):
            await accounts.execute("1", lambda a: a.open("ann"), create=True, metadata="x")  # type: ignore[arg-type]
        assert await app.store.stream_version("account-1") == -1


async def test_concurrent_starts_let_one_win_and_leak_nothing(database_url: str, server_url: str) -> None:
    app = Application("bank", aggregates=[Account], database_url=database_url)
    results = await asyncio.gather(app.start(), app.start(), return_exceptions=True)
    assert results.count(None) == 1
    (refused,) = [r for r in results if r is not None]
    assert isinstance(refused, InvalidArgument) and "started already" in str(refused)
    await app.repository(Account).execute("1", lambda a: a.open("ann"), create=True)
    await app.stop()
    assert await _sessions(server_url, _database(database_url)) == 0
    await app.start()  # and it starts again after a stop
    await app.stop()


class _Ledger(Aggregate[AccountState], category="account"):
    pass


def test_aggregates_sharing_a_category_or_taking_a_reserved_one_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="both have category 'account'"):
        Application("bank", aggregates=[Account, _Ledger])
    with pytest.raises(EventRegistrationError, match=r"'\$'"):

        class _Deleted(Aggregate[AccountState], category="$deleted"):
            pass

    assert Application("bank", aggregates=[Account, Account]).aggregates == (Account, Account)


async def test_append_lanes_reach_the_store(database_url: str) -> None:
    from eventstore import NewEvent
    from eventstore_app import ApplicationSettings

    for lanes in (0, 1):
        settings = ApplicationSettings(append_lanes=lanes)
        app = Application("bank", aggregates=[Account], database_url=database_url, settings=settings)
        await app.start()
        try:
            await asyncio.gather(*(app.store.append(f"l{lanes}-{i}", [NewEvent("X")]) for i in range(20)))
            assert (app.store._batch_counts["sent"] > 0) == (lanes > 0)
        finally:
            await app.stop()
