"""The given/when/then helpers catch what they promise to catch."""

from __future__ import annotations

import pytest
from pydantic import Field

from aggregates import DomainEvent, EventRegistry, applies
from aggregates.testing import given, round_trip
from tests.aggregates.domain import Account, AccountNotOpen, AccountOpened, Deposited


def test_then_reports_different_events() -> None:
    outcome = given(Account, AccountOpened(owner="ann")).when(lambda a: a.deposit(5))
    with pytest.raises(AssertionError, match="emitted events differ"):
        outcome.then(Deposited(amount=6))
    with pytest.raises(AssertionError, match="emitted events differ"):
        outcome.then()
    assert outcome.then(Deposited(amount=5)).state.balance == 5


def test_then_reports_an_unexpected_error() -> None:
    outcome = given(Account).when(lambda a: a.deposit(5))
    with pytest.raises(AssertionError, match="AccountNotOpen"):
        outcome.then(Deposited(amount=5))
    with pytest.raises(AssertionError, match="expected ValueError"):
        outcome.then_raises(ValueError)
    with pytest.raises(AssertionError, match="does not match"):
        outcome.then_raises(AccountNotOpen, match="elsewhere")
    assert isinstance(outcome.then_raises(AccountNotOpen), AccountNotOpen)


def test_then_raises_reports_success() -> None:
    with pytest.raises(AssertionError, match="succeeded"):
        given(Account, AccountOpened(owner="ann")).when(lambda a: a.deposit(1)).then_raises(ValueError)


def test_then_raises_reports_events_emitted_before_the_error() -> None:
    def deposit_then_fail(account: Account) -> None:
        account.deposit(1)
        raise RuntimeError("half done")

    with pytest.raises(AssertionError, match="after emitting"):
        given(Account, AccountOpened(owner="ann")).when(deposit_then_fail).then_raises(RuntimeError)


def test_then_catches_state_changed_outside_handlers() -> None:
    class Sneaky(Account):
        def deposit(self, amount: int, memo: str = "") -> None:
            super().deposit(amount, memo)
            self.state.balance += 1000  # not through an event: lost on the next load

    with pytest.raises(AssertionError, match="outside its event handlers"):
        given(Sneaky, AccountOpened(owner="ann")).when(lambda a: a.deposit(1)).then(Deposited(amount=1))


def test_then_catches_events_that_do_not_survive_json() -> None:
    class Noted(DomainEvent):
        note: str = Field("", exclude=True)

    class Noting(Account):
        def note(self, text: str) -> None:
            self._emit(Noted(note=text))

        @applies(Noted)
        def _noted(self, event: Noted) -> None:
            pass

    with pytest.raises(AssertionError, match="does not survive"):
        given(Noting, AccountOpened(owner="ann")).when(lambda a: a.note("hi")).then(Noted(note="hi"))


def test_async_commands_are_refused() -> None:
    async def command(account: Account) -> None:
        account.deposit(1)

    given(Account, AccountOpened(owner="ann")).when(command).then_raises(TypeError, match="synchronous")


def test_given_history_goes_through_json() -> None:
    registry = EventRegistry(Deposited)
    assert round_trip(registry, Deposited(amount=3, memo="é")) == Deposited(amount=3, memo="é")
