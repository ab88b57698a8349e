"""`RecordedEvent`: what reads return (the driver's rows) behaves as what Python builds (a tuple)."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import uuid4

import pytest

from eventstore import EventStore, NewEvent, RecordedEvent, fetch_events, sql


async def test_read_events_are_the_events_the_append_returned(store: EventStore) -> None:
    result = await store.append("cart-1", [NewEvent("Added", {"n": n}, metadata={"m": n}) for n in range(3)])
    # jsonb keeps its own spacing: the append's result holds the text as sent
    built = [e._replace(data=f'{{"n": {n}}}', metadata=f'{{"m": {n}}}') for n, e in enumerate(result.events)]
    for read in (
        await store.read_stream("cart-1", 0, direction="forwards"),
        list(reversed(await store.read_stream("cart-1", direction="backwards"))),
        await store.read_all(),
    ):
        assert all(isinstance(e, RecordedEvent) for e in read)
        assert read == built and built == read
        assert [hash(e) for e in read] == [hash(e) for e in built]
        assert [e.checkpoint for e in read] == [e.checkpoint for e in built]
        assert [(e.json(), e.meta()["m"], e.category) for e in read] == [({"n": n}, n, "cart") for n in range(3)]
        assert [repr(e) for e in read] == [repr(e) for e in built]
        assert [e._asdict() for e in read] == [e._asdict() for e in built]


async def test_a_read_event_pickles_copies_and_replaces_like_a_built_one(store: EventStore) -> None:
    await store.append("cart-1", [NewEvent("Added", {"n": 1})])
    (read,) = await store.read_all()
    assert type(read) is not type(RecordedEvent.from_rows([tuple(read)])[0])  # the two kinds are both here
    for event in (read, RecordedEvent(*read)):
        for again in (pickle.loads(pickle.dumps(event)), copy.copy(event), copy.deepcopy(event)):
            assert again == event and isinstance(again, RecordedEvent)
        changed = event._replace(data='{"n": 2}')
        assert changed.json() == {"n": 2} and changed.event_id == event.event_id and event.json() == {"n": 1}
        with pytest.raises(ValueError, match="no field"):
            event._replace(nope=1)
        match event:
            case RecordedEvent(event_type="Added", stream_id=stream_id):
                assert stream_id == "cart-1"
            case _:
                pytest.fail("a RecordedEvent class pattern did not match")
        event_id, event_type, *_ = event
        assert (event_id, event_type, len(event), event[4]) == (read.event_id, "Added", 9, "cart-1")


async def test_fetch_events_reads_rows_as_recorded_events(store: EventStore) -> None:
    await store.append("cart-1", [NewEvent("Added")])
    async with store.connection() as conn:
        (row,) = await fetch_events(conn, sql.READ_ALL, 0, 0, 10)
    assert row == (await store.read_all())[0]
    assert row.stream_version == 0 and row.event_type == "Added"


def test_built_by_keyword_like_a_named_tuple() -> None:
    values = {
        "event_id": uuid4(), "event_type": "T", "data": "{}", "metadata": "{}", "stream_id": "s-1",
        "stream_version": 0, "position": 1, "log_xid": 2, "recorded_at": datetime.now(UTC),
    }
    event = RecordedEvent(**values)
    assert event._asdict() == values and tuple(event) == tuple(values.values())
    assert RecordedEvent._fields == tuple(values) and RecordedEvent._make(values.values()) == event
    with pytest.raises(TypeError):
        RecordedEvent(*list(values.values())[:8])  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        event.data = "x"  # type: ignore[misc]


async def test_both_kinds_are_sequences_of_their_values(store: EventStore) -> None:
    await store.append("cart-1", [NewEvent("Added")])
    (read,) = await store.read_all()
    for event in (read, RecordedEvent(*read)):
        assert isinstance(event, Sequence)
        assert event.event_id in event and "event_id" not in event  # values, not a row's column names
        assert event.index("cart-1") == 4 and event.count("Added") == 1
        assert event + ("x",) == (*tuple(event), "x")  # noqa: RUF005 (the operator is what is tested)
        match event:
            case (event_id, "Added", *_):
                assert event_id == read.event_id
            case _:
                pytest.fail("a sequence pattern did not match")
        assert type(event)._make(event) == event == RecordedEvent._make(event)


def test_a_new_event_is_built_like_the_frozen_dataclass_it_is() -> None:
    """NewEvent's own __init__ (faster than the generated one) keeps the dataclass's behaviour."""
    first, second = NewEvent("A"), NewEvent("A")
    assert first.data == {} and first.data is not second.data and first.event_id != second.event_id
    assert NewEvent("A", event_id=None).event_id is None  # given, even if wrong, as the dataclass kept it
    explicit = NewEvent(type="A", data={"k": 1}, tags=["t"], event_id=first.event_id)
    assert explicit == NewEvent("A", {"k": 1}, None, first.event_id, None, None, ["t"])
    assert dataclasses.replace(explicit, type="B").type == "B" and pickle.loads(pickle.dumps(explicit)) == explicit
    with pytest.raises(dataclasses.FrozenInstanceError):
        explicit.type = "C"  # type: ignore[misc]
    with pytest.raises(TypeError):
        NewEvent("A", nope=1)  # type: ignore[call-arg]
