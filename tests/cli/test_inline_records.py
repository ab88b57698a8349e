"""Deletion and erasure records reach inline projections: in the library (a store with them attached
applies the `$StreamDeleted` record in the deletion's transaction) and from the CLI (`--app`)."""

from __future__ import annotations

import asyncio

import pytest

from eventstore import AppendRefused, EventStore, NewEvent, lifecycle
from eventstore.lifecycle import RetentionPolicy
from projections import InlineProjections
from tests.cli.inline_app import KEY, Tickets
from tests.cli.test_store_cli import eventstore


async def _owners(store: EventStore) -> dict[str, str | None]:
    return {r["stream_id"]: r["owner"] for r in await store.pool.fetch("SELECT * FROM tickets")}


async def test_a_store_with_the_inline_projection_attached_deletes_and_retains(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store, InlineProjections(store, [Tickets()]):
        for n in range(3):
            await store.append(f"ticket-{n}", [NewEvent("Opened", {"owner": f"o{n}"})])
        assert await lifecycle.delete(store, ["ticket-0"], "spam") == {"ticket-0": 1}
        assert set(await _owners(store)) == {"ticket-1", "ticket-2"}
        result = await lifecycle.retain(store, RetentionPolicy("ticket", max_count=1))
        assert result.expired == ["ticket-1"]
        assert set(await _owners(store)) == {"ticket-2"}


async def test_without_it_a_deletion_is_refused_with_a_typed_error_and_changes_nothing(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store, InlineProjections(store, [Tickets()]):
        await store.append("ticket-1", [NewEvent("Opened", {"owner": "ann"})])
    async with EventStore(database_url, keys=KEY) as bare:
        with pytest.raises(AppendRefused, match="tickets_inline"):
            await lifecycle.delete(bare, ["ticket-1"], "spam")
        assert await bare.stream_version("ticket-1") == 0


async def test_the_cli_deletes_and_forgets_through_the_application_s_inline_projections(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store, InlineProjections(store, [Tickets()]):
        await store.append("ticket-1", [NewEvent("Opened", {"owner": "ann"}, personal_data={"owner": "ann"})])
        await store.append("ticket-2", [NewEvent("Opened", {"owner": "bob"})])
    app = ("--app", "tests.cli.inline_app:APP")
    refused = await asyncio.to_thread(eventstore, "--database-url", database_url, "personal", "forget", "ann")
    assert refused.returncode == 2 and "tickets_inline" in refused.stderr
    forgot = await asyncio.to_thread(eventstore, "--database-url", database_url, "personal", "forget", "ann", *app)
    assert forgot.returncode == 0, forgot.stderr
    deleted = await asyncio.to_thread(
        eventstore, "--database-url", database_url, "streams", "delete", "ticket-2", "--reason", "spam", *app
    )
    assert deleted.returncode == 0, deleted.stderr
    async with EventStore(database_url, keys=KEY) as store:
        assert await _owners(store) == {"ticket-1": None}
