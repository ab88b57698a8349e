"""Typed events: stable names, schema versions, upcasting stored old payloads, unknown types."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from aggregates import (
    Aggregate,
    DomainEvent,
    EventDecodeError,
    EventRegistrationError,
    EventRegistry,
    MissingUpcaster,
    Repository,
    UnknownEventType,
    applies,
)
from eventstore import EventStore, NewEvent, RecordedEvent, StreamState
from tests.aggregates.domain import Account, AccountOpened, Deposited, InterestRateSet


class PriceQuoted(DomainEvent, version=3):
    """v1 stored {"total": dollars}; v2 {"total_cents"}; v3 added the currency."""

    total_cents: int
    currency: str


class QuoteState(BaseModel):
    quotes: list[tuple[int, str]] = []


class Quote(Aggregate[QuoteState], category="quote"):
    def quote(self, total_cents: int, currency: str) -> None:
        self._emit(PriceQuoted(total_cents=total_cents, currency=currency))

    @applies(PriceQuoted)
    def _quoted(self, event: PriceQuoted) -> None:
        self.state.quotes.append((event.total_cents, event.currency))


def quote_registry() -> EventRegistry:
    registry = EventRegistry()

    @registry.upcaster(PriceQuoted, from_version=1)
    def dollars_to_cents(data: dict[str, Any]) -> dict[str, Any]:
        return {"total_cents": round(data.pop("total") * 100)}

    @registry.upcaster("PriceQuoted", from_version=2)
    def add_currency(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "currency": "EUR"}

    return registry


def test_type_names_and_versions() -> None:
    class Renamed(DomainEvent, event_type="billing.invoice-sent", version=4):
        pass

    class ByClassVar(DomainEvent):
        event_type: ClassVar[str] = "by-classvar"
        schema_version: ClassVar[int] = 2

    class Child(ByClassVar):
        pass

    assert AccountOpened.event_type == "AccountOpened" and AccountOpened.schema_version == 1
    assert InterestRateSet.event_type == "account.interest-rate-set"
    assert (Renamed.event_type, Renamed.schema_version) == ("billing.invoice-sent", 4)
    assert (ByClassVar.event_type, ByClassVar.schema_version) == ("by-classvar", 2)
    assert (Child.event_type, Child.schema_version) == ("Child", 1)  # a subclass is another event


@pytest.mark.parametrize("kwargs", [{"event_type": ""}, {"event_type": 5}, {"version": 0}, {"version": "2"}])
def test_invalid_event_declarations(kwargs: dict[str, Any]) -> None:
    with pytest.raises(EventRegistrationError):

        class Bad(DomainEvent, **kwargs):
            pass


def test_events_are_immutable() -> None:
    event = Deposited(amount=1)
    with pytest.raises(ValueError):
        event.amount = 2  # type: ignore[misc]


def test_registration_conflicts() -> None:
    class Deposited(DomainEvent):  # same name as the domain's Deposited, another class
        cents: int

    from tests.aggregates import domain

    registry = EventRegistry(domain.Deposited)
    registry.register(domain.Deposited)  # the same class again is harmless
    with pytest.raises(EventRegistrationError, match=r"registered twice: .*domain\.py:\d+\).*test_events\.py:\d+\)"):
        registry.register(Deposited)
    with pytest.raises(EventRegistrationError):
        registry.register(int)  # type: ignore[arg-type]
    assert registry.event_class("Deposited") is domain.Deposited
    assert domain.Deposited in registry and Deposited not in registry and "Deposited" in registry
    with pytest.raises(UnknownEventType, match="Nope"):
        registry.event_class("Nope")


def test_upcaster_declarations_are_checked() -> None:
    registry = quote_registry()
    with pytest.raises(EventRegistrationError, match="already has an upcaster"):
        registry.add_upcaster(PriceQuoted, 1, lambda d: d)
    with pytest.raises(EventRegistrationError, match="not below the current"):
        registry.add_upcaster(PriceQuoted, 3, lambda d: d)
    with pytest.raises(EventRegistrationError, match=">= 1"):
        registry.add_upcaster(PriceQuoted, 0, lambda d: d)
    with pytest.raises(EventRegistrationError, match="callable"):
        registry.add_upcaster(PriceQuoted, 2, "nope")  # type: ignore[arg-type]
    early = EventRegistry()
    early.add_upcaster("PriceQuoted", 5, lambda d: d)  # by name before the class is known ...
    with pytest.raises(EventRegistrationError, match="not below the current"):
        early.register(PriceQuoted)  # ... and checked once it is


def test_a_refused_registration_keeps_the_upcasters_registered_by_name() -> None:
    registry = EventRegistry()
    first, second = (lambda d: {**d, "currency": "EUR"}), (lambda d: d)
    registry.add_upcaster("order.placed", 1, first)
    registry.add_upcaster("order.placed", 2, second)

    class TooLow(DomainEvent, event_type="order.placed", version=2):
        total: int

    class Placed(DomainEvent, event_type="order.placed", version=3):
        total: int
        currency: str

    with pytest.raises(EventRegistrationError, match="not below the current"):
        registry.register(TooLow)
    registry.register(Placed)
    assert registry.upcaster_versions("order.placed") == {1, 2}


async def test_stored_old_payloads_are_upcast_through_the_chain(store: EventStore) -> None:
    await store.append(
        "quote-1",
        [
            NewEvent("PriceQuoted", {"total": 12.5}),  # written before versions were recorded: v1
            NewEvent("PriceQuoted", {"total": 3}, metadata={"schema_version": 1}),
            NewEvent("PriceQuoted", {"total_cents": 700}, metadata={"schema_version": 2}),
        ],
        StreamState.NO_STREAM,
    )
    quotes = Repository(store, Quote, registry=quote_registry())
    quote = await quotes.get("1")
    quote.quote(990, "USD")
    await quotes.save(quote)

    stored = await store.read_stream("quote-1")
    assert stored[3].json() == {"total_cents": 990, "currency": "USD"}
    assert stored[3].meta() == {"schema_version": 3}
    loaded = await quotes.get("1")
    assert loaded.state.quotes == [(1250, "EUR"), (300, "EUR"), (700, "EUR"), (990, "USD")]
    assert loaded.version == 3
    assert await quotes.history("1") == [
        PriceQuoted(total_cents=1250, currency="EUR"),
        PriceQuoted(total_cents=300, currency="EUR"),
        PriceQuoted(total_cents=700, currency="EUR"),
        PriceQuoted(total_cents=990, currency="USD"),
    ]


async def test_a_gap_in_the_upcaster_chain_is_a_typed_error(store: EventStore) -> None:
    registry = EventRegistry()
    registry.add_upcaster(PriceQuoted, 2, lambda d: {**d, "currency": "EUR"})  # no v1 -> v2
    await store.append("quote-2", [NewEvent("PriceQuoted", {"total": 1}, metadata={"schema_version": 1})])
    with pytest.raises(MissingUpcaster, match="from v1 to v2") as info:
        await Repository(store, Quote, registry=registry).get("2")
    assert info.value.event_type == "PriceQuoted" and info.value.from_version == 1
    assert info.value.stream_id == "quote-2" and info.value.stream_version == 0


@pytest.mark.parametrize(
    ("data", "metadata", "match"),
    [
        ({"total_cents": 1}, {"schema_version": 3}, "currency: Field required"),
        ({"total_cents": "many", "currency": "EUR"}, {"schema_version": 3}, "total_cents"),
        ({"total_cents": 1, "currency": "EUR"}, {"schema_version": 4}, "newer schema"),
        ({"total_cents": 1, "currency": "EUR"}, {"schema_version": "3"}, "must be an int"),
        ({"total_cents": 1, "currency": "EUR"}, {"schema_version": 0}, "start at 1"),
        ({"amount": 1}, {"schema_version": 1}, "upcaster from v1 failed"),
        ({"total": 1}, {"schema_version": 2}, "total_cents: Field required"),
        ([1, 2], {"schema_version": 1}, "not a JSON object"),
    ],
)
async def test_undecodable_stored_events_are_typed_errors(
    store: EventStore, data: Any, metadata: dict[str, Any], match: str
) -> None:
    await store.append("quote-3", [NewEvent("PriceQuoted", data, metadata=metadata)])
    with pytest.raises(EventDecodeError, match=match) as info:
        await Repository(store, Quote, registry=quote_registry()).get("3")
    assert info.value.event_type == "PriceQuoted" and info.value.stream_id == "quote-3"


async def test_unknown_type_is_a_typed_error_unless_raw_is_asked_for(store: EventStore) -> None:
    accounts = Repository(store, Account)
    account = Account("7")
    account.open("ann")
    account.deposit(5)
    await accounts.save(account)
    await store.append("account-7", [NewEvent("AccountAudited", {"by": "eve"})], 1)

    with pytest.raises(UnknownEventType, match="'AccountAudited'") as info:
        await accounts.get("7")
    assert (info.value.event_type, info.value.stream_id, info.value.stream_version) == (
        "AccountAudited",
        "account-7",
        2,
    )
    with pytest.raises(UnknownEventType, match="AccountAudited"):
        await accounts.history("7")

    events = await accounts.history("7", raw_unknown=True)
    assert events[:2] == [AccountOpened(owner="ann"), Deposited(amount=5)]
    raw = events[2]
    assert isinstance(raw, RecordedEvent) and raw.event_type == "AccountAudited" and raw.json() == {"by": "eve"}


async def test_stored_json_is_the_models_json(store: EventStore) -> None:
    accounts = Repository(store, Account)
    account = Account("8")
    account.open("ann", overdraft_limit=3)
    await accounts.save(account, metadata={"user": "ops"}, correlation_id="c-1")
    (stored,) = await store.read_stream("account-8")
    assert stored.event_type == "AccountOpened"
    assert stored.json() == {"owner": "ann", "overdraft_limit": 3}
    assert stored.meta() == {"schema_version": 1, "user": "ops", "correlation_id": "c-1"}
    assert accounts.registry.decode(stored) == AccountOpened(owner="ann", overdraft_limit=3)


def test_encoding_an_unregistered_event_is_refused() -> None:
    registry = EventRegistry(AccountOpened)
    with pytest.raises(UnknownEventType, match="Deposited"):
        registry.encode(Deposited(amount=1))
    with pytest.raises(EventRegistrationError):
        registry.encode("not an event")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["event_type", "schema_version", "personal_fields", "stored_by_alias"])
def test_a_field_named_like_a_framework_class_attribute_is_refused(name: str) -> None:
    """Such a field would replace the stored type name or schema version the framework reads off the class."""
    with warnings.catch_warnings(), pytest.raises(EventRegistrationError, match=f"field {name!r}"):
        warnings.simplefilter("ignore")  # pydantic's warning that the field shadows the attribute
        type("Shadowing", (DomainEvent,), {"__annotations__": {name: str, "title": str}})
