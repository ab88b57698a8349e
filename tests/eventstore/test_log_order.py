"""The global log keeps every stream's events in version order, and no reader ever skips a late commit.

PostgreSQL hands out a transaction id at a transaction's first write, not at commit, so ordering the log
by the writer's transaction id alone let a transaction that started early append after a younger one
that already committed to the same stream, and put its event before the younger one's in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from eventstore import (
    START,
    Checkpoint,
    EventStore,
    NewEvent,
    RecordedEvent,
    StreamState,
    UnitOfWork,
    WrongExpectedVersion,
)
from eventstore.model import expected_version
from tests.conftest import fresh_database

T = TypeVar("T")


def _versions_by_stream(events: list[RecordedEvent]) -> dict[str, list[int]]:
    versions: dict[str, list[int]] = defaultdict(list)
    for event in events:
        versions[event.stream_id].append(event.stream_version)
    return versions


async def _read_everything(store: EventStore, category: str, after: Checkpoint = START) -> list[RecordedEvent]:
    out: list[RecordedEvent] = []
    while page := await store.read_all(after, limit=3, category=category):
        out.extend(page)
        after = page[-1].checkpoint
    return out


async def test_an_early_transaction_appends_after_a_younger_one(store: EventStore) -> None:
    """The reproduction of the ordering issue: versions 0, 2, 1 in the log before the fix."""
    await store.append("order-1", [NewEvent("OrderPlaced")], StreamState.NO_STREAM)
    seen_before_a_commits: list[RecordedEvent] = []
    async with store.unit_of_work() as a:
        await a.append("audit-1", [NewEvent("Audited")])  # A now has its transaction id
        await store.append("order-1", [NewEvent("OrderPaid")], 0)  # B, younger, commits first
        version = (await a.read_stream("order-1"))[-1].stream_version
        await a.append("order-1", [NewEvent("OrderShipped")], version)
        # A reader meanwhile: it must not hand out a checkpoint that A's events could land behind.
        seen_before_a_commits = await store.read_all(START, category="order")
    assert [e.stream_version for e in seen_before_a_commits] in ([], [0])
    await store.wait_until_visible(await store.last_committed())  # other databases' writers may hold it back
    log = await store.read_all(START, category="order")
    assert [(e.event_type, e.stream_version) for e in log] == [
        ("OrderPlaced", 0), ("OrderPaid", 1), ("OrderShipped", 2)
    ]
    rest = await store.read_all(seen_before_a_commits[-1].checkpoint if seen_before_a_commits else START,
                                category="order")
    assert seen_before_a_commits + rest == log


@pytest.mark.parametrize("types", [["OrderShipped"], ["OrderShipped", "OrderPaid"]])
async def test_a_read_by_type_never_passes_an_event_that_commits_later(store: EventStore, types: list[str]) -> None:
    """One type has a query of its own (no merge): it keeps the log's visibility rule all the same."""
    async with store.unit_of_work() as older:
        await older.append("order-1", [NewEvent("OrderShipped")])
        await store.append("order-2", [NewEvent("OrderShipped"), NewEvent("OrderPaid")])  # younger, committed
        seen = await store.read_all(START, types=types)
    assert seen == []
    await store.wait_until_visible(await store.last_committed())
    log = await store.read_all(START, types=types)
    expected = [("order-1", "OrderShipped"), ("order-2", "OrderShipped"), ("order-2", "OrderPaid")]
    assert [(e.stream_id, e.event_type) for e in log] == [x for x in expected if x[1] in types]
    assert await store.read_all(log[0].checkpoint, types=types, limit=1) == log[1:2]


_examples = itertools.count()
STREAMS = ("s0", "s1", "s2")
TRANSACTIONS = (0, 1, 2)


class _Transaction:
    """A unit of work held open across steps of the state machine."""

    def __init__(self, store: EventStore) -> None:
        self._context: contextlib.AbstractAsyncContextManager[UnitOfWork] = store.unit_of_work()
        self.uow: UnitOfWork | None = None
        self.appended: list[uuid.UUID] = []
        self.touched: list[uuid.UUID] = []
        self.locks: set[str] = set()  # stream rows this transaction has written (and so locked)
        self.waiting: asyncio.Task[None] | None = None  # an append blocked on another transaction's lock

    async def begin(self) -> None:
        self.uow = await self._context.__aenter__()

    async def end(self, commit: bool) -> None:
        if commit:
            await self._context.__aexit__(None, None, None)
            return
        with contextlib.suppress(_Rollback):
            await self._context.__aexit__(_Rollback, _Rollback(), None)


class _Rollback(Exception):
    pass


class InterleavingMachine(RuleBasedStateMachine):
    """Transactions that write several streams, read inside, commit late or roll back, against a reader.

    Hypothesis picks the interleaving step by step. After every step the reader reads on from its
    checkpoint, and every stream's events must arrive in version order with no version missing: a
    reader that skipped a late commit would see a gap (or, at the end, miss the event); a log that put a
    stream out of order would show a version going backwards.
    """

    url: str
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        self.category = f"il{next(_examples)}"
        self.store = EventStore(self.url, max_connections=8)
        self.run(self.store.start())
        self.open: dict[int, _Transaction] = {}
        self.committed: set[uuid.UUID] = set()
        self.committed_touches: set[uuid.UUID] = set()
        self.seen: list[RecordedEvent] = []
        self.checkpoint = START

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def stream(self, name: str) -> str:
        return f"{self.category}-{name}"

    def locked_by_other(self, name: str, me: int) -> bool:
        return any(name in t.locks for i, t in self.open.items() if i != me)

    def idle(self, i: int) -> bool:
        t = self.open.get(i)
        return t is not None and t.waiting is None

    # -- transactions --------------------------------------------------------------------------------

    @rule(i=st.sampled_from(TRANSACTIONS))
    def begin(self, i: int) -> None:
        if i in self.open:
            return
        transaction = _Transaction(self.store)
        self.run(transaction.begin())
        self.open[i] = transaction

    @rule(i=st.sampled_from(TRANSACTIONS))
    def touch(self, i: int) -> None:
        """Write a stream of the transaction's own: it now has its transaction id, early."""
        if not self.idle(i):
            return
        t = self.open[i]
        assert t.uow is not None
        event = NewEvent("Touched")
        self.run(t.uow.append(f"audit{self.category}-{i}", [event]))
        t.touched.append(event.event_id)

    @rule(i=st.sampled_from(TRANSACTIONS), name=st.sampled_from(STREAMS), count=st.integers(1, 2))
    def read_then_append(self, i: int, name: str, count: int) -> None:
        """Read the stream inside the transaction, then append with the version read as expectation."""
        if not self.idle(i) or self.locked_by_other(name, i):
            return
        t = self.open[i]
        assert t.uow is not None
        stream = self.stream(name)
        stored = self.run(t.uow.read_stream(stream))
        assert [e.stream_version for e in stored] == list(range(len(stored)))
        events = [NewEvent("Written", {"tx": i}) for _ in range(count)]
        self.run(t.uow.append(stream, events, expected_version(len(stored) - 1)))
        t.appended.extend(e.event_id for e in events)
        t.locks.add(name)

    @rule(i=st.sampled_from(TRANSACTIONS), name=st.sampled_from(STREAMS))
    def append_behind_a_lock(self, i: int, name: str) -> None:
        """Append to a stream another open transaction holds: the append waits for it to end.

        Only behind holders that wait for nothing themselves: two transactions waiting for each other's
        streams are a deadlock, which PostgreSQL breaks by aborting one (not what this machine checks).
        """
        if not self.idle(i) or not self.locked_by_other(name, i):
            return
        if any(name in t.locks and t.waiting is not None for j, t in self.open.items() if j != i):
            return
        t = self.open[i]
        assert t.uow is not None
        event = NewEvent("Waited", {"tx": i})

        async def append(uow: UnitOfWork = t.uow) -> None:
            await uow.append(self.stream(name), [event], StreamState.ANY)
            t.appended.append(event.event_id)
            t.locks.add(name)

        t.waiting = self.loop.create_task(append())
        self.run(asyncio.sleep(0.02))
        assert not t.waiting.done(), "the append should wait for the lock"

    @rule(i=st.sampled_from(TRANSACTIONS), commit=st.booleans())
    def end(self, i: int, commit: bool) -> None:
        if not self.idle(i):
            return
        t = self.open.pop(i)
        self.run(t.end(commit))
        if commit:
            self.committed.update(t.appended)
            self.committed_touches.update(t.touched)
        self.run(self._settle_waiters())

    async def _settle_waiters(self) -> None:
        """Appends that waited for a lock just released now go ahead (or wait for the next holder)."""
        waiting = [t.waiting for t in self.open.values() if t.waiting is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=0.5)
        for t in self.open.values():
            if t.waiting is not None and t.waiting.done():
                t.waiting.result()
                t.waiting = None

    @rule(name=st.sampled_from(STREAMS))
    def append_alone(self, name: str) -> None:
        """A plain append, its own transaction, committed at once."""
        if any(name in t.locks for t in self.open.values()):
            return
        event = NewEvent("Alone")
        self.run(self.store.append(self.stream(name), [event]))
        self.committed.add(event.event_id)

    # -- the reader ----------------------------------------------------------------------------------

    @invariant()
    def the_reader_sees_each_stream_in_order_without_gaps(self) -> None:
        new = self.run(_read_everything(self.store, self.category, self.checkpoint))
        if new:
            self.checkpoint = new[-1].checkpoint
        self.seen.extend(new)
        for stream, versions in _versions_by_stream(self.seen).items():
            assert versions == list(range(len(versions))), f"{stream} arrived as versions {versions}"
        ids = [e.event_id for e in self.seen]
        assert len(ids) == len(set(ids)), "an event was read twice"
        assert set(ids) <= self.committed, "an event was read that was not committed"

    async def _finish(self) -> None:
        """Commit what is still open, letting each append that waited for a lock go ahead in turn."""
        while self.open:
            for i in [i for i in self.open if self.idle(i)]:
                t = self.open.pop(i)
                await t.end(commit=True)
                self.committed.update(t.appended)
                self.committed_touches.update(t.touched)
            await self._settle_waiters()

    def teardown(self) -> None:
        try:
            if self.open:
                self.run(asyncio.wait_for(self._finish(), 30))
            self.run(self.store.wait_until_visible(self.run(self.store.last_committed())))
            self.the_reader_sees_each_stream_in_order_without_gaps()
            full = self.run(self.store.read_all(START, limit=10_000, category=self.category))
            assert [e.event_id for e in self.seen] == [e.event_id for e in full], "reading on differs from reading all"
            assert {e.event_id for e in full} == self.committed, "the log differs from what was committed"
            touches = self.run(self.store.read_all(START, limit=10_000, category=f"audit{self.category}"))
            assert {e.event_id for e in touches} == self.committed_touches
        finally:
            # After a failure, transactions may still be open: end them all, so no lock outlives the example.
            for t in self.open.values():
                if t.waiting is not None:
                    t.waiting.cancel()
            self.store.pool.terminate()
            with contextlib.suppress(Exception):
                self.run(self.store.stop())


def test_interleaved_transactions_keep_stream_order_and_skip_nothing(
    server_url: str, template_database: str
) -> None:
    loop = asyncio.new_event_loop()
    database = fresh_database(server_url, template_database)
    try:
        InterleavingMachine.url = loop.run_until_complete(database.__aenter__())
        InterleavingMachine.loop = loop
        machine_test = InterleavingMachine.TestCase()
        machine_test.settings = settings(
            max_examples=60, stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        machine_test.runTest()
    finally:
        loop.run_until_complete(database.__aexit__(None, None, None))
        loop.close()


@contextlib.asynccontextmanager
async def _writers(
    store: EventStore, streams: int, writers: int, rounds: int, seed: int
) -> AsyncIterator[set[uuid.UUID]]:
    """Writers whose transactions touch a stream of their own first (an early transaction id), sleep,
    then append to shared streams at the version they read, and sometimes roll back."""
    rng = random.Random(seed)
    committed: set[uuid.UUID] = set()

    async def writer(w: int) -> None:
        for n in range(rounds):
            events = [NewEvent("Shared", {"w": w, "n": n})]
            try:
                async with store.unit_of_work() as uow:
                    await uow.append(f"mine-{w}", [NewEvent("Mine")])
                    await asyncio.sleep(rng.random() * 0.01)
                    stream = f"shared-{rng.randrange(streams)}"
                    stored = await uow.read_stream(stream)
                    await uow.append(stream, events, expected_version(len(stored) - 1))
                    await asyncio.sleep(rng.random() * 0.005)
                    if rng.random() < 0.1:
                        raise _Rollback
            except _Rollback:
                continue
            except WrongExpectedVersion:  # a concurrent writer took the version: on to the next round
                continue
            committed.update(e.event_id for e in events)

    tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
    try:
        yield committed
    finally:
        await asyncio.gather(*tasks)


async def test_concurrent_writers_against_a_subscriber_keep_stream_order(store: EventStore) -> None:
    """Real concurrency beside the state machine: eight writers, two shared streams, a live subscriber."""
    received: list[RecordedEvent] = []
    async with store.subscribe(START, category="shared", batch_size=5, poll_interval=0.05) as sub:

        async def subscriber() -> None:
            async for batch in sub.batches():
                received.extend(batch)

        reader = asyncio.create_task(subscriber())
        async with _writers(store, streams=2, writers=8, rounds=25, seed=20261128) as committed:
            pass
        final = await store.last_committed()
        async with asyncio.timeout(30):
            while sub.checkpoint < final:  # noqa: ASYNC110 - the subscription has no "reached" event
                await asyncio.sleep(0.01)
        reader.cancel()
    assert {e.event_id for e in received} == committed
    for stream, versions in _versions_by_stream(received).items():
        assert versions == list(range(len(versions))), f"{stream} arrived as versions {versions}"
