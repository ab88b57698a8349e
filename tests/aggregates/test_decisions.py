"""Decisions across streams keep the specification's invariants however their reads and appends interleave.

Each example checks the log itself, replayed in its order: every event must have been allowed by the
events before it. Two kinds of runs per example: hypothesis chooses step by step which command reads
(builds its state) and which appends, so stale decisions are made on purpose; then the same commands
run all at once on their own connections, and the locks decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregates import DecisionProjection, Decisions, DecisionState
from eventstore import (
    START,
    AppendConditionFailed,
    EventStore,
    InvalidArgument,
    NewEvent,
    Query,
    RecordedEvent,
    StreamState,
)
from tests.aggregates.dcb_domain import Courses, Invoices, Refused, Usernames
from tests.conftest import fresh_database

T = TypeVar("T")

Command = tuple[Mapping[str, DecisionProjection[Any]], Callable[[Mapping[str, Any]], Sequence[NewEvent]]]

_runs = itertools.count()
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


class _Stepped:
    """One command, run a step at a time: `build` reads its state, `append` decides on it and appends."""

    def __init__(self, decisions: Decisions, command: Command) -> None:
        self.decisions = decisions
        self.projections, self.decide = command
        self.state: DecisionState | None = None
        self.done = False
        self.conflicts = 0

    async def step(self) -> None:
        if self.state is None:
            self.state = await self.decisions.build(self.projections)
            return
        state, self.state = self.state, None
        try:
            events = self.decide(state.states)
        except Refused:
            self.done = True
            return
        if not events:
            self.done = True
            return
        try:
            await self.decisions.store.append(
                f"decision-{uuid.uuid4().hex}", events, StreamState.NO_STREAM,
                condition=state.condition,
            )
            self.done = True
        except AppendConditionFailed:
            self.conflicts += 1  # decided on a stale state: read again


async def _interleave(decisions: Decisions, commands: Sequence[Command], schedule: Sequence[int]) -> int:
    running = [_Stepped(decisions, c) for c in commands]
    for choice in schedule:
        active = [r for r in running if not r.done]
        if not active:
            break
        await active[choice % len(active)].step()
    for r in running:
        while not r.done:
            await r.step()
    return sum(r.conflicts for r in running)


async def _storm(decisions: Decisions, commands: Sequence[Command]) -> None:
    async def one(command: Command) -> None:
        with contextlib.suppress(Refused):
            await decisions.execute(*command, retries=100)

    await asyncio.gather(*(one(c) for c in commands))


async def _log(store: EventStore) -> list[RecordedEvent]:
    """The decisions' log once everything committed so far shows (a later commit waits for all before it)."""
    barrier = await store.append("barrier-1", [NewEvent("Barrier")])
    await store.wait_until_visible(barrier.checkpoint)
    out: list[RecordedEvent] = []
    after = START
    while page := await store.read_all(after, limit=5000, category="decision"):
        out.extend(page)
        after = page[-1].checkpoint
    return out


def _examples(server_url: str, template_database: str, body: Callable[[EventStore, Any], Awaitable[None]],
              strategy: st.SearchStrategy[Any]) -> None:
    """Run `body` for each hypothesis example, all on one database and one event loop."""
    loop = asyncio.new_event_loop()

    def run(coroutine: Coroutine[Any, Any, T]) -> T:
        return loop.run_until_complete(coroutine)

    database = fresh_database(server_url, template_database)
    try:
        url = run(database.__aenter__())
        store = EventStore(url, max_connections=16)
        run(store.start())
        try:
            @SETTINGS
            @given(strategy)
            def example(value: Any) -> None:
                run(body(store, value))

            example()
        finally:
            run(store.stop())
    finally:
        run(database.__aexit__(None, None, None))
        loop.close()


schedules = st.lists(st.integers(0, 50), max_size=60)


def test_course_subscriptions_never_exceed_capacity_or_the_student_limit(
    server_url: str, template_database: str
) -> None:
    subscriptions = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3)), min_size=4, max_size=24)
    capacities = st.lists(st.integers(1, 4), min_size=4, max_size=4)
    changes = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4)), max_size=3)

    async def body(store: EventStore, example: Any) -> None:
        wanted, capacity, changed, schedule = example
        for stormy in (False, True):
            courses = Courses(f"r{next(_runs)}")
            decisions = Decisions(store)
            for c, cap in enumerate(capacity):
                defined = await decisions.execute(*courses.define(c, cap))
            # A decision reads the log, which shows a commit once older transactions end; a stale read
            # that misses an event can only refuse (nothing to append) or fail its condition and retry.
            assert defined is not None
            await store.wait_until_visible(defined.checkpoint)
            commands: list[Command] = [courses.subscribe(s, c) for s, c in wanted]
            commands += [courses.change_capacity(c, cap) for c, cap in changed]
            commands += [courses.define(0, 9)]  # refused: it exists
            if stormy:
                await _storm(decisions, commands)
            else:
                await _interleave(decisions, commands, schedule)
            per_course = courses.check(await _log(store))
            # Not just refusals: a course with room and a student with room always got in.
            assert sum(per_course.values()) >= min(len({c for _, c in wanted}), 1)

    _examples(server_url, template_database, body, st.tuples(subscriptions, capacities, changes, schedules))


def test_usernames_are_unique_and_can_be_reused_once_released(server_url: str, template_database: str) -> None:
    names = st.sampled_from(["ann", "bob", "cy"])
    command = st.one_of(
        st.tuples(st.just("register"), names),
        st.tuples(st.just("close"), names),
        st.tuples(st.just("rename"), names, names),
    )

    async def body(store: EventStore, example: Any) -> None:
        wanted, schedule = example
        for stormy in (False, True):
            usernames = Usernames(f"r{next(_runs)}")
            decisions = Decisions(store)
            commands: list[Command] = []
            for kind, *args in wanted:
                commands.append(getattr(usernames, kind)(*args))
            if stormy:
                await _storm(decisions, commands)
            else:
                await _interleave(decisions, commands, schedule)
            taken = usernames.check(await _log(store))
            # The state the decisions see is the one the log tells.
            for name in ("ann", "bob", "cy"):
                state = await decisions.build({"claimed": usernames.claimed(name)})
                assert state["claimed"] == (name in taken)

    _examples(server_url, template_database, body, st.tuples(st.lists(command, min_size=2, max_size=16), schedules))


def test_invoice_numbers_are_consecutive(server_url: str, template_database: str) -> None:
    async def body(store: EventStore, example: Any) -> None:
        count, schedule = example
        for stormy in (False, True):
            invoices = Invoices(f"r{next(_runs)}")
            decisions = Decisions(store)
            commands: list[Command] = [invoices.create(i) for i in range(count)]
            if stormy:
                await _storm(decisions, commands)
            else:
                await _interleave(decisions, commands, schedule)
            assert invoices.check(await _log(store)) == count

    _examples(server_url, template_database, body, st.tuples(st.integers(2, 12), schedules))


async def test_a_username_reused_after_release(store: EventStore) -> None:
    """The specification's own story, step by step (each step waits to see the one before: read your writes)."""
    usernames = Usernames(f"r{next(_runs)}")
    decisions = Decisions(store)

    async def execute(command: Command) -> None:
        result = await decisions.execute(*command)
        assert result is not None
        await store.wait_until_visible(result.checkpoint)

    await execute(usernames.register("ann"))
    with pytest.raises(Refused):
        await execute(usernames.register("ann"))
    await execute(usernames.rename("ann", "bob"))
    await execute(usernames.register("ann"))  # released by the rename
    with pytest.raises(Refused):
        await execute(usernames.register("bob"))
    await execute(usernames.close("bob"))
    await execute(usernames.register("bob"))  # released by the close
    assert usernames.check(await _log(store)) == {"ann", "bob"}


async def test_execute_retries_a_stale_decision_and_gives_up_after_its_retries(store: EventStore) -> None:
    invoices = Invoices(f"r{next(_runs)}")
    decisions = Decisions(store)
    projections, decide = invoices.create(1)
    calls = 0

    async def overtaken_twice(state: Mapping[str, Any]) -> Sequence[NewEvent]:
        nonlocal calls
        calls += 1
        if calls <= 2:  # someone else takes the number first, while this decision is being made
            await decisions.execute(projections, decide)
        return decide(state)

    await decisions.execute(projections, overtaken_twice)
    assert calls == 3
    assert invoices.check(await _log(store)) == 3

    async def always_overtaken(state: Mapping[str, Any]) -> Sequence[NewEvent]:
        await decisions.execute(projections, decide)
        return decide(state)

    with pytest.raises(AppendConditionFailed) as failed:
        await decisions.execute(projections, always_overtaken, retries=1)
    assert failed.value.conflict is not None
    assert invoices.check(await _log(store)) == 5


async def test_decisions_refuse_bad_declarations(store: EventStore) -> None:
    decisions = Decisions(store)
    with pytest.raises(InvalidArgument):
        await decisions.build({})
    with pytest.raises(InvalidArgument):
        await decisions.build({"x": Query.of(tags=["a"])})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgument, match="Query"):
        await decisions.build({"x": DecisionProjection("q", 0, lambda s, e: s)})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="callable"):
        await decisions.build({"x": DecisionProjection(Query.of(tags=["a"]), 0, "f")})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Decisions(store, category="a-b")
    for category in ("a\x00b", "a\ud800b"):
        with pytest.raises(InvalidArgument):
            Decisions(store, category=category)
    with pytest.raises(InvalidArgument):
        await decisions.execute({"x": DecisionProjection(Query.of(tags=["a"]), 0, lambda s, e: s)}, lambda s: [],
                                retries=-1)


async def test_every_build_folds_from_a_fresh_copy_of_the_initial_state(store: EventStore) -> None:
    """A fold that appends to its state in place must not carry one read's events into the next (a retry)."""
    decisions = Decisions(store)

    def add_seat(seats: list[int], event: RecordedEvent) -> list[int]:
        seats.append(event.json()["student"])
        return seats

    booked = {"booked": DecisionProjection(Query.of(["SeatBooked"], ["course:7"]), [], add_seat)}

    def book(student: int) -> Callable[[Mapping[str, Any]], Sequence[NewEvent]]:
        def decide(state: Mapping[str, Any]) -> Sequence[NewEvent]:
            if len(state["booked"]) >= 3:
                raise Refused(f"course full: {state['booked']}")
            return [NewEvent("SeatBooked", {"student": student}, tags=["course:7"])]

        return decide

    await decisions.execute(booked, book(1))
    assert (await decisions.build(booked))["booked"] == (await decisions.build(booked))["booked"] == [1]
    seen: list[list[int]] = []

    async def overtaken_once(state: Mapping[str, Any]) -> Sequence[NewEvent]:
        seen.append(list(state["booked"]))
        if len(seen) == 1:
            await decisions.execute(booked, book(3))
        return book(4)(state)

    await decisions.execute(booked, overtaken_once)
    assert seen == [[1], [1, 3]] and booked["booked"].initial == []
    assert (await decisions.build(booked))["booked"] == [1, 3, 4]
