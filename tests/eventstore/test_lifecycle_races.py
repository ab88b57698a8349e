"""Stream lifecycle and erasure against writers that commit while they wait: transactions held open
across an archive, a delete, a retention run or a `forget`, on the real PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import orjson
import pytest

from eventstore import (
    SUBJECT_FORGOTTEN,
    AppendConditionFailed,
    EventStore,
    EventTooLarge,
    InvalidArgument,
    MasterKey,
    NewEvent,
    Query,
    StreamState,
    SubjectForgotten,
    asyncpg_dsn,
    lifecycle,
    personal,
    sql,
)
from eventstore.lifecycle import RetentionPolicy, deleted_stream
from eventstore.store import erasure_stream

KEY = MasterKey(b"k" * 32)


async def _still_waiting(task: asyncio.Task[object]) -> None:
    await asyncio.sleep(0.3)
    assert not task.done(), "it should wait for the open transaction"


async def _count(store: EventStore, query: str, *args: object) -> int:
    value = await store.pool.fetchval(query, *args)
    assert isinstance(value, int)
    return value


@pytest.mark.parametrize("action", ["archive", "delete"])
async def test_an_append_committing_while_an_archive_or_delete_waits_is_counted_and_leaves_no_tags(
    store: EventStore, action: str
) -> None:
    await store.append("course-1", [NewEvent("Defined", tags=["course:1"])])
    async with store.unit_of_work() as uow:
        await uow.append("course-1", [NewEvent("Booked", tags=["course:1"]) for _ in range(2)])
        if action == "archive":
            task = asyncio.ensure_future(lifecycle.archive(store, "course-1"))
        else:
            task = asyncio.ensure_future(lifecycle.delete(store, ["course-1"], "test"))
        await _still_waiting(task)
    outcome = await asyncio.wait_for(task, 10)
    moved = outcome if isinstance(outcome, int) else outcome["course-1"]
    assert moved == 3  # the first read of the stream was made before the lock: 1
    assert await _count(store, "SELECT count(*) FROM event_tags") == 0
    if action == "delete":
        (audit,) = await store.read_stream(deleted_stream("course-1"), direction="forwards")
        assert audit.json()["events"] == 3
    # A decision on the tag reads a full page of what the log has, not a page cut short by stale index rows.
    await store.append("course-2", [NewEvent("Booked", tags=["course:1"]) for _ in range(3)])
    events, _ = await store.read_with_condition(Query.of(tags=["course:1"]), page=2)
    assert [e.stream_id for e in events] == ["course-2"] * 3


async def test_a_snapshot_saved_while_an_archive_waits_goes_with_the_archive(store: EventStore) -> None:
    await store.append("note-1", [NewEvent("Noted")])
    async with store.unit_of_work() as uow:
        await uow.save_snapshot("note-1", "Note", "1", 0, '{"n": 1}')
        task = asyncio.ensure_future(lifecycle.archive(store, "note-1"))
        await _still_waiting(task)
    assert await asyncio.wait_for(task, 10) == 1
    assert await store.load_snapshot("note-1") is None
    await store.save_snapshot("note-1", "Note", "1", 0, '{"n": 2}')  # an archived stream takes none
    assert await store.load_snapshot("note-1") is None
    await lifecycle.restore(store, "note-1")
    await store.save_snapshot("note-1", "Note", "1", 0, '{"n": 3}')
    snapshot = await store.load_snapshot("note-1")
    assert snapshot is not None and snapshot.data == '{"n": 3}'


async def test_forget_drops_the_snapshots_of_archived_streams_too(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        await store.append("member-1", [NewEvent("Registered", {"email": "ann@x"}, personal_data={"email": "ann"})])
        await lifecycle.archive(store, "member-1")
        # A snapshot that reached the archived stream (written before this version refused them).
        await store.pool.execute(
            "INSERT INTO snapshots (stream_id, snapshot_type, schema_version, stream_version, data) "
            "VALUES ('member-1', 'Member', '1', 0, '{\"email\": \"ann@x\"}')"
        )
        erasure = await store.forget("ann")
        assert erasure.snapshots_dropped == 1
        assert await _count(store, "SELECT count(*) FROM snapshots") == 0


async def test_an_append_of_personal_data_holds_off_a_forget_until_it_commits(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        await store.append("member-1", [NewEvent("Registered", {"email": "a@x"}, personal_data={"email": "ann"})])
        async with store.unit_of_work() as uow:
            await uow.append("member-1", [NewEvent("Changed", {"email": "b@x"}, personal_data={"email": "ann"})])
            task = asyncio.ensure_future(store.forget("ann"))
            await _still_waiting(task)
        assert (await asyncio.wait_for(task, 10)).forgotten_now
        assert [e.json()["email"] for e in await store.read_stream("member-1")] == ["[redacted]"] * 2


async def test_an_append_waiting_for_a_forget_is_refused_and_writes_nothing(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        await store.append("member-1", [NewEvent("Registered", {"email": "a@x"}, personal_data={"email": "ann"})])
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with conn.transaction():  # a forget under way: the subject held, its key row locked, then gone
                await conn.execute(sql.FORGET_LOCK, "ann")
                await conn.execute(sql.LOCK_SUBJECT, "ann")
                await conn.execute(sql.FORGET_SUBJECT, "ann")
                task = asyncio.ensure_future(
                    store.append("member-1", [NewEvent("Changed", {"email": "b@x"}, personal_data={"email": "ann"})])
                )
                await _still_waiting(task)
        finally:
            await conn.close()
        with pytest.raises(SubjectForgotten):
            await asyncio.wait_for(task, 10)
        assert await store.stream_version("member-1") == 0


async def test_a_refused_personal_append_creates_no_subject_keys(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        await store.append("member-1", [NewEvent("Registered", {"email": "a@x"}, personal_data={"email": "ann"})])
        await store.forget("ann")
        both = NewEvent("Pair", {"a": "x", "b": "y"}, personal_data={"a": "ann", "b": "carol"})
        with pytest.raises(SubjectForgotten):
            await store.append("pair-1", [both])
        with pytest.raises(InvalidArgument, match="not in its data"):
            await store.append("pair-1", [NewEvent("Pair", {"a": "x"}, personal_data={"b": "dave"})])
        with pytest.raises(InvalidArgument, match="JSON object"):
            await store.append("pair-1", [NewEvent("Pair", [1], personal_data={"b": "erin"})])
        assert await store.pool.fetchval("SELECT array_agg(subject) FROM subject_keys") == ["ann"]


async def test_a_subject_id_too_long_for_the_prefix_is_forgotten_in_a_hashed_erasure_stream(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        longest = "s" * 255
        await store.append("member-1", [NewEvent("R", {"email": "a@x"}, personal_data={"email": longest})])
        assert (await store.forget(longest)).forgotten_now
        (record,) = await store.read_all(types=[SUBJECT_FORGOTTEN])
        assert record.stream_id.startswith("$personal#") and record.json() == {"subject": longest}
        assert erasure_stream("ann") == "$personal-ann"
        with pytest.raises(InvalidArgument, match="at most 255"):
            await store.append("member-2", [NewEvent("R", {"email": "a@x"}, personal_data={"email": "s" * 256})])
        assert await store.stream_version("member-2") == -1


async def test_retention_keeps_a_stream_written_while_it_waited(store: EventStore) -> None:
    await store.append("ticket-old", [NewEvent("Opened")])
    await store.append("ticket-new", [NewEvent("Opened")])
    async with store.unit_of_work() as uow:  # listed as the older of two (the write is not committed yet)
        await uow.append("ticket-old", [NewEvent("Important")])
        task = asyncio.ensure_future(lifecycle.retain(store, RetentionPolicy("ticket", max_count=1)))
        await _still_waiting(task)
    result = await asyncio.wait_for(task, 10)
    assert result.expired == [] and result.deleted_events == 0
    assert await store.stream_version("ticket-old") == 1
    assert (await lifecycle.retain(store, RetentionPolicy("ticket", max_count=1))).expired == ["ticket-new"]


async def test_a_stream_id_too_long_for_the_prefix_is_deleted_with_a_hashed_record(store: EventStore) -> None:
    longest = "t-" + "x" * 253
    await store.append(longest, [NewEvent("Opened")])
    assert await lifecycle.delete(store, [longest], "test") == {longest: 1}
    record = deleted_stream(longest)
    assert record.startswith("$deleted#") and len(record) <= 255
    (audit,) = await store.read_stream(record, direction="forwards")
    assert audit.json()["stream_id"] == longest
    assert deleted_stream("t-1") == "$deleted-t-1"


async def test_the_store_s_own_streams_and_odd_arguments_are_refused(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        await store.append("ticket-1", [NewEvent("Opened")])
        await lifecycle.delete(store, ["ticket-1"], "test")
        await store.append("member-1", [NewEvent("R", {"email": "a@x"}, personal_data={"email": "ann"})])
        await store.forget("ann")
        for own in ("$deleted-ticket-1", "$personal-ann"):
            with pytest.raises(InvalidArgument, match="own records"):
                await lifecycle.archive(store, own)
            with pytest.raises(InvalidArgument, match="own records"):
                await lifecycle.tombstone(store, own)
        for bad in (None, 5):
            with pytest.raises(InvalidArgument, match="sequence of stream ids"):
                await lifecycle.delete(store, bad, "test")  # type: ignore[arg-type]
        for category in ("a\x00b", "a\ud800", "c" * 256):
            with pytest.raises(InvalidArgument):
                RetentionPolicy(category, max_count=1)


async def test_the_size_limit_holds_for_the_sealed_event_and_a_refusal_creates_no_key(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY, max_event_size=1_300) as store:
        fits = NewEvent("Note", {"text": "x" * 1_000, "n": 1})
        await store.append("note-1", [fits])  # 1,000 characters in clear; sealed they take 1,376
        sealed = NewEvent("Note", {"text": "x" * 1_000, "n": 1}, personal_data={"text": "ann"})
        with pytest.raises(EventTooLarge):
            await store.append("note-2", [sealed])
        assert await store.stream_version("note-2") == -1
        assert await _count(store, "SELECT count(*) FROM subject_keys") == 0


@pytest.mark.parametrize("value", ["", "a", "ab", "abc", "é" * 50, 12345, None, [1, {"k": "v"}], "x" * 1000])
def test_the_size_of_a_sealed_field_is_known_before_sealing(value: object) -> None:
    sealed = personal._encrypt(b"k" * 32, b"aad", orjson.dumps(value))
    assert len(personal._sealed_stand_in(value)) == len(sealed)


async def test_a_plain_append_of_personal_data_beside_decisions_is_never_taken_for_overtaken(database_url: str) -> None:
    """Holding the subjects must not give the append's transaction an id before its append: the append
    function would then take a decision committed meanwhile for one that overtook a unit of work."""
    async with EventStore(database_url, keys=KEY, max_connections=20) as store:
        query = Query.of(["Booked"], ["course:1"])
        plain = decided = 0

        async def writer(n: int) -> None:
            nonlocal plain
            event = NewEvent("Booked", {"name": f"n{n}"}, tags=["course:1"], personal_data={"name": f"s{n % 5}"})
            await store.append(f"p-{n}", [event])  # no condition, no unit of work: never AppendConditionFailed
            plain += 1

        async def decider(n: int) -> None:
            nonlocal decided
            _, condition = await store.read_with_condition(query)
            try:
                await store.append(f"d-{n}", [NewEvent("Booked", tags=["course:1"])], condition=condition)
                decided += 1
            except AppendConditionFailed:
                pass

        for round_ in range(15):
            numbers = range(round_ * 10, round_ * 10 + 6)
            await asyncio.gather(*(writer(n) for n in numbers), *(decider(n) for n in numbers))
        assert plain == 90 and decided > 0


@pytest.mark.parametrize("kind", ["condition", "expected version"])
async def test_a_retry_that_waited_for_its_own_first_attempt_is_that_append(store: EventStore, kind: str) -> None:
    """A caller's retry after a lost connection, while the first attempt still ran on the server: it finds
    the first attempt's events once it has the locks, and they are its own (not a conflict)."""
    query = Query.of(tags=["seat:1"])
    events = [NewEvent("Booked", {"seat": 1}, tags=["seat:1"])]
    _, condition = await store.read_with_condition(query)
    options: dict[str, object] = (
        {"condition": condition} if kind == "condition" else {"expected_version": StreamState.NO_STREAM}
    )
    async with store.unit_of_work() as uow:
        first = await uow.append("seat-1", events, **options)  # type: ignore[arg-type]
        retry = asyncio.ensure_future(store.append("seat-1", events, **options))  # type: ignore[arg-type]
        await _still_waiting(retry)
    again = await asyncio.wait_for(retry, 10)
    assert again.duplicate and again.checkpoint == first.checkpoint
    assert len(await store.read_stream("seat-1")) == 1
