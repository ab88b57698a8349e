"""Stream lifecycle against the real PostgreSQL: archive and restore, tombstones, audited hard deletes,
retention, and the append-only triggers still in force for everyone else."""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
import pytest

from eventstore import (
    STREAM_DELETED,
    EventStore,
    InvalidArgument,
    NewEvent,
    RetentionRefused,
    StreamArchived,
    StreamNotFound,
    StreamTombstoned,
    asyncpg_dsn,
    lifecycle,
)
from eventstore.lifecycle import RetentionPolicy, deleted_stream
from outbox import Outbox, Route, prune_orphans
from outbox import status as outbox_status
from projections import Connection, Projection, ProjectionAdmin, handles


def _events(n: int) -> list[NewEvent]:
    return [NewEvent("Noted", {"n": i}) for i in range(n)]


async def test_an_archived_stream_is_hidden_and_comes_back_as_it_was(store: EventStore) -> None:
    await store.append("note-a", _events(3))
    await store.wait_until_visible((await store.append("note-b", _events(1))).checkpoint)
    before = await store.read_stream("note-a")
    assert await lifecycle.archive(store, "note-a") == 3
    assert await store.read_stream("note-a") == []
    assert {e.stream_id for e in await store.read_all()} == {"note-b"}
    assert (await lifecycle.status(store, "note-a")).archived_at is not None
    with pytest.raises(StreamArchived):
        await store.append("note-a", _events(1))
    assert await lifecycle.archive(store, "note-a") == 0  # archived already: nothing to do
    assert await lifecycle.restore(store, "note-a") == 3
    assert await store.read_stream("note-a") == before  # same positions, same log order
    await store.append("note-a", _events(1))
    assert await store.stream_version("note-a") == 3


async def test_a_tombstoned_stream_is_read_but_never_written(store: EventStore) -> None:
    await store.append("note-t", _events(2))
    await lifecycle.tombstone(store, "note-t")
    with pytest.raises(StreamTombstoned):
        await store.append("note-t", _events(1))
    async with store.unit_of_work() as uow:  # inside a unit of work too, and nothing of it is written
        await uow.append("note-other", _events(1))
        with pytest.raises(StreamTombstoned):
            await uow.append("note-t", _events(1))
    assert len(await store.read_stream("note-t")) == 2
    with pytest.raises(StreamTombstoned):
        await lifecycle.archive(store, "note-t")


async def test_bad_lifecycle_input_changes_nothing(store: EventStore) -> None:
    with pytest.raises(StreamNotFound):
        await lifecycle.archive(store, "note-missing")
    with pytest.raises(StreamNotFound):
        await lifecycle.tombstone(store, "note-missing")
    await store.append("note-k", _events(1))
    with pytest.raises(StreamNotFound):
        await lifecycle.delete(store, ["note-k", "note-missing"], "cleanup")
    with pytest.raises(InvalidArgument):
        await lifecycle.delete(store, ["note-k"], " ")
    with pytest.raises(InvalidArgument):
        await lifecycle.delete(store, ["note-k"], "nul\x00reason")
    with pytest.raises(InvalidArgument):
        await lifecycle.delete(store, "note-k", "cleanup")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        RetentionPolicy("note")
    with pytest.raises(InvalidArgument):
        RetentionPolicy("note", max_count=0)
    with pytest.raises(InvalidArgument):
        RetentionPolicy("$deleted", max_count=1)
    with pytest.raises(RetentionRefused):
        await lifecycle.retain(store, RetentionPolicy("note", max_age=timedelta(microseconds=1)))
    assert len(await store.read_stream("note-k")) == 1


async def test_the_append_only_triggers_hold_for_everyone_but_the_maintenance_function(
    store: EventStore, database_url: str
) -> None:
    await store.append("note-x", _events(1))
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("DELETE FROM events WHERE stream_id = 'note-x'")
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("UPDATE events SET data = '{}' WHERE stream_id = 'note-x'")
        with pytest.raises(asyncpg.InvalidParameterValueError):
            await conn.fetch("SELECT * FROM eventstore_maintenance('truncate', ARRAY['note-x'], 'x')")
        # The function leaves the caller's session as it found it: triggers on again afterwards.
        await conn.fetch("SELECT * FROM eventstore_maintenance('archive', ARRAY['nothing-here'], '')")
        assert await conn.fetchval("SHOW session_replication_role") == "origin"
    finally:
        await conn.close()
    assert len(await store.read_stream("note-x")) == 1


class NoteCounts(Projection):
    name = "note_counts"
    tables = {"note_counts": "CREATE TABLE note_counts (stream_id text PRIMARY KEY, n integer NOT NULL)"}

    @handles("Noted")
    async def noted(self, conn: Connection, event: object) -> None:
        await conn.execute(
            "INSERT INTO note_counts VALUES ($1, 1) ON CONFLICT (stream_id) DO UPDATE SET n = note_counts.n + 1",
            event.stream_id,  # type: ignore[attr-defined]
        )

    @handles(STREAM_DELETED)
    async def deleted(self, conn: Connection, event: object) -> None:
        await conn.execute("DELETE FROM note_counts WHERE stream_id = $1", event.json()["stream_id"])  # type: ignore[attr-defined]


async def test_a_hard_delete_is_recorded_and_projections_drop_the_stream(store: EventStore) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    await Outbox([Route(topic, category="note")]).declare(store)
    await store.append("note-gone", _events(3))
    await store.wait_until_visible((await store.append("note-kept", _events(2))).checkpoint)
    await store.save_snapshot("note-gone", "Note", "1", 2, '{"n": 3}')
    admin = ProjectionAdmin(store, [NoteCounts()])
    async with admin.runner() as runner:
        await runner.wait_caught_up()
        assert await store.pool.fetchval("SELECT count(*) FROM note_counts") == 2

        assert await lifecycle.delete(store, ["note-gone"], "customer asked") == {"note-gone": 3}
        await store.wait_until_visible((await store.read_stream(deleted_stream("note-gone")))[0].checkpoint)
        await runner.wait_caught_up()
    assert await store.pool.fetchval("SELECT array_agg(stream_id) FROM note_counts") == ["note-kept"]
    assert await store.read_stream("note-gone") == []
    assert await store.load_snapshot("note-gone") is None
    audit = await store.read_stream(deleted_stream("note-gone"))
    assert [e.event_type for e in audit] == [STREAM_DELETED]
    assert audit[0].json() == {"stream_id": "note-gone", "events": 3, "reason": "customer asked"}
    assert "by" in audit[0].meta()
    with pytest.raises(StreamTombstoned):  # a late writer cannot resurrect it
        await store.append("note-gone", _events(1))
    # Its pending outbox messages can never go out: pruned, while the kept stream's stay.
    assert (await outbox_status(store)).pending == 5
    assert await prune_orphans(store) == 3
    assert (await outbox_status(store)).pending == 2


async def test_retention_deletes_what_the_policy_no_longer_keeps(store: EventStore) -> None:
    for n in range(5):
        await store.append(f"cart-{n}", _events(1))
    await store.wait_until_visible((await store.append("order-1", _events(1))).checkpoint)
    # Two carts last written 40 days ago (written directly: the log is append-only, not time-travelling).
    async with store.pool.acquire() as conn:
        for name in ("cart-old1", "cart-old2"):
            await conn.execute("INSERT INTO streams (stream_id, version) VALUES ($1, 0)", name)
            await conn.execute(
                "INSERT INTO events (log_xid, stream_id, stream_version, event_id, event_type, data, recorded_at)"
                " VALUES (1, $1, 0, $2, 'Noted', '{}', now() - interval '40 days')",
                name, uuid.uuid4(),
            )
    dry = await lifecycle.retain(store, RetentionPolicy("cart", max_age=timedelta(days=30)), dry_run=True)
    assert sorted(dry.expired) == ["cart-old1", "cart-old2"] and dry.streams == 7
    assert len(await store.read_stream("cart-old1")) == 1  # a dry run deletes nothing

    aged = await lifecycle.retain(store, RetentionPolicy("cart", max_age=timedelta(days=30)))
    assert sorted(aged.expired) == ["cart-old1", "cart-old2"] and aged.deleted_events == 2
    counted = await lifecycle.retain(store, RetentionPolicy("cart", max_count=3))
    assert sorted(counted.expired) == ["cart-0", "cart-1"]  # the oldest two of five
    assert sorted({e.stream_id for e in await store.read_all() if e.category == "cart"}) == [
        "cart-2", "cart-3", "cart-4"
    ]
    assert len(await store.read_stream("order-1")) == 1  # other categories untouched
    everything = RetentionPolicy("cart", max_age=timedelta(microseconds=1))
    with pytest.raises(RetentionRefused):
        await lifecycle.retain(store, everything)
    assert (await lifecycle.retain(store, everything, allow_all=True)).deleted_events == 3


async def test_archived_and_deleted_tagged_events_leave_the_decisions_that_read_them(store: EventStore) -> None:
    """The tag index goes with an archived or deleted stream's events (and comes back with a restore): a
    decision must neither miss live events behind a page of archived ones nor fail on events gone."""
    from eventstore import START, Query

    query = Query.of(tags=["course:7"])
    await store.append("course-7", [NewEvent("CourseDefined", {"capacity": 1}, tags=["course:7"])])
    await store.append("term-2025", [NewEvent("Subscribed", {"n": i}, tags=["course:7"]) for i in range(5)])
    await store.append("term-2026", [NewEvent("Subscribed", {"n": 9}, tags=["course:7"])])
    await lifecycle.archive(store, "term-2025")
    page = await store.read_query(query, limit=2)
    assert [e.stream_id for e in page] == ["course-7", "term-2026"], "a page is not cut short by archived events"
    events, condition = await store.read_with_condition(query, page=2)
    assert [e.stream_id for e in events] == ["course-7", "term-2026"]
    await lifecycle.delete(store, ["term-2026"], reason="test")
    events, condition = await store.read_with_condition(query)
    assert [e.stream_id for e in events] == ["course-7"]
    await store.append("term-2027", [NewEvent("Subscribed", {"n": 10}, tags=["course:7"])], condition=condition)
    await lifecycle.restore(store, "term-2025")
    restored = await store.read_query(query, START)
    assert sorted(e.stream_id for e in restored) == ["course-7"] + ["term-2025"] * 5 + ["term-2027"]


async def test_an_archive_drops_the_streams_snapshot(store: EventStore) -> None:
    await store.append("cart-1", _events(3))
    await store.save_snapshot("cart-1", "Cart", "1", 2, '{"items": 3}')
    await lifecycle.archive(store, "cart-1")
    assert await store.pool.fetchval("SELECT count(*) FROM snapshots WHERE stream_id = 'cart-1'") == 0


async def test_restoring_a_stream_whose_event_id_was_reused_is_a_typed_error(store: EventStore) -> None:
    first = (await store.append("ticket-1", [NewEvent("Opened")])).events[0]
    await lifecycle.archive(store, "ticket-1")
    await store.append("ticket-2", [NewEvent("Other", event_id=first.event_id)])
    with pytest.raises(InvalidArgument, match="reuses one of its event ids"):
        await lifecycle.restore(store, "ticket-1")


async def test_archiving_the_newest_events_leaves_checkpoints_of_earlier_reads_valid(store: EventStore) -> None:
    from eventstore import Query

    await store.append("other-1", [NewEvent("Other")])
    await store.append("ticket-9", [NewEvent("Opened", tags=["ticket:9"])])
    after = await store.head()
    await lifecycle.archive(store, "ticket-9")  # the newest event leaves the log
    query = Query.of(tags=["ticket:1"])
    result = await store.append("ticket-1", [NewEvent("Opened", tags=["ticket:1"])], condition=(query, after))
    assert result.next_expected_version == 0
