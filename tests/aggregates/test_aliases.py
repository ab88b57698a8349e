"""Aliased event fields: a class whose fields cannot all be read back by name is stored by alias (as its JSON
Schema then names them), so its events load, sealed fields too; any other class is stored by name, as always."""

from __future__ import annotations

from typing import Annotated, Any

import asyncpg
import orjson
import pytest
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from aggregates import Aggregate, DomainEvent, EventRegistrationError, EventRegistry, PersonalData, Repository, applies
from aggregates.testing import given
from eventstore import REDACTED, EventStore, MasterKey, NewEvent, asyncpg_dsn
from eventstore_contracts import event_schema

KEY = MasterKey(b"a" * 32)


def stored(new: NewEvent) -> Any:
    return orjson.loads(orjson.dumps(new.data))


class CustomerRegistered(DomainEvent):
    customer_id: str = Field(alias="customerId")
    email: Annotated[str, PersonalData(subject="customer_id")] = Field(alias="eMail")
    plan: str = "basic"


class CamelCased(DomainEvent):
    model_config = ConfigDict(frozen=True, alias_generator=to_camel, populate_by_name=True)
    order_id: str
    line_count: int


def test_the_stored_json_uses_the_aliases_the_schema_names() -> None:
    registry = EventRegistry(CustomerRegistered, CamelCased)
    new = registry.encode(CustomerRegistered(customerId="c1", eMail="ann@mail.example"))
    assert stored(new) == {"customerId": "c1", "eMail": "ann@mail.example", "plan": "basic"}
    assert set(stored(new)) == set(event_schema(CustomerRegistered)["properties"])
    assert new.personal_data == {"eMail": "c1"}  # the key the store seals is the stored one
    camel = registry.encode(CamelCased(order_id="o1", line_count=2))
    assert stored(camel) == {"order_id": "o1", "line_count": 2}  # readable by name: stored as it always was
    assert set(stored(camel)) == set(event_schema(CamelCased)["properties"])
    assert (CustomerRegistered.stored_by_alias, CamelCased.stored_by_alias) == (True, False)


async def test_aliased_events_round_trip_through_the_store_and_seal_by_alias(database_url: str) -> None:
    registry = EventRegistry(CustomerRegistered, CamelCased)
    event = CustomerRegistered(customerId="c1", eMail="ann@mail.example")
    async with EventStore(database_url, keys=KEY) as store:
        camel = CamelCased(order_id="o", line_count=1)
        await store.append("customer-c1", [registry.encode(event), registry.encode(camel)])
        assert [registry.decode(e) for e in await store.read_stream("customer-c1")] == [event, camel]
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:  # sealed at rest: the address never reaches the events table
            assert not await conn.fetch("SELECT 1 FROM events WHERE data::text LIKE '%ann@mail%'")
        finally:
            await conn.close()
        await store.forget("c1")
        (forgotten, _) = await store.read_stream("customer-c1")
        assert forgotten.json()["eMail"] == REDACTED
        assert registry.decode(forgotten) == CustomerRegistered(customerId="c1", eMail=REDACTED)


def test_a_field_stored_under_a_key_it_is_not_read_by_is_refused() -> None:
    class OnlyWritten(DomainEvent):  # stored by name (the class is), read by name: fine, as before
        total: int = Field(serialization_alias="sum")

    assert stored(EventRegistry(OnlyWritten).encode(OnlyWritten(total=1))) == {"total": 1}

    with pytest.raises(EventRegistrationError, match=r"Mixed\.total: stored as 'sum' but read back from 'total'"):

        class Mixed(DomainEvent):  # stored by alias (for `id`): `total` would be stored as 'sum', read as 'total'
            id: str = Field(alias="Id")
            total: int = Field(serialization_alias="sum")

    with pytest.raises(EventRegistrationError, match=r"OnlyRead\.total: stored as 'total' but read back from 'sum'"):

        class OnlyRead(DomainEvent):
            total: int = Field(validation_alias="sum")

    class Choices(DomainEvent):  # reads the stored key among others: fine
        total: int = Field(validation_alias=AliasChoices("sum", "total"))

    assert stored(EventRegistry(Choices).encode(Choices(sum=1))) == {"total": 1}


class Money(BaseModel):
    amount_cents: int = Field(alias="amountCents")


class Paid(DomainEvent):
    money: Money
    refunds: list[Money] | None = None
    by_day: dict[str, tuple[Money, int]] = {}


class TillState(BaseModel):
    total: int = 0


class Till(Aggregate[TillState], category="till"):
    def pay(self, cents: int) -> None:
        money = Money(amountCents=cents)
        self._emit(Paid(money=money, refunds=[money], by_day={"mon": (money, 1)}))

    @applies(Paid)
    def _paid(self, event: Paid) -> None:
        self.state.total += event.money.amount_cents + sum(m.amount_cents for m in event.refunds or [])


async def test_aliases_of_nested_models_are_stored_as_they_are_read(store: EventStore) -> None:
    """One `by_alias` covers the whole dump: a nested model read only by alias makes the event stored by alias."""
    assert Paid.stored_by_alias
    tills = Repository(store, Till)
    await tills.execute("t1", lambda t: t.pay(5), create=True)
    (recorded,) = await store.read_stream("till-t1")
    assert recorded.json()["money"] == {"amountCents": 5}
    assert recorded.json()["by_day"] == {"mon": [{"amountCents": 5}, 1]}
    assert (await tills.execute("t1", lambda t: t.pay(1))).state.total == 12
    assert (await tills.get("t1")).state.total == 12
    given(Till).when(lambda t: t.pay(5)).then(
        Paid(money=Money(amountCents=5), refunds=[Money(amountCents=5)], by_day={"mon": (Money(amountCents=5), 1)})
    )


def test_a_nested_field_stored_under_a_key_it_is_not_read_by_is_refused() -> None:
    class Written(BaseModel):
        total: int = Field(serialization_alias="sum")

    with pytest.raises(EventRegistrationError, match=r"Written\.total \(in event \S*Both\): stored as 'sum'"):

        class Both(DomainEvent):  # stored by alias (for `id`): the nested `total` would be stored as 'sum'
            id: str = Field(alias="Id")
            lines: list[Written | None]
