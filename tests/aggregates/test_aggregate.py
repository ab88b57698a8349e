"""The aggregate base class and the given/when/then helpers, in memory."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from pydantic import BaseModel

from aggregates import (
    Aggregate,
    DomainEvent,
    EventRegistrationError,
    InvalidAggregateId,
    MissingHandler,
    applies,
)
from aggregates.testing import given
from tests.aggregates.domain import (
    Account,
    AccountAlreadyOpen,
    AccountClosed,
    AccountError,
    AccountNotOpen,
    AccountOpened,
    AccountState,
    Deposited,
    InsufficientFunds,
    InterestRateSet,
    Withdrawn,
)


def test_commands_emit_events() -> None:
    given(Account).when(lambda a: a.open("ann", overdraft_limit=50)).then(
        AccountOpened(owner="ann", overdraft_limit=50)
    )
    account = (
        given(Account, AccountOpened(owner="ann"), Deposited(amount=30))
        .when(lambda a: a.withdraw(20, memo="rent"))
        .then(Withdrawn(amount=20, memo="rent"))
    )
    assert account.state.balance == 10
    assert account.state.memos == ["rent"]
    assert account.version == 1  # the version loaded; the withdrawal is pending
    assert account.pending_events == (Withdrawn(amount=20, memo="rent"),)


def test_commands_reject_invalid_requests_without_emitting() -> None:
    given(Account).when(lambda a: a.deposit(5)).then_raises(AccountNotOpen)
    given(Account, AccountOpened(owner="ann")).when(lambda a: a.open("bob")).then_raises(AccountAlreadyOpen)
    given(Account, AccountOpened(owner="ann"), Deposited(amount=5)).when(lambda a: a.withdraw(6)).then_raises(
        InsufficientFunds, match="balance 5 does not cover 6"
    )
    given(Account, AccountOpened(owner="ann", overdraft_limit=10)).when(lambda a: a.withdraw(10)).then(
        Withdrawn(amount=10)
    )
    given(Account, AccountOpened(owner="ann"), Deposited(amount=1)).when(lambda a: a.close("done")).then_raises(
        AccountError, match="balance 1"
    )
    given(Account, AccountOpened(owner="ann"), AccountClosed(reason="x")).when(lambda a: a.deposit(1)).then_raises(
        AccountNotOpen
    )


def test_idempotent_command_emits_nothing() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    given(Account, AccountOpened(owner="ann"), InterestRateSet(rate=Decimal("0.015"), effective=when)).when(
        lambda a: a.set_interest(Decimal("0.015"), when)
    ).then_nothing()


def test_events_with_rich_types_round_trip_through_json() -> None:
    when = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
    account = (
        given(Account, AccountOpened(owner="zoë ✓"))
        .when(lambda a: a.set_interest(Decimal("0.0125"), when))
        .then(InterestRateSet(rate=Decimal("0.0125"), effective=when))
    )
    assert account.state.rate == Decimal("0.0125")


def test_stream_id_and_version_of_a_new_aggregate() -> None:
    account = Account("a-b-c")
    assert account.stream_id == "account-a-b-c"  # '-' in the id is fine: the category ends at the first one
    assert account.version == -1 and account.is_new and account.pending_events == ()
    account.open("ann")
    assert not account.is_new and account.version == -1


@pytest.mark.parametrize("bad", ["", "x\x00y", "x\ud800y", "x" * 300, 42, None])
def test_invalid_aggregate_id_is_a_typed_error(bad: object) -> None:
    with pytest.raises(InvalidAggregateId):
        Account(bad)  # type: ignore[arg-type]


def test_emitting_an_event_without_a_handler_changes_nothing() -> None:
    class Stray(DomainEvent):
        n: int

    class Careless(Account):
        def stray(self) -> None:
            self._emit(Stray(n=1))

    account = Careless.from_events("1", [AccountOpened(owner="ann")])
    before = account.state.model_copy(deep=True)
    with pytest.raises(MissingHandler, match="Stray"):
        account.stray()
    assert account.pending_events == () and account.state == before
    with pytest.raises(TypeError):
        account._emit("not an event")  # type: ignore[arg-type]


def test_replay_rejects_events_the_aggregate_does_not_handle() -> None:
    class Other(DomainEvent):
        pass

    with pytest.raises(MissingHandler):
        Account.from_events("1", [AccountOpened(owner="ann"), Other()])


def test_one_handler_per_event_type() -> None:
    with pytest.raises(EventRegistrationError, match="one handler per event type"):

        class Twice(Account):
            @applies(Deposited)
            def _a(self, event: Deposited) -> None:
                pass

            @applies(Deposited)
            def _b(self, event: Deposited) -> None:
                pass


def test_subclass_may_replace_a_handler() -> None:
    class DoubleCounting(Account):
        @applies(Deposited)
        def _deposited(self, event: Deposited) -> None:
            self.state.balance += 2 * event.amount

    account = DoubleCounting.from_events("1", [AccountOpened(owner="ann"), Deposited(amount=3)])
    assert account.state.balance == 6
    assert Account.from_events("1", [AccountOpened(owner="ann"), Deposited(amount=3)]).state.balance == 3


class _State(BaseModel):
    n: int = 0


@pytest.mark.parametrize("category", ["with-dash", "", 7])
def test_category_must_not_contain_a_dash(category: object) -> None:
    with pytest.raises(EventRegistrationError, match="category"):

        class Bad(Aggregate[_State], category=category):  # type: ignore[arg-type]
            pass


@pytest.mark.parametrize("every", [0, -1, True, "5"])
def test_snapshot_every_must_be_positive(every: object) -> None:
    with pytest.raises(EventRegistrationError, match="snapshot_every"):

        class Bad(Aggregate[_State], category="bad", snapshot_every=every):  # type: ignore[arg-type]
            pass


def test_aggregate_needs_a_state_model_and_a_category() -> None:
    with pytest.raises(EventRegistrationError, match="state model"):

        class NoState(Aggregate, category="nostate"):  # type: ignore[type-arg]
            pass

    class Abstract(Aggregate[_State]):
        pass

    with pytest.raises(EventRegistrationError, match="no category"):
        Abstract("1")


def test_applies_needs_an_event_class() -> None:
    with pytest.raises(EventRegistrationError):
        applies(int)  # type: ignore[type-var]
    with pytest.raises(EventRegistrationError):
        applies(DomainEvent)


def test_overriding_a_handler_method_without_the_decorator_still_replaces_it() -> None:
    class Tripling(Account):
        def _deposited(self, event: Deposited) -> None:
            self.state.balance += 3 * event.amount

    assert Tripling.from_events("1", [AccountOpened(owner="ann"), Deposited(amount=2)]).state.balance == 6


@pytest.mark.parametrize("bad", ["x\x00y", "x\ud800y"], ids=["nul", "surrogate"])
def test_a_category_or_event_type_postgresql_cannot_store_is_refused_where_it_is_declared(bad: str) -> None:
    with pytest.raises(EventRegistrationError):

        class Odd(Aggregate[AccountState], category=bad):
            pass

    with pytest.raises(EventRegistrationError):

        class Strange(DomainEvent, event_type=bad):
            n: int


def test_a_handler_reusing_an_inherited_handlers_name_for_another_event_type_is_refused() -> None:
    """Handlers are found by method name: the base class's event would go to the subclass's handler."""
    with pytest.raises(EventRegistrationError, match=r"_deposited applies Withdrawn.*the handler of Deposited"):

        class Confused(Account):
            @applies(Withdrawn)
            def _deposited(self, event: Withdrawn) -> None:
                self.state.balance -= event.amount

    class Doubling(Account):  # the same event type: an override, as before
        @applies(Deposited)
        def _deposited(self, event: Deposited) -> None:
            self.state.balance += 2 * event.amount

    assert Doubling.from_events("1", [AccountOpened(owner="ann"), Deposited(amount=2)]).state.balance == 4
