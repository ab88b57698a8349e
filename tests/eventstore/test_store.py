"""Contract of the event store against real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest

from eventstore import (
    START,
    AppendConditionFailed,
    Checkpoint,
    Direction,
    DuplicateEventId,
    EventSerializationError,
    EventStore,
    EventTooLarge,
    InvalidAppend,
    NewEvent,
    RecordedEvent,
    StreamState,
    WrongExpectedVersion,
    category_of,
)


def ev(kind: str = "Happened", **data: object) -> NewEvent:
    return NewEvent(kind, data)


async def settled_log(store: EventStore) -> list[RecordedEvent]:
    """The whole log once every stored event is visible (a shared server's other transactions may hold
    the log back for a moment)."""
    newest = await store.pool.fetchval("SELECT max(log_xid) FROM events")
    if newest is not None:
        await store.wait_until_visible(Checkpoint(newest, 0))
    return await store.read_all(limit=10_000)


async def test_append_and_read_stream_forwards_and_backwards(store: EventStore) -> None:
    result = await store.append("order-1", [ev(n=i) for i in range(5)], StreamState.NO_STREAM)
    assert result.next_expected_version == 4
    assert result.last_position - result.first_position == 4
    forwards = await store.read_stream("order-1")
    assert [e.stream_version for e in forwards] == [0, 1, 2, 3, 4]
    assert [e.json()["n"] for e in forwards] == [0, 1, 2, 3, 4]
    assert [e.stream_version for e in await store.read_stream("order-1", 2, limit=2)] == [2, 3]
    backwards = await store.read_stream("order-1", direction=Direction.BACKWARDS, limit=3)
    assert [e.stream_version for e in backwards] == [4, 3, 2]
    older = await store.read_stream("order-1", 1, direction=Direction.BACKWARDS)
    assert [e.stream_version for e in older] == [1, 0]
    assert await store.read_stream("missing-1") == []
    assert await store.stream_version("order-1") == 4
    assert await store.stream_version("missing-1") == -1


async def test_recorded_event_carries_everything(store: EventStore) -> None:
    correlation, causation = uuid.uuid4(), uuid.uuid4()
    event = NewEvent(
        "Placed", {"total": 10}, metadata={"user": "ann"}, correlation_id=correlation, causation_id=causation
    )
    await store.append("order-7", [event])
    (stored,) = await store.read_stream("order-7")
    assert stored.event_id == event.event_id
    assert stored.event_type == "Placed"
    assert stored.json() == {"total": 10}
    assert stored.meta()["user"] == "ann"
    assert stored.correlation_id == str(correlation)
    assert stored.causation_id == str(causation)
    assert stored.stream_id == "order-7" and stored.stream_version == 0 and stored.category == "order"
    assert stored.position > 0 and stored.log_xid > 0
    assert stored.recorded_at.tzinfo is not None


@pytest.mark.parametrize(
    ("expected", "ok"),
    [(StreamState.ANY, True), (StreamState.STREAM_EXISTS, True), (StreamState.NO_STREAM, False), (1, True),
     (0, False), (2, False)],
)
async def test_expected_version_on_existing_stream(store: EventStore, expected: object, ok: bool) -> None:
    await store.append("cart-1", [ev(), ev()], StreamState.NO_STREAM)
    if ok:
        result = await store.append("cart-1", [ev()], expected)  # type: ignore[arg-type]
        assert result.next_expected_version == 2
    else:
        with pytest.raises(WrongExpectedVersion) as info:
            await store.append("cart-1", [ev()], expected)  # type: ignore[arg-type]
        assert info.value.stream_id == "cart-1"
        assert info.value.expected == expected
        assert info.value.actual == 1
        assert await store.stream_version("cart-1") == 1


async def test_expected_version_on_missing_stream(store: EventStore) -> None:
    with pytest.raises(WrongExpectedVersion) as info:
        await store.append("cart-2", [ev()], StreamState.STREAM_EXISTS)
    assert info.value.actual == -1
    with pytest.raises(WrongExpectedVersion):
        await store.append("cart-2", [ev()], 0)
    assert await store.read_stream("cart-2") == []
    assert (await store.append("cart-2", [ev()], StreamState.ANY)).next_expected_version == 0


async def test_idempotent_append_returns_first_result(store: EventStore) -> None:
    events = [ev(n=1), ev(n=2)]
    first = await store.append("pay-1", events, StreamState.NO_STREAM)
    again = await store.append("pay-1", events, StreamState.NO_STREAM)
    assert again.duplicate and not first.duplicate
    assert (again.next_expected_version, again.first_position, again.last_position) == (
        first.next_expected_version,
        first.first_position,
        first.last_position,
    )
    assert len(await store.read_stream("pay-1")) == 2
    any_again = await store.append("pay-1", events, StreamState.ANY)
    assert any_again.duplicate and len(await settled_log(store)) == 2


async def test_same_event_id_with_other_content_is_an_error(store: EventStore) -> None:
    event = ev(n=1)
    await store.append("pay-2", [event])
    changed = NewEvent("Happened", {"n": 2}, event_id=event.event_id)
    with pytest.raises(DuplicateEventId) as info:
        await store.append("pay-2", [changed])
    assert info.value.event_ids == [event.event_id]
    with pytest.raises(DuplicateEventId):
        await store.append("pay-3", [NewEvent("Happened", {"n": 1}, event_id=event.event_id)])
    with pytest.raises(DuplicateEventId):  # partly stored batch
        await store.append("pay-2", [event, ev(n=3)])
    assert len(await settled_log(store)) == 1


@pytest.mark.parametrize(
    ("stream_id", "events", "expected", "error"),
    [
        ("", [ev()], StreamState.ANY, InvalidAppend),
        ("x" * 256, [ev()], StreamState.ANY, InvalidAppend),
        ("bad\x00id", [ev()], StreamState.ANY, InvalidAppend),
        (42, [ev()], StreamState.ANY, InvalidAppend),
        ("ok-1", [], StreamState.ANY, InvalidAppend),
        ("ok-1", [ev(), object()], StreamState.ANY, InvalidAppend),
        ("ok-1", [ev()], -1, InvalidAppend),
        ("ok-1", [ev()], True, InvalidAppend),
        ("ok-1", [ev()], 2**63, InvalidAppend),
        ("ok-1", [ev(), NewEvent("", {})], StreamState.ANY, InvalidAppend),
        ("ok-1", [ev(), NewEvent("T", {"x": object()})], StreamState.ANY, EventSerializationError),
        ("ok-1", [NewEvent("T", {"x": 2**70})], StreamState.ANY, EventSerializationError),
        ("ok-1", [NewEvent("T", {"x": "nul\x00char"})], StreamState.ANY, EventSerializationError),
        ("ok-1", [NewEvent("T", {"x": "\ud800"})], StreamState.ANY, EventSerializationError),
        ("ok-1", [NewEvent("T", metadata={"x": object()})], StreamState.ANY, EventSerializationError),
        ("ok-1", [ev(), NewEvent("T", {"x": "y" * 2_000_000})], StreamState.ANY, EventTooLarge),
    ],
)
async def test_bad_input_is_a_typed_error_and_writes_nothing(
    store: EventStore, stream_id: object, events: list[object], expected: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await store.append(stream_id, events, expected)  # type: ignore[arg-type]
    assert await store.read_all() == []
    assert await store.list_streams() == []


async def test_duplicate_ids_within_one_append_are_rejected(store: EventStore) -> None:
    event = ev()
    with pytest.raises(InvalidAppend):
        await store.append("dup-1", [event, event])
    assert await store.read_all() == []


async def test_size_limit_is_configurable(database_url: str) -> None:
    async with EventStore(database_url, max_event_size=100) as small:
        await small.append("s-1", [NewEvent("T", {"x": "y" * 50})])
        with pytest.raises(EventTooLarge) as info:
            await small.append("s-1", [NewEvent("T", {"x": "y" * 100})])
        assert info.value.limit == 100
        assert len(await small.read_stream("s-1")) == 1


async def test_json_text_is_stored_as_given(store: EventStore) -> None:
    await store.append("raw-1", [NewEvent("T", orjson.Fragment(b'{"a": [1, 2]}'))])
    (stored,) = await store.read_stream("raw-1")
    assert stored.json() == {"a": [1, 2]}


async def test_read_all_filters_by_type_and_category(store: EventStore) -> None:
    await store.append("order-1", [ev("Placed"), ev("Paid")])
    await store.append("cart-1", [ev("Placed"), ev("Emptied")])
    await store.append("order-2", [ev("Placed")])
    everything = await settled_log(store)
    assert [(e.stream_id, e.event_type) for e in everything] == [
        ("order-1", "Placed"), ("order-1", "Paid"), ("cart-1", "Placed"), ("cart-1", "Emptied"),
        ("order-2", "Placed"),
    ]
    assert [e.stream_id for e in await store.read_all(category="order")] == ["order-1", "order-1", "order-2"]
    assert [e.stream_id for e in await store.read_all(types=["Placed"])] == ["order-1", "cart-1", "order-2"]
    assert [e.event_type for e in await store.read_all(category="cart", types=["Emptied"])] == ["Emptied"]
    assert await store.read_all(types=[]) == []
    page = await store.read_all(limit=2)
    rest = await store.read_all(page[-1].checkpoint)
    assert [e.event_id for e in page + rest] == [e.event_id for e in everything]
    assert await store.head() == everything[-1].checkpoint
    assert await store.count_after(START) == 5
    assert await store.count_after(everything[1].checkpoint) == 3


CATEGORY_CASES = ["order-42", "order", "a--b", "a-b-c", "x-", "-lead", "ünï-cødé", "tab\t-x"]


async def test_the_category_rule_is_the_same_in_python_and_in_sql(store: EventStore) -> None:
    """`category_of`, `RecordedEvent.category`, the stored column and the category filters all agree."""
    for stream_id in CATEGORY_CASES:
        await store.append(stream_id, [ev()])
    recorded = {e.stream_id: e for e in await settled_log(store)}
    for stream_id in CATEGORY_CASES:
        category = category_of(stream_id)
        assert recorded[stream_id].category == category
        assert await store.pool.fetchval("SELECT category FROM events WHERE stream_id = $1", stream_id) == category
        assert stream_id in [s for s, _ in await store.list_streams(category)]
        if category:  # an empty category is no filter read_all accepts
            assert stream_id in [e.stream_id for e in await store.read_all(category=category)]


async def test_unit_of_work_is_atomic_across_streams_and_own_tables(store: EventStore) -> None:
    await store.pool.execute("CREATE TABLE app_log (note text)")
    async with store.unit_of_work() as uow:
        await uow.append("a-1", [ev()])
        await uow.append("b-1", [ev(), ev()])
        await uow.connection.execute("INSERT INTO app_log VALUES ('both')")
    assert len(await settled_log(store)) == 3

    with pytest.raises(RuntimeError):
        async with store.unit_of_work() as uow:
            await uow.append("a-1", [ev()])
            await uow.connection.execute("INSERT INTO app_log VALUES ('rolled back')")
            raise RuntimeError("application failed")
    assert len(await settled_log(store)) == 3
    assert await store.pool.fetchval("SELECT count(*) FROM app_log") == 1

    with pytest.raises(WrongExpectedVersion):
        async with store.unit_of_work() as uow:
            await uow.append("c-1", [ev()])
            await uow.append("a-1", [ev()], StreamState.NO_STREAM)
    assert await store.read_stream("c-1") == []


async def test_append_hooks_run_inside_the_transaction(store: EventStore) -> None:
    seen: list[str] = []
    await store.pool.execute("CREATE TABLE hook_rows (stream_id text)")

    async def hook(uow, result) -> None:  # type: ignore[no-untyped-def]
        seen.append(result.stream_id)
        await uow.connection.execute("INSERT INTO hook_rows VALUES ($1)", result.stream_id)

    store.add_append_hook(hook)
    await store.append("h-1", [ev()])
    with pytest.raises(RuntimeError):
        async with store.unit_of_work() as uow:
            await uow.append("h-2", [ev()])
            raise RuntimeError
    assert seen == ["h-1", "h-2"]
    assert [r[0] for r in await store.pool.fetch("SELECT stream_id FROM hook_rows")] == ["h-1"]


@pytest.mark.parametrize("statement", ["UPDATE events SET event_type = 'x'", "DELETE FROM events",
                                       "TRUNCATE events"])
async def test_events_table_is_append_only(store: EventStore, statement: str) -> None:
    await store.append("ao-1", [ev()])
    with pytest.raises(asyncpg.exceptions.RestrictViolationError, match="append-only"):
        await store.pool.execute(statement)
    assert len(await settled_log(store)) == 1


async def test_optimistic_concurrency_race_has_exactly_one_winner(store: EventStore) -> None:
    for round_ in range(20):
        stream = f"race-{round_}"
        await store.append(stream, [ev()], StreamState.NO_STREAM)

        async def contender(i: int, stream: str = stream) -> bool:
            try:
                await store.append(stream, [ev(writer=i)], 0)
                return True
            except WrongExpectedVersion as conflict:
                assert conflict.actual == 1
                return False

        wins = await asyncio.gather(*(contender(i) for i in range(10)))
        assert sum(wins) == 1
        assert [e.stream_version for e in await store.read_stream(stream)] == [0, 1]


async def test_no_stream_race_has_exactly_one_winner(store: EventStore) -> None:
    async def contender(i: int) -> bool:
        try:
            await store.append("fresh-1", [ev(writer=i)], StreamState.NO_STREAM)
            return True
        except WrongExpectedVersion:
            return False

    assert sum(await asyncio.gather(*(contender(i) for i in range(10)))) == 1


async def test_concurrent_retries_of_the_same_events_store_them_once(store: EventStore) -> None:
    events = [ev(n=i) for i in range(3)]
    results = await asyncio.gather(*(store.append("retry-1", events, StreamState.ANY) for _ in range(8)))
    assert sum(not r.duplicate for r in results) == 1
    assert len({(r.first_position, r.last_position) for r in results}) == 1
    assert len(await store.read_stream("retry-1")) == 3


async def test_snapshots_keep_the_newest(store: EventStore) -> None:
    assert await store.load_snapshot("acc-1") is None
    await store.save_snapshot("acc-1", "Account", "1", 5, '{"balance": 5}')
    assert await store.load_snapshot("acc-1") is None  # no stream, no snapshot
    await store.append("acc-1", [ev(n=i) for i in range(5)])
    await store.save_snapshot("acc-1", "Account", "1", 5, '{"balance": 5}')
    assert await store.load_snapshot("acc-1") is None  # the stream is at version 4: past its end
    await store.append("acc-1", [ev(n=i) for i in range(5)])
    await store.save_snapshot("acc-1", "Account", "1", 5, '{"balance": 5}')
    await store.save_snapshot("acc-1", "Account", "1", 3, '{"balance": 3}')
    snap = await store.load_snapshot("acc-1")
    assert snap is not None and snap.stream_version == 5 and orjson.loads(snap.data) == {"balance": 5}
    await store.save_snapshot("acc-1", "Account", "2", 9, '{"balance": 9}')
    snap = await store.load_snapshot("acc-1")
    assert snap is not None and (snap.stream_version, snap.schema_version) == (9, "2")


async def test_an_append_sent_again_from_another_trace_is_still_the_same_append(store: EventStore) -> None:
    """A caller's retry runs in another span: its events carry another traceparent (OpenTelemetry on),
    and that alone must not turn the retry into a DuplicateEventId."""
    event_id = uuid.uuid4()

    def sent(traceparent: str, amount: int = 5) -> list[NewEvent]:
        return [NewEvent("Deposited", {"amount": amount}, {"traceparent": traceparent}, event_id=event_id)]

    first = await store.append("account-1", sent("00-" + "a" * 32 + "-" + "b" * 16 + "-01"))
    again = await store.append("account-1", sent("00-" + "c" * 32 + "-" + "d" * 16 + "-01"))
    assert again.duplicate and again.events[0].position == first.events[0].position
    untraced = await store.append("account-1", [NewEvent("Deposited", {"amount": 5}, event_id=event_id)])
    assert untraced.duplicate
    with pytest.raises(DuplicateEventId):
        await store.append("account-1", sent("00-" + "e" * 32 + "-" + "f" * 16 + "-01", amount=6))
    assert await store.stream_version("account-1") == 0


async def test_units_of_work_deadlocking_over_two_streams_get_a_typed_error(store: EventStore) -> None:
    """Two units of work append to the same two streams in opposite orders: PostgreSQL aborts one, and
    its caller gets the store's error that says to run the unit of work again, not the driver's."""
    for stream in ("left-1", "right-1"):
        await store.append(stream, [NewEvent("Opened")])
    both_first = asyncio.Barrier(2)

    async def transfer(first: str, second: str) -> None:
        async with store.unit_of_work() as uow:
            await uow.append(first, [NewEvent("Moved")], expected_version=0)
            await both_first.wait()
            await uow.append(second, [NewEvent("Moved")], expected_version=0)

    results = await asyncio.gather(
        transfer("left-1", "right-1"), transfer("right-1", "left-1"), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], AppendConditionFailed), results
    assert "retry the unit of work" in str(failed[0])
    assert sorted([await store.stream_version("left-1"), await store.stream_version("right-1")]) == [1, 1]


async def test_read_all_takes_types_as_any_collection(store: EventStore) -> None:
    await store.append("order-1", [ev(n=1)])
    (event,) = await store.read_all()
    for types in ({event.event_type}, frozenset([event.event_type]), {event.event_type: 1}.keys(), (event.event_type,)):
        assert await store.read_all(types=types) == [event]  # type: ignore[arg-type]
