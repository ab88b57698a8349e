"""`eventstore outbox status|retry-dead|prune` as an operator runs them (`relay` is in test_relay_processes)."""

from __future__ import annotations

import asyncio

import pytest

from eventstore import EventStore, NewEvent
from outbox import Outbox, Route
from tests.outbox.test_relay_processes import EVENTSTORE


async def cli(database_url: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        EVENTSTORE,
        "--database-url",
        database_url,
        "outbox",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_status_retry_dead_and_prune(store: EventStore, database_url: str) -> None:
    await Outbox([Route("orders")]).declare(store)
    await store.append("order-1", [NewEvent("OrderPlaced", {"n": n}) for n in range(6)])
    pool = store.pool
    await pool.execute(
        "UPDATE outbox SET published_at = now() - interval '2 hours'"
        " WHERE position IN (SELECT position FROM events WHERE stream_version < 3)"
    )
    dead_id = await pool.fetchval(
        "UPDATE outbox SET dead_at = now(), attempts = 5, last_error = 'MessageSizeTooLargeError: too big'"
        " WHERE position IN (SELECT position FROM events WHERE stream_version = 3) RETURNING id"
    )

    code, out, err = await cli(database_url, "status")
    assert code == 0, err
    assert "pending 2, published 3, dead 1" in out
    assert "MessageSizeTooLargeError" in out and "orders" in out

    code, out, err = await cli(database_url, "retry-dead", "--id", str(dead_id))
    assert code == 0, err
    assert f"1 dead message(s) put back in line: {dead_id}" in out
    row = await pool.fetchrow("SELECT dead_at, attempts, next_attempt_at FROM outbox WHERE id = $1", dead_id)
    assert row["dead_at"] is None and row["attempts"] == 0 and row["next_attempt_at"] is None

    code, out, _ = await cli(database_url, "retry-dead", "--topic", "orders")
    assert code == 0 and "no dead messages matched" in out

    code, out, err = await cli(database_url, "prune", "--older-than", "3600")
    assert code == 0, err
    assert "pruned 3 published message(s)" in out
    assert await pool.fetchval("SELECT count(*) FROM outbox") == 3


async def test_bad_arguments_are_one_clear_line(database_url: str) -> None:
    code, _, err = await cli(database_url, "prune", "--older-than", "-1")
    assert code == 2 and "must not be negative" in err and "Traceback" not in err
    code, _, err = await cli("postgresql://postgres@127.0.0.1:1/none", "status")
    assert code == 2 and "error" in err and "Traceback" not in err


async def test_bad_operator_input_is_a_typed_error_and_changes_nothing(store: EventStore) -> None:
    from eventstore import InvalidArgument
    from outbox import prune_published, retry_dead, status

    await Outbox([Route("orders")]).declare(store)
    await store.append("order-2", [NewEvent("OrderPlaced")])
    await store.pool.execute("UPDATE outbox SET dead_at = now(), attempts = 5, last_error = 'x'")
    calls = [
        retry_dead(store, ids=[2**63]),
        retry_dead(store, ids=[True]),
        retry_dead(store, ids="12"),
        retry_dead(store, topic=7),  # type: ignore[arg-type]
        retry_dead(store, topic="orders\ud800"),
        prune_published(store, "1h"),  # type: ignore[arg-type]
        prune_published(store, float("inf")),
        prune_published(store, 60, chunk=0),
        status(store, dead_limit=2**63),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            await call
    assert await store.pool.fetchval("SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL") == 1
