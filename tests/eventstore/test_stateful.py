"""Hypothesis drives the store and an in-memory model with the same operations; they must agree."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from eventstore import (
    START,
    Direction,
    DuplicateEventId,
    EventSerializationError,
    EventStore,
    InvalidAppend,
    NewEvent,
    StreamState,
    WrongExpectedVersion,
)
from tests.conftest import fresh_database

T = TypeVar("T")

# jsonb cannot hold NUL and JSON text cannot hold lone surrogates; the store rejects both (tested below).
text = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=8,
)
new_events = st.lists(
    st.builds(
        lambda kind, data: NewEvent(kind, data),
        st.sampled_from(["Opened", "Deposited", "Withdrawn", "Closed"]),
        st.dictionaries(text, json_values, max_size=3),
    ),
    min_size=1,
    max_size=4,
)
expectations = st.sampled_from(["exact", "stale", "ahead", "any", "no-stream", "exists"])
_examples = itertools.count()


class StoreMachine(RuleBasedStateMachine):
    url: str
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        self.category = f"ex{next(_examples)}"
        self.store = EventStore(self.url)
        self.run(self.store.start())
        self.streams: dict[str, list[NewEvent]] = {}
        self.log: list[NewEvent] = []
        self.last: tuple[str, list[NewEvent], Any, int] | None = None
        self.newest = START

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.store.stop())

    def _stream(self, name: str) -> str:
        return f"{self.category}-{name}"

    @rule(name=st.sampled_from(["a", "b", "c"]), events=new_events, how=expectations)
    def append(self, name: str, events: list[NewEvent], how: str) -> None:
        stream = self._stream(name)
        version = len(self.streams.get(stream, [])) - 1
        expected: Any = {
            "exact": version if version >= 0 else StreamState.NO_STREAM,
            "stale": version - 1 if version >= 1 else 7,
            "ahead": version + 1,
            "any": StreamState.ANY,
            "no-stream": StreamState.NO_STREAM,
            "exists": StreamState.STREAM_EXISTS,
        }[how]
        ok = (
            how in ("exact", "any")
            or (how == "no-stream" and version < 0)
            or (how == "exists" and version >= 0)
        )
        if not ok:
            with pytest.raises(WrongExpectedVersion) as info:
                self.run(self.store.append(stream, events, expected))
            assert info.value.actual == version
            return
        result = self.run(self.store.append(stream, events, expected))
        assert not result.duplicate
        assert result.next_expected_version == version + len(events)
        self.streams.setdefault(stream, []).extend(events)
        self.log.extend(events)
        self.last = (stream, events, expected, result.first_position)
        self.newest = result.checkpoint

    @precondition(lambda self: self.last is not None)
    @rule()
    def retry_last_append(self) -> None:
        assert self.last is not None
        stream, events, expected, first_position = self.last
        result = self.run(self.store.append(stream, events, expected))
        assert result.duplicate and result.first_position == first_position

    @precondition(lambda self: bool(self.log))
    @rule(index=st.integers(min_value=0), name=st.sampled_from(["a", "b", "c"]))
    def reuse_an_event_id_with_other_content(self, index: int, name: str) -> None:
        original = self.log[index % len(self.log)]
        clash = NewEvent("Clash", {"other": True}, event_id=original.event_id)
        with pytest.raises(DuplicateEventId):
            self.run(self.store.append(self._stream(name), [NewEvent("Fresh"), clash]))

    @rule(name=st.sampled_from(["a", "b"]))
    def bad_append_changes_nothing(self, name: str) -> None:
        with pytest.raises(InvalidAppend):
            self.run(self.store.append(self._stream(name), [], StreamState.ANY))
        with pytest.raises(InvalidAppend):
            self.run(self.store.append(self._stream(name), [NewEvent("T", {"x": {1, 2}})]))
        with pytest.raises(EventSerializationError):
            self.run(self.store.append(self._stream(name), [NewEvent("T"), NewEvent("T", {"\x00": 1})]))

    @invariant()
    def streams_match_the_model(self) -> None:
        for stream, expected in self.streams.items():
            stored = self.run(self.store.read_stream(stream))
            assert [e.event_id for e in stored] == [e.event_id for e in expected]
            assert [e.stream_version for e in stored] == list(range(len(expected)))
            assert [e.json() for e in stored] == [e.data for e in expected]
            backwards = self.run(self.store.read_stream(stream, direction=Direction.BACKWARDS))
            assert [e.event_id for e in backwards] == [e.event_id for e in reversed(expected)]
            assert self.run(self.store.stream_version(stream)) == len(expected) - 1

    @invariant()
    def log_matches_the_model(self) -> None:
        # Other databases on a shared server may hold transactions open; the log shows ours once they end.
        self.run(self.store.wait_until_visible(self.newest))
        stored = self.run(self.store.read_all(START, limit=10_000, category=self.category))
        assert [e.event_id for e in stored] == [e.event_id for e in self.log]
        paged: list[uuid.UUID] = []
        after = START
        while page := self.run(self.store.read_all(after, limit=3, category=self.category)):
            paged.extend(e.event_id for e in page)
            after = page[-1].checkpoint
        assert paged == [e.event_id for e in self.log]


def test_store_agrees_with_the_model(server_url: str, template_database: str) -> None:
    loop = asyncio.new_event_loop()
    database = fresh_database(server_url, template_database)
    try:
        StoreMachine.url = loop.run_until_complete(database.__aenter__())
        StoreMachine.loop = loop
        machine_test = StoreMachine.TestCase()
        machine_test.settings = settings(
            max_examples=25, stateful_step_count=20, deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        machine_test.runTest()
    finally:
        loop.run_until_complete(database.__aexit__(None, None, None))
        loop.close()
