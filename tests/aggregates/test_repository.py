"""Repository against real PostgreSQL: load/save, concurrency, units of work, retries, temporal loads."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import BaseModel

from aggregates import Aggregate, AggregateNotFound, DomainEvent, EventRegistry, InvalidAggregateId, Repository, applies
from aggregates.testing import given, round_trip
from eventstore import (
    EventSerializationError,
    EventStore,
    InvalidArgument,
    NewEvent,
    StreamArchived,
    StreamTombstoned,
    WrongExpectedVersion,
    lifecycle,
)
from tests.aggregates.domain import Account, AccountNotOpen, AccountOpened, Deposited, InsufficientFunds, Withdrawn

UTC_PLUS_1 = timezone(timedelta(hours=1))


def opened(aggregate_id: str, *deposits: int) -> Account:
    account = Account(aggregate_id)
    account.open("ann")
    for amount in deposits:
        account.deposit(amount)
    return account


async def test_save_then_get(store: EventStore) -> None:
    accounts = Repository(store, Account)
    account = opened("a-1", 10, 20)
    result = await accounts.save(account)
    assert result is not None and result.next_expected_version == 2 and result.stream_id == "account-a-1"
    assert account.version == 2 and account.pending_events == ()

    loaded = await accounts.get("a-1")
    assert loaded.version == 2 and loaded.pending_events == ()
    assert loaded.state == account.state and loaded.state.balance == 30
    assert [e.event_type for e in await store.read_stream("account-a-1")] == ["AccountOpened", "Deposited", "Deposited"]

    loaded.withdraw(5)
    await accounts.save(loaded)
    assert (await accounts.get("a-1")).state.balance == 25


async def test_save_with_nothing_pending_writes_nothing(store: EventStore) -> None:
    accounts = Repository(store, Account)
    account = opened("1")
    await accounts.save(account)
    assert await accounts.save(account) is None
    assert await store.stream_version("account-1") == 0


async def test_missing_aggregate_is_a_typed_error(store: EventStore) -> None:
    accounts = Repository(store, Account)
    with pytest.raises(AggregateNotFound) as info:
        await accounts.get("nobody")
    assert info.value.aggregate_id == "nobody" and info.value.stream_id == "account-nobody"
    with pytest.raises(InvalidAggregateId):
        await accounts.get("")


async def test_save_of_another_type_is_refused(store: EventStore) -> None:
    from tests.aggregates.test_events import Quote

    with pytest.raises(TypeError, match="saves Account"):
        await Repository(store, Account).save(Quote("1"))  # type: ignore[arg-type]


async def test_concurrent_save_raises_and_writes_nothing(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("1", 100))
    first, second = await accounts.get("1"), await accounts.get("1")
    first.withdraw(60)
    second.withdraw(70)
    await accounts.save(first)
    with pytest.raises(WrongExpectedVersion) as info:
        await accounts.save(second)
    assert (info.value.stream_id, info.value.expected, info.value.actual) == ("account-1", 1, 2)
    assert second.version == 1 and second.pending_events == (Withdrawn(amount=70),)  # untouched
    assert [e.json() for e in await store.read_stream("account-1", 2)] == [{"amount": 60, "memo": ""}]
    assert (await accounts.get("1")).state.balance == 40


async def test_racing_saves_let_exactly_one_win(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("1"))
    copies = [await accounts.get("1") for _ in range(6)]
    for i, copy in enumerate(copies):
        copy.deposit(i + 1)
    results = await asyncio.gather(*(accounts.save(c) for c in copies), return_exceptions=True)
    assert sum(r is not None and not isinstance(r, BaseException) for r in results) == 1
    assert sum(isinstance(r, WrongExpectedVersion) for r in results) == 5
    assert await store.stream_version("account-1") == 1

    news = [opened("2", i + 1) for i in range(4)]
    results = await asyncio.gather(*(accounts.save(n) for n in news), return_exceptions=True)
    assert sum(isinstance(r, WrongExpectedVersion) for r in results) == 3
    assert await store.stream_version("account-2") == 1


@pytest.mark.parametrize("memo", ["nul \x00 inside", "lone \ud800 surrogate"], ids=["nul", "surrogate"])
async def test_unstorable_event_is_refused_before_writing(store: EventStore, memo: str) -> None:
    accounts = Repository(store, Account)
    account = opened("1")
    await accounts.save(account)
    account.deposit(5, memo=memo)
    with pytest.raises(EventSerializationError):
        await accounts.save(account)
    assert await store.stream_version("account-1") == 0
    assert account.version == 0 and len(account.pending_events) == 1


async def test_save_joins_a_unit_of_work(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await store.pool.execute("CREATE TABLE transfers (id text PRIMARY KEY, amount int NOT NULL)")
    await accounts.save(opened("from", 100))
    await accounts.save(opened("to"))

    async def transfer(transfer_id: str, amount: int, fail: bool = False) -> None:
        source, target = await accounts.get("from"), await accounts.get("to")
        source.withdraw(amount)
        target.deposit(amount)
        async with store.unit_of_work() as uow:
            await accounts.save(source, uow=uow, correlation_id=transfer_id)
            await accounts.save(target, uow=uow, correlation_id=transfer_id)
            await uow.connection.execute("INSERT INTO transfers VALUES ($1, $2)", transfer_id, amount)
            if fail:
                raise RuntimeError("abort")

    await transfer("t1", 30)
    with pytest.raises(RuntimeError):
        await transfer("t2", 50, fail=True)
    assert (await accounts.get("from")).state.balance == 70
    assert (await accounts.get("to")).state.balance == 30
    assert await store.pool.fetch("SELECT id, amount FROM transfers") == [("t1", 30)]
    (last,) = await store.read_stream("account-to", 1)
    assert last.correlation_id == "t1"


async def test_a_conflict_inside_a_unit_of_work_rolls_back_every_save(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("a", 10))
    await accounts.save(opened("b", 10))
    a, b = await accounts.get("a"), await accounts.get("b")
    stale_b = await accounts.get("b")
    b.deposit(1)
    await accounts.save(b)
    a.deposit(1)
    stale_b.deposit(2)
    with pytest.raises(WrongExpectedVersion):
        async with store.unit_of_work() as uow:
            await accounts.save(a, uow=uow)
            await accounts.save(stale_b, uow=uow)
    assert await store.stream_version("account-a") == 1  # a's event rolled back with the unit of work


async def test_execute_loads_runs_and_saves(store: EventStore) -> None:
    accounts = Repository(store, Account)
    with pytest.raises(AggregateNotFound):
        await accounts.execute("1", lambda a: a.open("ann"))
    created = await accounts.execute("1", lambda a: a.open("ann"), create=True)
    assert created.version == 0
    account = await accounts.execute("1", lambda a: a.deposit(9), causation_id="cmd-1")
    assert account.version == 1 and account.state.balance == 9
    (deposit,) = await store.read_stream("account-1", 1)
    assert deposit.causation_id == "cmd-1"
    with pytest.raises(InsufficientFunds):
        await accounts.execute("1", lambda a: a.withdraw(100))
    with pytest.raises(AccountNotOpen):
        await accounts.execute("2", lambda a: a.deposit(1), create=True)
    assert await store.stream_version("account-1") == 1
    assert await store.stream_version("account-2") == -1
    with pytest.raises(ValueError, match="retries"):
        await accounts.execute("1", lambda a: a.deposit(1), retries=-1)


async def test_execute_reloads_and_retries_after_a_conflict(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("1", 50))
    attempts = 0

    async def withdraw_racing_once(account: Account) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:  # another writer gets in between our load and our save
            rival = await accounts.get("1")
            rival.withdraw(30)
            await accounts.save(rival)
        account.withdraw(20)

    account = await accounts.execute("1", withdraw_racing_once, retries=1)
    assert attempts == 2
    assert account.state.balance == 0 and account.version == 3
    assert (await accounts.get("1")).state.balance == 0


async def test_execute_gives_up_after_the_retries(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("1"))
    attempts = 0

    async def always_raced(account: Account) -> None:
        nonlocal attempts
        attempts += 1
        await store.append("account-1", [NewEvent("Deposited", {"amount": 1}, {"schema_version": 1})])
        account.deposit(1000)

    with pytest.raises(WrongExpectedVersion):
        await accounts.execute("1", always_raced, retries=2)
    assert attempts == 3
    loaded = await accounts.get("1")
    assert loaded.state.balance == 3 and loaded.version == 3  # only the rival's writes landed


async def test_concurrent_commands_all_apply_exactly_once(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("1"))
    amounts = list(range(1, 9))
    await asyncio.gather(*(accounts.execute("1", lambda a, n=n: a.deposit(n), retries=10) for n in amounts))
    loaded = await accounts.get("1")
    assert loaded.state.balance == sum(amounts) and loaded.version == len(amounts)


async def test_load_as_of_a_version(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("1", 1, 2, 3, 4))
    history = await accounts.history("1")
    for version in range(5):
        past = await accounts.get("1", version=version)
        assert past.version == version
        assert past.state == Account.from_events("1", history[: version + 1]).state
    with pytest.raises(AggregateNotFound, match="at version 5") as info:
        await accounts.get("1", version=5)
    assert info.value.version == 5
    for bad in (-1, True, "2", 2**64):
        with pytest.raises(ValueError, match="version must be an int"):
            await accounts.get("1", version=bad)  # type: ignore[arg-type]

    past = await accounts.get("1", version=2)
    past.deposit(100)
    with pytest.raises(WrongExpectedVersion):
        await accounts.save(past)  # a historical aggregate cannot rewrite history


async def test_load_as_of_a_time(store: EventStore) -> None:
    accounts = Repository(store, Account)
    account = opened("1", 5)
    await accounts.save(account)
    account.deposit(7)
    await accounts.save(account)
    account.withdraw(2)
    await accounts.save(account)
    times = [e.recorded_at for e in await store.read_stream("account-1")]
    assert times[0] == times[1] < times[2] < times[3]

    assert (await accounts.get("1", as_of=times[1])).state.balance == 5
    middle = await accounts.get("1", as_of=times[2] + (times[3] - times[2]) / 2)
    assert middle.state.balance == 12 and middle.version == 2
    assert (await accounts.get("1", as_of=times[3] + timedelta(days=1))).state.balance == 10
    with pytest.raises(AggregateNotFound, match="as of"):
        await accounts.get("1", as_of=times[0] - timedelta(microseconds=1))
    with pytest.raises(ValueError, match="timezone"):
        await accounts.get("1", as_of=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="not both"):
        await accounts.get("1", version=1, as_of=times[1])


async def test_ids_may_contain_dashes(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("eu-west-42", 3))
    assert (await accounts.get("eu-west-42")).state.balance == 3
    assert [s for s, _ in await store.list_streams(category="account")] == ["account-eu-west-42"]
    assert (await accounts.history("eu-west-42"))[0] == AccountOpened(owner="ann")
    assert (await accounts.history("eu-west-42"))[1] == Deposited(amount=3)


class Ranked(DomainEvent):
    scores: dict[str, int]  # in ranking order, as emitted


class Board(BaseModel):
    leader: str = ""


class Race(Aggregate[Board], category="race"):
    def rank(self, scores: dict[str, int]) -> None:
        self._emit(Ranked(scores=scores))

    @applies(Ranked)
    def _ranked(self, event: Ranked) -> None:
        self.state.leader = next(iter(event.scores))


async def test_the_state_after_a_command_is_the_state_after_a_reload_dict_order_included(store: EventStore) -> None:
    """jsonb gives an event's dicts back in its own key order: the command's handlers see that order too."""
    races = Repository(store, Race)
    after_command = await races.execute("r1", lambda r: r.rank({"zoe": 3, "al": 1}), create=True)
    assert list((await store.read_stream("race-r1"))[0].json()["scores"]) == ["al", "zoe"]
    assert after_command.pending_events == () and after_command.state.leader == "al"
    assert (await races.get("r1")).state.leader == "al"
    outcome = given(Race).when(lambda r: r.rank({"zoe": 3, "al": 1}))
    assert outcome.then(Ranked(scores={"zoe": 3, "al": 1})).state.leader == "al"
    decoded = round_trip(EventRegistry(Ranked), Ranked(scores={"zoe": 3, "al": 1, "b": 0}))
    assert isinstance(decoded, Ranked) and list(decoded.scores.items()) == [("b", 0), ("al", 1), ("zoe", 3)]


@pytest.mark.parametrize("retire", ["archive", "delete"])
async def test_creating_an_aggregate_on_a_retired_stream_is_refused_without_retries(
    store: EventStore, retire: str
) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("1"))
    if retire == "archive":
        await lifecycle.archive(store, "account-1")
    else:
        await lifecycle.delete(store, ["account-1"], reason="spam")
    runs: list[int] = []

    def open_again(account: Account) -> None:
        runs.append(1)
        account.open("bob")

    with pytest.raises(StreamArchived if retire == "archive" else StreamTombstoned, match="account-1"):
        await accounts.execute("1", open_again, create=True, retries=5)
    assert runs == [1]


async def test_bad_arguments_are_typed_errors_and_change_nothing(store: EventStore) -> None:
    accounts = Repository(store, Account)
    await accounts.save(opened("1"))
    with pytest.raises(InvalidArgument, match="Aggregate subclass"):
        Repository(store, 42)  # type: ignore[type-var]
    with pytest.raises(InvalidArgument, match="EventRegistry"):
        Repository(store, Account, registry="x")  # type: ignore[arg-type]
    account = await accounts.get("1")
    account.deposit(1)
    with pytest.raises(InvalidArgument, match="UnitOfWork"):
        await accounts.save(account, uow="x")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="callable"):
        await accounts.execute("1", "not callable")  # type: ignore[arg-type]
    for late in (datetime.max.replace(tzinfo=timezone(timedelta(hours=-1))), datetime.min.replace(tzinfo=UTC_PLUS_1)):
        with pytest.raises(InvalidArgument, match="as_of"):
            await accounts.get("1", as_of=late)
    with pytest.raises(InvalidArgument, match="RecordedEvent"):
        accounts.registry.decode("x")  # type: ignore[call-overload]
    for odd in (["x"], None):
        with pytest.raises(InvalidArgument, match="event type"):
            accounts.registry.event_class(odd)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="event type"):
            accounts.registry.upcaster_versions(odd)  # type: ignore[arg-type]
    assert await store.stream_version("account-1") == 0 and account.version == 0
