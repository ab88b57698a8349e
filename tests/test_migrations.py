"""The migrated database matches the SQLAlchemy Core metadata of every component (no drift)."""

from __future__ import annotations

import asyncpg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from eventstore import asyncpg_dsn
from eventstore_app.migrate import _sqlalchemy_url
from eventstore_migrations import target_metadata

metadata = target_metadata()  # the same tables migrations/env.py compares against


def _sync_url(url: str) -> str:
    return _sqlalchemy_url(url).replace("postgresql+asyncpg://", "postgresql+psycopg://", 1)


def _drift(url: str) -> list[object]:
    engine = create_engine(_sync_url(url))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "compare_server_default": True,
                    "include_object": lambda obj, name, kind, reflected, compare_to: kind != "table"
                    or name in metadata.tables,
                },
            )
            diff: list[object] = compare_metadata(context, metadata)
            return diff
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(_sync_url(url))
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def test_migrated_schema_has_no_drift(database_url: str) -> None:
    assert _drift(database_url) == [], "migrations and metadata differ"
    assert set(metadata.tables) <= _tables(database_url)


async def test_drift_check_sees_a_changed_database(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await conn.execute("DROP INDEX events_category_log_idx")
        await conn.execute("ALTER TABLE snapshots ADD COLUMN stray integer")
    finally:
        await conn.close()
    diff = _drift(database_url)
    assert any("events_category_log_idx" in repr(d) for d in diff)
    assert any("stray" in repr(d) for d in diff)


def test_migrations_are_one_linear_history_per_component() -> None:
    from alembic.script import ScriptDirectory

    from eventstore_app.migrate import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config("postgresql://unused/unused"))
    heads = scripts.get_heads()
    assert heads, "no migration heads"
    for head in heads:
        revisions = list(scripts.iterate_revisions(head, "base"))
        assert revisions[-1].revision == "0001"


def test_downgrade_to_base_and_upgrade_again(database_url: str) -> None:
    from alembic import command

    from eventstore_app.migrate import alembic_config, migrate

    command.downgrade(alembic_config(database_url), "base")
    assert not set(metadata.tables) & _tables(database_url)
    migrate(database_url)
    assert _drift(database_url) == []


def test_a_round_trip_below_the_tag_index_rebuilds_it(database_url: str) -> None:
    import asyncio

    from alembic import command

    from eventstore import EventStore, NewEvent, Query
    from eventstore_app.migrate import alembic_config, migrate

    async def append() -> None:
        async with EventStore(database_url) as store:
            await store.append("account-1", [NewEvent("Registered", tags=["name:ann"])])

    async def tagged() -> int:
        async with EventStore(database_url) as store:
            return len(await store.read_query(Query.of(tags=["name:ann"])))

    async def legacy() -> None:  # metadata of before `tags` was reserved: anything may be under it
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await conn.execute(
                "SELECT * FROM eventstore_append('legacy-1', -2, ARRAY[gen_random_uuid()], ARRAY['Legacy'],"
                " ARRAY['{}'::jsonb], ARRAY['{\"tags\": [\"name:ann\", null, 5, \"\", {\"a\": 1}]}'::jsonb])"
            )
        finally:
            await conn.close()

    asyncio.run(append())
    command.downgrade(alembic_config(database_url), "0008")
    asyncio.run(legacy())
    migrate(database_url)
    assert asyncio.run(tagged()) == 2  # the index was rebuilt from the events' metadata, valid tags only


def test_a_downgrade_below_the_lifecycle_refuses_to_drop_what_it_keeps(database_url: str) -> None:
    import asyncio

    import pytest
    from alembic import command

    from eventstore import EventStore, NewEvent, lifecycle
    from eventstore_app.migrate import alembic_config

    async def archive() -> None:
        async with EventStore(database_url) as store:
            await store.append("ticket-1", [NewEvent("Opened")])
            await lifecycle.archive(store, "ticket-1")

    asyncio.run(archive())
    with pytest.raises(RuntimeError, match="cannot downgrade below 0011"):
        command.downgrade(alembic_config(database_url), "0010")
    assert "events_archive" in _tables(database_url)


def test_migrations_started_at_once_run_one_after_the_other(server_url: str) -> None:
    import subprocess
    import sys
    import uuid

    from tests.conftest import with_database

    name = f"es_mig_{uuid.uuid4().hex[:10]}"

    async def admin(statement: str) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(server_url))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    import asyncio

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        url = with_database(server_url, name)
        runs = [
            subprocess.Popen(
                [sys.executable, "-m", "eventstore_cli", "--database-url", url, "migrate"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for _ in range(3)
        ]
        results = [(run.wait(timeout=120), run.stderr.read() if run.stderr else "") for run in runs]
        assert [code for code, _ in results] == [0, 0, 0], results
        assert _drift(url) == []
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
