"""Event-sourced aggregates on the event store: typed events, repositories, snapshots, upcasting.

    class Deposited(DomainEvent):
        amount: int

    class AccountState(BaseModel):
        balance: int = 0

    class Account(Aggregate[AccountState], category="account", snapshot_every=100):
        def deposit(self, amount: int) -> None:
            if amount <= 0:
                raise ValueError("amount must be positive")
            self._emit(Deposited(amount=amount))

        @applies(Deposited)
        def _deposited(self, event: Deposited) -> None:
            self.state.balance += event.amount

    accounts = Repository(store, Account)
    await accounts.execute("42", lambda a: a.deposit(10), retries=3)

Decisions across streams (dynamic consistency boundaries) live in `aggregates.decisions`; given/when/then
test helpers in `aggregates.testing`.
"""

from aggregates.aggregate import Aggregate, applies
from aggregates.decisions import Decide, DecisionProjection, Decisions, DecisionState
from aggregates.errors import (
    AggregateError,
    AggregateNotFound,
    DuplicateEventType,
    EventDecodeError,
    EventRegistrationError,
    InvalidAggregateId,
    MissingHandler,
    MissingUpcaster,
    SnapshotError,
    UnknownEventType,
)
from aggregates.events import SCHEMA_VERSION_KEY, DomainEvent, EventRegistry, PersonalData, Upcaster
from aggregates.repository import Command, Repository

__all__ = [
    "SCHEMA_VERSION_KEY",
    "Aggregate",
    "AggregateError",
    "AggregateNotFound",
    "Command",
    "Decide",
    "DecisionProjection",
    "DecisionState",
    "Decisions",
    "DomainEvent",
    "DuplicateEventType",
    "EventDecodeError",
    "EventRegistrationError",
    "EventRegistry",
    "InvalidAggregateId",
    "MissingHandler",
    "MissingUpcaster",
    "PersonalData",
    "Repository",
    "SnapshotError",
    "UnknownEventType",
    "Upcaster",
    "applies",
]
