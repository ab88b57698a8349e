"""Alembic environment: target metadata is the SQLAlchemy Core tables of every component."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from eventstore_migrations import target_metadata as all_tables

config = context.config
target_metadata = all_tables()


MIGRATION_LOCK = 0x4553_4D49_4752_4154
"""An advisory lock: migrations started at once (every replica running `eventstore migrate` as it starts)
run one after the other, and the later ones find the schema at head, instead of failing on objects the
first one is creating."""


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        connection.execute(text(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


def run() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    assert url is not None
    asyncio.run(_run_async(url))


run()
