"""Tags, queries by type and tag, and conditional appends: the store's part of dynamic consistency boundaries."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from eventstore import (
    MAX_TAG_LENGTH,
    START,
    AppendConditionFailed,
    Checkpoint,
    EventStore,
    InvalidAppend,
    InvalidArgument,
    NewEvent,
    Query,
    QueryItem,
    StreamState,
    WrongExpectedVersion,
)


def fresh(prefix: str = "d") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def test_reads_select_by_type_and_tag_in_log_order(store: EventStore) -> None:
    await store.append(fresh(), [NewEvent("CourseDefined", {"c": 1}, tags=["course:1"])])
    await store.append(fresh(), [NewEvent("Subscribed", {"s": 1}, tags=["course:1", "student:1"])])
    await store.append(fresh(), [NewEvent("Subscribed", {"s": 2}, tags=["course:2", "student:1"])])
    await store.append(fresh(), [NewEvent("Untagged", {"x": 1})])
    last = await store.append(fresh(), [NewEvent("Subscribed", {"s": 3}, tags=["course:1", "student:2"])])
    await store.wait_until_visible(last.checkpoint)

    events = await store.read_query(Query.of(tags=["course:1"]))
    assert [(e.event_type, e.json()) for e in events] == [
        ("CourseDefined", {"c": 1}), ("Subscribed", {"s": 1}), ("Subscribed", {"s": 3})
    ]
    events = await store.read_query(Query.of(["Subscribed"], ["course:1", "student:2"]))
    assert [e.json() for e in events] == [{"s": 3}]
    assert events[0].tags == ("course:1", "student:2")
    # Items are OR'd; an event matching two items comes once.
    events = await store.read_query(
        Query(QueryItem(["Subscribed"], ["student:1"]), QueryItem(tags=["course:1"]), QueryItem(["Untagged"]))
    )
    assert [e.json() for e in events] == [{"c": 1}, {"s": 1}, {"s": 2}, {"x": 1}, {"s": 3}]
    checkpoints = [e.checkpoint for e in events]
    assert checkpoints == sorted(checkpoints)
    # Paging from a checkpoint gives the same events.
    paged, after = [], START
    while page := await store.read_query(Query.of(tags=["course:1"]) | Query.of(["Untagged"]), after, limit=1):
        paged.extend(page)
        after = page[-1].checkpoint
    assert [e.json() for e in paged] == [{"c": 1}, {"s": 1}, {"x": 1}, {"s": 3}]


async def test_a_condition_fails_on_a_matching_event_after_the_checkpoint(store: EventStore) -> None:
    query = Query.of(["Registered"], ["username:ann"])
    assert await store.read_query(query) == []
    await store.append(fresh(), [NewEvent("Registered", tags=["username:ann"])], condition=(query, START))
    with pytest.raises(AppendConditionFailed):
        await store.append(fresh(), [NewEvent("Registered", tags=["username:ann"])], condition=(query, START))
    # Another tag does not match; a checkpoint past the matching event passes.
    bob = Query.of(["Registered"], ["username:bob"])
    await store.append(fresh(), [NewEvent("Registered", tags=["username:bob"])], condition=(bob, START))
    written = await store.append(fresh(), [NewEvent("Other", tags=["username:ann"])])  # another type
    await store.wait_until_visible(written.checkpoint)
    seen = await store.read_query(query)
    assert len(seen) == 1
    await store.append(fresh(), [NewEvent("Renamed", tags=["username:ann"])], condition=(query, seen[-1].checkpoint))


async def test_a_condition_sees_committed_events_that_readers_cannot_see_yet(store: EventStore) -> None:
    """An old transaction still open holds the log's horizon back; the check looks past it."""
    query = Query.of(["Registered"], ["username:cy"])
    assert store.url is not None
    blocker = await asyncpg.connect(store.url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT pg_current_xact_id()")  # an old transaction id, running
        written = await store.append(fresh(), [NewEvent("Registered", tags=["username:cy"])])
        assert await store.read_query(query) == []  # committed, but not visible in the log yet
        with pytest.raises(AppendConditionFailed):
            await store.append(fresh(), [NewEvent("Registered", tags=["username:cy"])], condition=(query, START))
    finally:
        await blocker.close()
    await store.wait_until_visible(written.checkpoint)
    assert len(await store.read_query(query)) == 1


async def test_a_check_waits_for_an_open_writer_of_a_matching_event_and_then_sees_it(store: EventStore) -> None:
    query = Query.of(["Registered"], ["username:dee"])
    async with store.unit_of_work() as uow:
        await uow.append(fresh(), [NewEvent("Registered", tags=["username:dee"])], condition=(query, START))
        racing = asyncio.create_task(
            store.append(fresh(), [NewEvent("Registered", tags=["username:dee"])], condition=(query, START))
        )
        await asyncio.sleep(0.1)
        assert not racing.done(), "an overlapping conditional append waits for the open one"
    with pytest.raises(AppendConditionFailed):
        await racing
    events, _ = await store.read_with_condition(query)
    assert len(events) == 1


async def test_a_decision_reads_what_is_committed_beyond_the_horizon_and_appends_on_it(store: EventStore) -> None:
    """With the horizon held back, `read_with_condition` sees a commit that `read_query` does not show yet; its
    condition lets that event through (it was read) and stops one committed after the read."""
    query = Query.of(["Booked"], ["room:1"])
    assert store.url is not None
    blocker = await asyncpg.connect(store.url)
    try:
        await blocker.execute("BEGIN")
        await blocker.execute("SELECT pg_current_xact_id()")
        await store.append(fresh(), [NewEvent("Booked", {"n": 1}, tags=["room:1"])])
        assert await store.read_query(query) == []
        events, condition = await store.read_with_condition(query)
        assert [e.json() for e in events] == [{"n": 1}]
        assert condition.seen == (events[0].position,)
        await store.append(fresh(), [NewEvent("Booked", {"n": 2}, tags=["room:1"])], condition=condition)
        with pytest.raises(AppendConditionFailed):  # the same decision again: it did not read n=2
            await store.append(fresh(), [NewEvent("Booked", {"n": 3}, tags=["room:1"])], condition=condition)
    finally:
        await blocker.close()
    events, _ = await store.read_with_condition(query)
    assert [e.json() for e in events] == [{"n": 1}, {"n": 2}]


async def test_appends_whose_queries_cannot_overlap_do_not_wait(store: EventStore) -> None:
    async with store.unit_of_work() as uow:
        await uow.append(
            fresh(), [NewEvent("Subscribed", tags=["course:a", "student:a"])],
            condition=(Query.of(["Subscribed"], ["course:a"]) | Query.of(["Subscribed"], ["student:a"]), START),
        )
        # Another course and student, the same type: no shared key is held exclusively.
        await asyncio.wait_for(store.append(
            fresh(), [NewEvent("Subscribed", tags=["course:b", "student:b"])],
            condition=(Query.of(["Subscribed"], ["course:b"]) | Query.of(["Subscribed"], ["student:b"]), START),
        ), 5)
        # A plain writer of another tag, and a reader of the held one, do not wait either.
        await asyncio.wait_for(store.append(fresh(), [NewEvent("Subscribed", tags=["course:c"])]), 5)
        await asyncio.wait_for(store.read_query(Query.of(tags=["course:a"])), 5)


async def test_a_type_only_condition_waits_for_every_writer_of_the_type(store: EventStore) -> None:
    query = Query.of(["InvoiceCreated"])
    async with store.unit_of_work() as uow:
        await uow.append(fresh(), [NewEvent("InvoiceCreated", {"n": 1}, tags=["invoice:1"])])
        checking = asyncio.create_task(
            store.append(fresh(), [NewEvent("InvoiceCreated", {"n": 1})], condition=(query, START))
        )
        await asyncio.sleep(0.1)
        assert not checking.done()
    with pytest.raises(AppendConditionFailed):
        await checking


async def test_streams_and_conditions_mix_in_one_unit_of_work(store: EventStore) -> None:
    stream = fresh("account")
    await store.append(stream, [NewEvent("Opened")])
    query = Query.of(tags=["account:1"])
    with pytest.raises(WrongExpectedVersion):
        async with store.unit_of_work() as uow:
            await uow.append(fresh(), [NewEvent("Tagged", tags=["account:1"])], condition=(query, START))
            await uow.append(stream, [NewEvent("Moved")], StreamState.NO_STREAM)
    assert await store.read_query(query) == []  # rolled back with the stream append
    async with store.unit_of_work() as uow:
        await uow.append(stream, [NewEvent("Moved")], 0)
        result = await uow.append(stream, [NewEvent("Tagged", tags=["account:1"])], 1, condition=(query, START))
        assert await uow.read_query(query) == []  # the log shows no running transaction, not even its own
    assert result.next_expected_version == 2
    await store.wait_until_visible(result.checkpoint)
    assert [e.event_type for e in await store.read_query(query)] == ["Tagged"]
    assert [e.event_type for e in await store.read_stream(stream)] == ["Opened", "Moved", "Tagged"]


async def test_a_unit_of_work_that_wrote_first_is_not_overtaken_in_the_log(store: EventStore) -> None:
    """A transaction with an early id whose tagged event a concurrent check could not see refuses to commit it
    behind that check's events."""
    query = Query.of(["Closed"], ["course:z"])
    with pytest.raises(AppendConditionFailed, match="while this transaction was open"):
        async with store.unit_of_work() as uow:
            await uow.append(fresh(), [NewEvent("Audit")])  # this transaction now has its id
            # A younger decision checks course:z, finds nothing, and commits.
            await store.append(fresh(), [NewEvent("Subscribed", tags=["course:z"])], condition=(query, START))
            await uow.append(fresh(), [NewEvent("Closed", tags=["course:z"])])
    assert await store.read_query(query) == []


async def test_a_retried_append_is_idempotent_despite_its_condition(store: EventStore) -> None:
    query = Query.of(tags=["order:1"])
    events = [NewEvent("Placed", tags=["order:1"])]
    stream = fresh()
    first = await store.append(stream, events, condition=(query, START))
    again = await store.append(stream, events, condition=(query, START))
    assert again.duplicate and again.first_position == first.first_position
    await store.wait_until_visible(again.checkpoint)
    assert len(await store.read_query(query)) == 1


@pytest.mark.parametrize(
    "tags",
    [["x:1", 5], "x:1", [""], ["x" * (MAX_TAG_LENGTH + 1)], ["a\x00b"], [f"t{i}" for i in range(33)]],
    ids=["not a string", "one string", "empty", "too long", "NUL", "too many"],
)
async def test_bad_tags_are_refused_and_nothing_is_written(store: EventStore, tags: object) -> None:
    stream = fresh()
    with pytest.raises(InvalidAppend):
        await store.append(stream, [NewEvent("Fine", tags=["ok"]), NewEvent("Bad", tags=tags)])  # type: ignore[arg-type]
    assert await store.stream_version(stream) == -1
    assert await store.read_query(Query.of(tags=["ok"])) == []


def test_bad_queries_are_refused() -> None:
    with pytest.raises(InvalidArgument):
        Query()
    with pytest.raises(InvalidArgument):
        QueryItem()
    with pytest.raises(InvalidArgument):
        QueryItem(types="Registered")
    with pytest.raises(InvalidArgument):
        QueryItem(tags=[1])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        Query("item")  # type: ignore[arg-type]


async def test_bad_conditions_are_refused_and_nothing_is_written(store: EventStore) -> None:
    stream = fresh()
    query = Query.of(tags=["k:1"])
    head = await store.append(fresh(), [NewEvent("Seen")])
    for after in [Checkpoint(head.log_xid + 1_000_000, 0), Checkpoint(0, head.last_position + 1_000)]:
        with pytest.raises(InvalidAppend, match="from the future"):
            await store.append(stream, [NewEvent("X", tags=["k:1"])], condition=(query, after))
    with pytest.raises(InvalidArgument):
        await store.append(stream, [NewEvent("X")], condition=(query, (-1, 0)))  # type: ignore[arg-type]
    with pytest.raises(InvalidAppend):
        await store.append(stream, [NewEvent("X")], condition=("k:1", START))  # type: ignore[arg-type]
    with pytest.raises(InvalidAppend, match="reserved"):
        await store.append(stream, [NewEvent("X", metadata={"tags": ["k:1"]})])
    with pytest.raises(InvalidArgument):
        await store.read_query("k:1")  # type: ignore[arg-type]
    assert await store.stream_version(stream) == -1
    assert await store.read_query(query) == []


async def test_units_of_work_that_lock_in_opposite_orders_fail_with_a_typed_error(store: EventStore) -> None:
    """Each append takes its locks in order; two units of work of two appends each can still cross."""
    a, b = Query.of(["Held"], ["lock:a"]), Query.of(["Held"], ["lock:b"])
    first_done = [asyncio.Event(), asyncio.Event()]

    async def unit(i: int, first: Query, second: Query) -> str:
        try:
            async with store.unit_of_work() as uow:
                await uow.append(fresh(), [NewEvent("Other")], condition=(first, START))
                first_done[i].set()
                await first_done[1 - i].wait()
                await uow.append(fresh(), [NewEvent("Other")], condition=(second, START))
            return "committed"
        except AppendConditionFailed as exc:
            first_done[i].set()
            return exc.reason

    outcomes = await asyncio.wait_for(asyncio.gather(unit(0, a, b), unit(1, b, a)), 30)
    assert sorted(outcomes) == ["committed", "deadlock with a concurrent append: retry the unit of work"]


async def test_the_query_reads_and_the_conditional_append_keep_generic_plans(store: EventStore) -> None:
    """Custom plans cost 0.2-0.3 ms of planning per call (migration 0014): a redefinition must keep the setting."""
    rows = await store.pool.fetch(
        "SELECT proname, proconfig FROM pg_proc WHERE proname IN "
        "('eventstore_read_query', 'eventstore_read_query_committed', 'eventstore_append_tagged')"
    )
    names = ("eventstore_read_query", "eventstore_read_query_committed", "eventstore_append_tagged")
    generic = ["plan_cache_mode=force_generic_plan"]
    assert {r["proname"]: r["proconfig"] for r in rows} == {name: generic for name in names}


async def test_a_conditional_append_never_scans_the_whole_log(store: EventStore) -> None:
    """The retry check looks each event id up in its index (migration 0015).

    The session keeps one generic plan; `event_id = ANY (...)` was planned as a scan of `events` on a
    log of a thousand events, and that scan then ran in every conditional append of the session.
    """
    for start in range(0, 1_000, 500):
        filler = [NewEvent("Filler", {"i": i}, tags=[f"filler:{i}"]) for i in range(start, start + 500)]
        await store.append(fresh(), filler)
    query = Query.of(["Booked"], ["course:1"])
    async with store.unit_of_work() as uow:
        for i in range(3):  # the first calls of a session plan; later ones run the cached plan
            booked = NewEvent("Booked", {"i": i}, tags=[f"course:{i + 2}"])
            await uow.append(fresh(), [booked], condition=(query, START))
        scans = await uow.connection.fetchval("SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'events'")
    assert scans == 0


async def test_tags_given_as_a_one_shot_iterator_are_indexed_and_kept_alike(store: EventStore) -> None:
    """The append reads `tags` once: the index and the event's metadata (what decisions fold, what
    routes and restores read) hold the same tags."""
    await store.append("course-7", [NewEvent("Subscribed", tags=map(str, ["course:7", "student:1"]))])
    await store.append("course-7", [NewEvent("Subscribed", tags=(t for t in ["course:7", "student:2"]))])
    events, _ = await store.read_with_condition(Query.of(tags=["course:7"]))
    assert [e.tags for e in events] == [("course:7", "student:1"), ("course:7", "student:2")]
    assert all(Query.of(tags=["course:7"]).matches(e) for e in events)


async def test_a_unit_of_work_holding_too_many_locks_fails_with_a_typed_error(store: EventStore) -> None:
    """Conditional and tagged appends hold advisory locks until commit; the server's lock table is finite
    (max_locks_per_transaction): running out is an AppendConditionFailed saying so, not the driver's error."""

    def tagged(n: int) -> list[NewEvent]:
        return [NewEvent("Tagged", tags=[f"t{n}:{i}:{j}" for j in range(32)]) for i in range(10)]

    with pytest.raises(AppendConditionFailed, match="out of lock space"):
        async with store.unit_of_work() as uow:
            for n in range(1000):
                await uow.append(f"locks-{n}", tagged(n))
    assert await store.read_all() == []
