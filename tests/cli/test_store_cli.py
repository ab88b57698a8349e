"""`eventstore migrate | streams | events tail`, and clear one-line errors instead of tracebacks."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import asyncpg

from eventstore import EventStore, NewEvent, asyncpg_dsn
from tests.conftest import with_database


def eventstore(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EVENTSTORE_DATABASE_URL"}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "eventstore_cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


async def test_migrate_a_fresh_database_then_use_it(server_url: str) -> None:
    name = f"es_cli_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        not_migrated = await asyncio.to_thread(eventstore, "--database-url", url, "streams", "list")
        assert not_migrated.returncode == 2
        assert "eventstore migrate" in not_migrated.stderr and "Traceback" not in not_migrated.stderr

        done = await asyncio.to_thread(eventstore, "--database-url", url, "migrate")
        assert done.returncode == 0, done.stderr
        again = await asyncio.to_thread(eventstore, "--database-url", url, "migrate")
        assert again.returncode == 0, again.stderr

        async with EventStore(url) as store:
            await store.append("order-1", [NewEvent("Placed", {"total": 5}), NewEvent("Paid")])
            await store.append("cart-1", [NewEvent("Opened")])
        listing = await asyncio.to_thread(eventstore, "--database-url", url, "streams", "list")
        assert listing.returncode == 0
        assert "order-1" in listing.stdout and "cart-1" in listing.stdout
        only_orders = await asyncio.to_thread(
            eventstore, "--database-url", url, "streams", "list", "--category", "order"
        )
        assert "order-1" in only_orders.stdout and "cart-1" not in only_orders.stdout
        shown = await asyncio.to_thread(eventstore, "--database-url", url, "streams", "show", "order-1")
        assert shown.returncode == 0 and "Placed" in shown.stdout and "Paid" in shown.stdout
        missing = await asyncio.to_thread(eventstore, "--database-url", url, "streams", "show", "order-404")
        assert missing.returncode == 2 and "not found" in missing.stderr
        tail = await asyncio.to_thread(
            eventstore, "--database-url", url, "events", "tail", "--from-start", "--count", "3"
        )
        assert tail.returncode == 0, tail.stderr
        assert [line.split()[2] for line in tail.stdout.splitlines()] == ["Placed", "Paid", "Opened"]
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_events_tail_follows_new_events(database_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eventstore_cli", "--database-url", database_url, "events", "tail", "--count", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with EventStore(database_url) as store:
            # The tail starts at the head: keep appending until the process has subscribed and seen one.
            async with asyncio.timeout(60):
                while process.returncode is None:
                    await store.append("live-1", [NewEvent("Live")])
                    try:
                        await asyncio.wait_for(process.wait(), 0.5)
                    except TimeoutError:
                        continue
        out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, err
    assert "live-1" in out.decode() and "Live" in out.decode()


def test_wrong_urls_are_one_line_errors() -> None:
    for url in ("postgresql://postgres@127.0.0.1:1/nowhere", "postgresql://postgres@127.0.0.1:5432/es_no_such_db"):
        result = eventstore("--database-url", url, "streams", "list", timeout=60)
        assert result.returncode == 2, result
        assert result.stderr.startswith("error:")
        assert "Traceback" not in result.stderr
    result = eventstore("--database-url", "not a url", "streams", "list")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_no_database_configured_is_a_clear_error() -> None:
    result = eventstore("streams", "list")
    assert result.returncode == 2
    assert "EVENTSTORE_DATABASE_URL" in result.stderr


def test_migrate_errors_are_one_line() -> None:
    for url in ("postgresql://postgres@127.0.0.1:1/nowhere", "postgresql://postgres@127.0.0.1:5432/es_no_such_db",
                "not a url"):
        result = eventstore("--database-url", url, "migrate")
        assert result.returncode == 2, result
        assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
