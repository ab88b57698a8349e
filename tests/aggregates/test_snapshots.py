"""Snapshots: cadence, tail-only loads, stale and unreadable snapshots ignored, atomic with a unit of work."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel, Field, PrivateAttr, field_validator

from aggregates import Aggregate, AggregateNotFound, DomainEvent, Repository, SnapshotError, applies
from eventstore import Direction, EventPayload, EventStore, RecordedEvent
from tests.aggregates.domain import Account, Deposited, SnapshottedAccount


class RecordingStore(EventStore):
    """The real store, noting which stream versions each load actually read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[int | None, int]] = []

    async def read_stream(
        self,
        stream_id: str,
        from_version: int | None = None,
        *,
        direction: Direction = Direction.FORWARDS,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        events = await super().read_stream(stream_id, from_version, direction=direction, limit=limit)
        self.reads.append((from_version, len(events)))
        return events

    async def read_stream_payloads(
        self, stream_id: str, from_version: int = 0, *, limit: int | None = None
    ) -> list[EventPayload]:
        payloads = await super().read_stream_payloads(stream_id, from_version, limit=limit)
        self.reads.append((from_version, len(payloads)))
        return payloads


@pytest.fixture
async def recording(database_url: str) -> AsyncIterator[RecordingStore]:
    async with RecordingStore(database_url) as store:
        yield store


def deposits(account: Account, count: int) -> None:
    for _ in range(count):
        account.deposit(1)


async def test_snapshots_every_n_events_and_loads_read_only_the_tail(recording: RecordingStore) -> None:
    accounts = Repository(recording, SnapshottedAccount)
    account = SnapshottedAccount("1")
    account.open("ann")
    deposits(account, 3)
    await accounts.save(account)  # versions 0..3: four events, no snapshot yet
    assert await recording.load_snapshot("account-1") is None

    deposits(account, 1)
    await accounts.save(account)  # version 4: the fifth event
    snapshot = await recording.load_snapshot("account-1")
    assert snapshot is not None and snapshot.stream_version == 4
    assert (
        snapshot.snapshot_type == "SnapshottedAccount" and snapshot.schema_version == SnapshottedAccount.snapshot_tag()
    )

    deposits(account, 7)
    await accounts.save(account)  # versions 5..11 cross 10: snapshot of the state after the save
    snapshot = await recording.load_snapshot("account-1")
    assert snapshot is not None and snapshot.stream_version == 11

    deposits(account, 2)
    await accounts.save(account)  # versions 12, 13: no new interval crossed
    snapshot = await recording.load_snapshot("account-1")
    assert snapshot is not None and snapshot.stream_version == 11

    recording.reads.clear()
    loaded = await accounts.get("1")
    assert recording.reads == [(12, 2)]  # only the two events after the snapshot were read
    assert loaded.version == 13 and loaded.state.balance == 13

    full = await Repository(recording, Account).get("1")  # same stream, no snapshots: full replay
    assert recording.reads[-1] == (0, 14)
    assert full.state == loaded.state and full.version == loaded.version


async def test_temporal_loads_use_only_snapshots_not_past_the_version(recording: RecordingStore) -> None:
    accounts = Repository(recording, SnapshottedAccount)
    account = SnapshottedAccount("1")
    account.open("ann")
    deposits(account, 13)
    await accounts.save(account)  # snapshot at 13
    recording.reads.clear()
    assert (await accounts.get("1", version=13)).state.balance == 13
    assert (await accounts.get("1", version=3)).state.balance == 3
    assert recording.reads == [(0, 4)]  # version 13 came from the snapshot alone; version 3 replayed
    with pytest.raises(AggregateNotFound, match="at version 14"):
        await accounts.get("1", version=14)


def counter_class(state: type[BaseModel], **options: Any) -> type[Aggregate[Any]]:
    class Counted(DomainEvent):
        by: int

    class Counter(Aggregate[state], category="counter", snapshot_every=2, **options):  # type: ignore[valid-type, misc]
        def count(self, by: int) -> None:
            self._emit(Counted(by=by))

        @applies(Counted)
        def _counted(self, event: Counted) -> None:
            self.state.n += event.by
            if "last" in type(self.state).model_fields:
                self.state.last = event.by

    return Counter


class CountV1(BaseModel):
    n: int = 0


class CountV2(BaseModel):
    n: int = 0
    last: int = 0


async def test_a_changed_state_class_ignores_stale_snapshots(recording: RecordingStore) -> None:
    old, new = counter_class(CountV1), counter_class(CountV2)
    assert old.__name__ == new.__name__ and old.snapshot_tag() != new.snapshot_tag()
    old_counters: Repository[Any] = Repository(recording, old)
    counter = old("1")
    for by in (1, 2, 3, 4):
        counter.count(by)  # type: ignore[attr-defined]
    await old_counters.save(counter)
    assert (await recording.load_snapshot("counter-1")).stream_version == 3  # type: ignore[union-attr]

    recording.reads.clear()
    new_counters: Repository[Any] = Repository(recording, new)
    loaded = await new_counters.get("1")
    assert recording.reads == [(0, 4)]  # the old snapshot was not used
    assert loaded.state == CountV2(n=10, last=4)

    recording.reads.clear()
    assert (await old_counters.get("1")).state == CountV1(n=10)
    assert recording.reads == [(4, 0)]  # the old class still reads its own snapshot


async def test_bumping_snapshot_version_ignores_old_snapshots(recording: RecordingStore) -> None:
    before, after = counter_class(CountV1), counter_class(CountV1, snapshot_version=2)
    assert before.snapshot_tag() != after.snapshot_tag()
    counter = before("1")
    counter.count(5)  # type: ignore[attr-defined]
    counter.count(6)  # type: ignore[attr-defined]
    await Repository(recording, before).save(counter)
    recording.reads.clear()
    assert (await Repository(recording, after).get("1")).state == CountV1(n=11)
    assert recording.reads == [(0, 2)]


async def test_an_unreadable_snapshot_is_ignored(recording: RecordingStore, caplog: pytest.LogCaptureFixture) -> None:
    accounts = Repository(recording, SnapshottedAccount)
    account = SnapshottedAccount("1")
    account.open("ann")
    deposits(account, 5)
    await accounts.save(account)
    await recording.save_snapshot(
        "account-1", "SnapshottedAccount", SnapshottedAccount.snapshot_tag(), 5, '{"balance": "lots"}'
    )
    recording.reads.clear()
    with caplog.at_level(logging.WARNING, logger="aggregates.repository"):
        loaded = await accounts.get("1")
    assert "unreadable snapshot" in caplog.text
    assert recording.reads == [(0, 6)] and loaded.state.balance == 5


async def test_a_snapshot_saved_in_a_unit_of_work_rolls_back_with_it(store: EventStore) -> None:
    accounts = Repository(store, SnapshottedAccount)
    account = SnapshottedAccount("1")
    account.open("ann")
    deposits(account, 4)
    with pytest.raises(RuntimeError):
        async with store.unit_of_work() as uow:
            await accounts.save(account, uow=uow)
            raise RuntimeError("abort")
    assert await store.load_snapshot("account-1") is None
    assert await store.stream_version("account-1") == -1

    account = SnapshottedAccount("1")
    account.open("ann")
    deposits(account, 4)
    async with store.unit_of_work() as uow:
        await accounts.save(account, uow=uow)
    snapshot = await store.load_snapshot("account-1")
    assert snapshot is not None and snapshot.stream_version == 4


async def test_a_failed_snapshot_write_does_not_fail_the_save(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    await store.pool.execute("DROP TABLE snapshots")
    accounts = Repository(store, SnapshottedAccount)
    for aggregate_id in ("plain", "in-uow"):
        account = SnapshottedAccount(aggregate_id)
        account.open("ann")
        deposits(account, 4)
        with caplog.at_level(logging.WARNING, logger="aggregates.repository"):
            if aggregate_id == "plain":
                await accounts.save(account)
            else:
                async with store.unit_of_work() as uow:
                    await accounts.save(account, uow=uow)
        assert account.version == 4 and await store.stream_version(f"account-{aggregate_id}") == 4
    assert caplog.text.count("not saved") == 2


async def test_take_snapshot(recording: RecordingStore) -> None:
    accounts = Repository(recording, SnapshottedAccount)
    account = SnapshottedAccount("1")
    with pytest.raises(SnapshotError, match="save"):
        await accounts.take_snapshot(account)
    account.open("ann")
    deposits(account, 2)
    with pytest.raises(SnapshotError, match="save"):
        await accounts.take_snapshot(account)
    await accounts.save(account)
    await accounts.take_snapshot(account)
    recording.reads.clear()
    assert (await accounts.get("1")).state.balance == 2
    assert recording.reads == [(3, 0)]
    with pytest.raises(SnapshotError, match="does not use snapshots"):
        await Repository(recording, Account).take_snapshot(Account("1"))
    with pytest.raises(TypeError):
        await accounts.take_snapshot(Account("1"))  # type: ignore[arg-type]


class NoteState(BaseModel):
    note: str = ""


class Noted(DomainEvent):
    length: int


class Notebook(Aggregate[NoteState], category="notebook", snapshot_every=1):
    """Its state holds a NUL character, which PostgreSQL cannot store, though its events can be."""

    def note(self, length: int) -> None:
        self._emit(Noted(length=length))

    @applies(Noted)
    def _noted(self, event: Noted) -> None:
        self.state.note = "\x00" * event.length


async def test_unstorable_state_skips_the_snapshot_not_the_save(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    notebooks = Repository(store, Notebook)
    notebook = Notebook("1")
    notebook.note(3)
    with caplog.at_level(logging.WARNING, logger="aggregates.repository"):
        await notebooks.save(notebook)
    assert "NUL" in caplog.text
    assert await store.stream_version("notebook-1") == 0 and await store.load_snapshot("notebook-1") is None
    with pytest.raises(SnapshotError, match="NUL"):
        await notebooks.take_snapshot(notebook)
    assert (await notebooks.get("1")).state.note == "\x00\x00\x00"


class CounterState(BaseModel):
    seen: Any = None  # a set here reads back from JSON as a list
    hidden: int = Field(default=0, exclude=True)
    _count: int = PrivateAttr(default=0)
    raw: bytes = b""


class Counted(DomainEvent):
    tag: str
    hexdata: str = ""


class Counter(Aggregate[CounterState], category="counter", snapshot_every=1):
    def count(self, tag: str, hexdata: str = "") -> None:
        self._emit(Counted(tag=tag, hexdata=hexdata))

    @applies(Counted)
    def _counted(self, event: Counted) -> None:
        self.state.seen = {event.tag}
        self.state.hidden += 1
        self.state._count += 1
        self.state.raw = bytes.fromhex(event.hexdata)


@pytest.mark.parametrize("hexdata", ["", "ff"], ids=["reads-back-different", "no-json-form"])
async def test_a_state_that_would_load_differently_from_a_snapshot_is_not_snapshotted(
    store: EventStore, caplog: pytest.LogCaptureFixture, hexdata: str
) -> None:
    """A snapshot load must equal a replay: excluded and private fields, or a set in an untyped field, do
    not survive JSON; bytes that are not UTF-8 have no JSON form (the save failed on them)."""
    counters = Repository(store, Counter)
    counter = Counter("1")
    counter.count("t1", hexdata)
    with caplog.at_level(logging.WARNING, logger="aggregates.repository"):
        await counters.save(counter)
    assert "not snapshotting" in caplog.text
    assert await store.load_snapshot("counter-1") is None
    loaded = await counters.get("1")
    assert loaded.state == counter.state and loaded.state.hidden == 1
    with pytest.raises(SnapshotError):
        await counters.take_snapshot(loaded)


class Joined(DomainEvent):
    who: str


class Served(DomainEvent):
    who: str


class Line(BaseModel):
    waiting: dict[str, int] = {}  # name -> ticket, in arrival order


class Queue(Aggregate[Line], category="queue", snapshot_every=3):
    def join(self, who: str) -> None:
        self._emit(Joined(who=who))

    def serve_next(self) -> None:
        self._emit(Served(who=next(iter(self.state.waiting))))  # first come, first served

    @applies(Joined)
    def _joined(self, event: Joined) -> None:
        self.state.waiting[event.who] = len(self.state.waiting)

    @applies(Served)
    def _served(self, event: Served) -> None:
        del self.state.waiting[event.who]


async def test_a_state_whose_dict_order_jsonb_would_change_is_not_snapshotted(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """jsonb orders object keys (shorter first, then bytewise): a snapshot of a dict in another order would
    load in jsonb's, and a command iterating it would decide otherwise than after a replay."""
    queues = Repository(store, Queue)
    with caplog.at_level(logging.WARNING, logger="aggregates.repository"):
        for who in ["zoe", "bob", "al"]:
            await queues.execute("q1", lambda q, w=who: q.join(w), create=True)  # type: ignore[misc]
    assert "not snapshotting" in caplog.text and await store.load_snapshot("queue-q1") is None
    loaded = await queues.get("q1")
    assert list(loaded.state.waiting) == ["zoe", "bob", "al"]
    with pytest.raises(SnapshotError, match="key order"):
        await queues.take_snapshot(loaded)
    served = await queues.execute("q1", lambda q: q.serve_next())
    assert served.pending_events == () and (await queues.history("q1"))[-1] == Served(who="zoe")

    for who in ["al", "bob", "zoe"]:  # already in jsonb's order: snapshotted as before
        await queues.execute("q2", lambda q, w=who: q.join(w), create=True)  # type: ignore[misc]
    snapshot = await store.load_snapshot("queue-q2")
    assert snapshot is not None and snapshot.stream_version == 2
    assert list((await queues.get("q2")).state.waiting) == ["al", "bob", "zoe"]


async def test_a_snapshot_past_the_streams_end_is_refused_and_ignored(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A save in a unit of work that rolled back leaves the aggregate counting as saved: a snapshot of it
    would be past the stream's end. `take_snapshot` refuses it, the store keeps none sent past the end,
    and a load ignores one (stored by an older version of the store)."""
    accounts = Repository(store, SnapshottedAccount)
    account = SnapshottedAccount("1")
    account.open("ann")
    await accounts.save(account)
    account.deposit(1000)
    with pytest.raises(RuntimeError):
        async with store.unit_of_work() as uow:
            await accounts.save(account, uow=uow)
            raise RuntimeError("the rest of the unit of work failed")
    with pytest.raises(SnapshotError, match="past the stream's end"):
        await accounts.take_snapshot(account)  # at version 1: the stream ends at 0
    assert await store.load_snapshot("account-1") is None
    data = account.state.model_dump_json()
    await store.save_snapshot("account-1", "SnapshottedAccount", SnapshottedAccount.snapshot_tag(), 1, data)
    assert await store.load_snapshot("account-1") is None
    async with store.connection() as conn:  # as an older store kept it
        await conn.execute(
            "INSERT INTO snapshots (stream_id, snapshot_type, schema_version, stream_version, data)"
            " VALUES ($1, $2, $3, 1, $4)",
            "account-1", "SnapshottedAccount", SnapshottedAccount.snapshot_tag(), data,
        )
    with caplog.at_level(logging.WARNING, logger="aggregates.repository"):
        loaded = await accounts.get("1")
    assert "past the stream's end" in caplog.text
    assert (loaded.version, loaded.state.balance) == (0, 0)
    with pytest.raises(AggregateNotFound):
        await accounts.get("1", version=1)


class Picky(BaseModel):
    balance: int = 0

    @field_validator("balance", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> Any:
        if not isinstance(value, int):
            raise TypeError("a balance is a whole number")  # pydantic passes a TypeError through
        return value


class PickyAccount(Aggregate[Picky], category="picky", snapshot_every=1):
    def deposit(self, amount: int) -> None:
        self._emit(Deposited(amount=amount))

    @applies(Deposited)
    def _deposited(self, event: Deposited) -> None:
        self.state.balance += event.amount


async def test_a_snapshot_whose_validator_raises_a_type_error_is_ignored(
    store: EventStore, caplog: pytest.LogCaptureFixture
) -> None:
    accounts = Repository(store, PickyAccount)
    await accounts.execute("1", lambda a: a.deposit(3), create=True)
    await store.save_snapshot("picky-1", "PickyAccount", PickyAccount.snapshot_tag(), 0, '{"balance": "x"}')
    with caplog.at_level(logging.WARNING, logger="aggregates.repository"):
        loaded = await accounts.get("1")
    assert "unreadable snapshot" in caplog.text and loaded.state.balance == 3
