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
