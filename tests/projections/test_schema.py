"""The projections' tables in a migrated database are exactly their SQLAlchemy definitions."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from eventstore import EventStore, asyncpg_dsn
from eventstore_app.migrate import _sqlalchemy_url, alembic_config
from projections import ProjectionAdmin
from projections.schema import metadata, projection_checkpoints, projection_rebuilds
from tests.projections.app import Ledger

OURS = {projection_checkpoints.name, projection_rebuilds.name}


def _ours(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    if type_ == "table":
        return name in OURS
    table = getattr(obj, "table", None)
    return table is None or table.name in OURS


async def _differences(url: str) -> list[Any]:
    engine = create_async_engine(_sqlalchemy_url(url))
    try:
        async with engine.connect() as conn:

            def compare(sync: Any) -> list[Any]:
                context = MigrationContext.configure(
                    sync, opts={"compare_type": True, "compare_server_default": True, "include_object": _ours}
                )
                return list(compare_metadata(context, metadata))

            return await conn.run_sync(compare)
    finally:
        await engine.dispose()


async def test_migrated_tables_match_the_metadata(database_url: str) -> None:
    assert await _differences(database_url) == []


async def test_the_checks_of_the_tables_hold(database_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        checks = {
            r["conname"]
            for r in await conn.fetch(
                "SELECT conname FROM pg_constraint WHERE conrelid = 'projection_checkpoints'::regclass"
            )
        }
        assert {"projection_checkpoints_status", "projection_checkpoints_mode"} <= checks
        with pytest.raises(asyncpg.exceptions.CheckViolationError):
            await conn.execute(
                "INSERT INTO projection_checkpoints (name, mode, version, generation, tables, status) "
                "VALUES ('x', 'async', 1, 1, '{}', 'dancing')"
            )
    finally:
        await conn.close()


async def test_downgrade_drops_tables_and_generations_and_upgrade_restores(database_url: str) -> None:
    async with EventStore(database_url) as store, ProjectionAdmin(store, [Ledger()]).runner():
        pass  # starting creates the checkpoint row and the first generation's schema
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = 'projection_ledger_g1'") == 1
        config = alembic_config(database_url)
        await asyncio.to_thread(command.downgrade, config, "projections@0001")
        assert await conn.fetchval("SELECT to_regclass('projection_checkpoints')") is None
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'projection%'") == 0
        assert await conn.fetchval("SELECT to_regclass('events')") is not None
        await asyncio.to_thread(command.upgrade, config, "heads")
        assert await _differences(database_url) == []
    finally:
        await conn.close()
