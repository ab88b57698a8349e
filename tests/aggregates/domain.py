"""A small bank account domain used by the aggregate tests."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from pydantic import BaseModel

from aggregates import Aggregate, DomainEvent, applies


class AccountError(Exception):
    """Base of the domain's own errors."""


class AccountNotOpen(AccountError):
    pass


class AccountAlreadyOpen(AccountError):
    pass


class InsufficientFunds(AccountError):
    def __init__(self, balance: int, amount: int) -> None:
        super().__init__(f"balance {balance} does not cover {amount}")


class AccountOpened(DomainEvent):
    owner: str
    overdraft_limit: int = 0


class Deposited(DomainEvent):
    amount: int
    memo: str = ""


class Withdrawn(DomainEvent):
    amount: int
    memo: str = ""


class InterestRateSet(DomainEvent, event_type="account.interest-rate-set"):
    rate: Decimal
    effective: datetime


class AccountClosed(DomainEvent):
    reason: str


class AccountState(BaseModel):
    owner: str | None = None
    open: bool = False
    closed: bool = False
    balance: int = 0
    overdraft_limit: int = 0
    rate: Decimal = Decimal(0)
    movements: int = 0
    memos: list[str] = []


class Account(Aggregate[AccountState], category="account"):
    def open(self, owner: str, overdraft_limit: int = 0) -> None:
        if self.state.open or self.state.closed:
            raise AccountAlreadyOpen(self.id)
        if not owner:
            raise ValueError("owner must not be empty")
        if overdraft_limit < 0:
            raise ValueError("overdraft limit must not be negative")
        self._emit(AccountOpened(owner=owner, overdraft_limit=overdraft_limit))

    def deposit(self, amount: int, memo: str = "") -> None:
        self._require_open()
        if amount <= 0:
            raise ValueError("amount must be positive")
        self._emit(Deposited(amount=amount, memo=memo))

    def withdraw(self, amount: int, memo: str = "") -> None:
        self._require_open()
        if amount <= 0:
            raise ValueError("amount must be positive")
        if self.state.balance - amount < -self.state.overdraft_limit:
            raise InsufficientFunds(self.state.balance, amount)
        self._emit(Withdrawn(amount=amount, memo=memo))

    def set_interest(self, rate: Decimal, effective: datetime) -> None:
        self._require_open()
        if rate == self.state.rate:
            return
        self._emit(InterestRateSet(rate=rate, effective=effective))

    def close(self, reason: str) -> None:
        self._require_open()
        if self.state.balance != 0:
            raise AccountError(f"cannot close with balance {self.state.balance}")
        self._emit(AccountClosed(reason=reason))

    def _require_open(self) -> None:
        if not self.state.open:
            raise AccountNotOpen(self.id)

    @applies(AccountOpened)
    def _opened(self, event: AccountOpened) -> None:
        self.state.owner = event.owner
        self.state.open = True
        self.state.overdraft_limit = event.overdraft_limit

    @applies(Deposited)
    def _deposited(self, event: Deposited) -> None:
        self.state.balance += event.amount
        self.state.movements += 1
        if event.memo:
            self.state.memos.append(event.memo)

    @applies(Withdrawn)
    def _withdrawn(self, event: Withdrawn) -> None:
        self.state.balance -= event.amount
        self.state.movements += 1
        if event.memo:
            self.state.memos.append(event.memo)

    @applies(InterestRateSet)
    def _rate_set(self, event: InterestRateSet) -> None:
        self.state.rate = event.rate

    @applies(AccountClosed)
    def _closed(self, event: AccountClosed) -> None:
        self.state.open = False
        self.state.closed = True


class SnapshottedAccount(Account, snapshot_every=5):
    """The same account, snapshotted every 5 events."""
