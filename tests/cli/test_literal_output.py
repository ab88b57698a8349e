"""The CLI prints stream ids, event types and error texts as they are (no rich markup or emoji codes read
from them), and refuses bad arguments in one line before it changes or starts anything."""

from __future__ import annotations

import asyncio
import socket
import uuid

import asyncpg

from eventstore import EventStore, NewEvent, asyncpg_dsn, lifecycle
from tests.cli.test_store_cli import eventstore
from tests.conftest import with_database


async def test_markup_in_stream_ids_types_and_errors_is_printed_literally(database_url: str) -> None:
    async with EventStore(database_url) as store:
        await store.append("order-[red]1", [NewEvent("T[/]")])
        await store.append("order-[link=http://evil.example]2", [NewEvent("Placed")])
        await store.append("mk2-[/y]", [NewEvent("Noted")])
    listing = await asyncio.to_thread(eventstore, "--database-url", database_url, "streams", "list")
    assert listing.returncode == 0, listing.stderr
    assert "order-[red]1" in listing.stdout and "order-[link=http://evil.example]2" in listing.stdout
    shown = await asyncio.to_thread(eventstore, "--database-url", database_url, "streams", "show", "order-[red]1")
    assert shown.returncode == 0, shown.stderr
    assert "T[/]" in shown.stdout
    archived = await asyncio.to_thread(eventstore, "--database-url", database_url, "streams", "archive", "mk2-[/y]")
    assert archived.returncode == 0, archived.stderr
    assert "mk2-[/y]" in archived.stdout and "Traceback" not in archived.stderr
    async with EventStore(database_url) as store:
        assert (await lifecycle.status(store, "mk2-[/y]")).archived_at is not None
    unknown = await asyncio.to_thread(
        eventstore, "--database-url", database_url, "personal", "forget", "[/s]:thumbs_up:"
    )
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "[/s]:thumbs_up:" in unknown.stderr


async def test_bad_arguments_are_one_line_errors(server_url: str, database_url: str) -> None:
    overflow = await asyncio.to_thread(
        eventstore, "--database-url", "postgresql://postgres@127.0.0.1:99999/x", "streams", "list"
    )
    assert overflow.returncode == 2 and "Traceback" not in overflow.stderr
    assert "99999" in overflow.stderr
    negative = await asyncio.to_thread(eventstore, "--database-url", database_url, "events", "tail", "--count", "-1")
    assert negative.returncode == 2 and "--count" in negative.stderr


async def test_the_console_refuses_a_database_it_cannot_use(server_url: str) -> None:
    name = f"es_cli_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        unmigrated = with_database(server_url, name)
        for url in (unmigrated, with_database(server_url, f"{name}_missing")):
            out = await asyncio.to_thread(eventstore, "--database-url", url, "admin", "--port", "0", timeout=60)
            assert out.returncode == 2, out.stderr
            assert "Traceback" not in out.stderr and "admin console on" not in out.stdout
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_the_console_refuses_a_port_in_use(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = await asyncio.to_thread(
            eventstore, "--database-url", database_url, "admin", "--port", str(port), timeout=60
        )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and f"port {port}" in out.stderr
