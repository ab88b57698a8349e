"""Routing rules and the append hook: messages commit (or roll back) with the events that cause them."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from eventstore import EventStore, NewEvent, RecordedEvent, StreamState
from outbox import InvalidRoute, Outbox, Relay, Route, RoutingError, slot_of
from outbox.schema import SLOT_COUNT
from tests.outbox.conftest import Collector, relay_settings


async def _rows(store: EventStore) -> list[Any]:
    return list(await store.pool.fetch("SELECT * FROM outbox ORDER BY id"))


async def test_matching_events_become_messages_with_everything_the_relay_needs(store: EventStore) -> None:
    Outbox([Route("orders", ["OrderPlaced", "OrderShipped"])], source="/shop").install(store)
    correlation, causation = uuid.uuid4(), uuid.uuid4()
    placed = NewEvent("OrderPlaced", {"total": 5}, correlation_id=correlation, causation_id=causation)
    result = await store.append("order-1", [placed, NewEvent("OrderShipped", {"by": "post"})])
    rows = await _rows(store)
    assert [(r["topic"], r["key"], r["event_type"], r["stream_version"]) for r in rows] == [
        ("orders", "order-1", "OrderPlaced", 0),
        ("orders", "order-1", "OrderShipped", 1),
    ]
    first = rows[0]
    assert first["event_id"] == placed.event_id
    assert first["source"] == "/shop" and first["stream_id"] == "order-1"
    assert first["data"] == '{"total":5}'
    assert first["correlation_id"] == str(correlation) and first["causation_id"] == str(causation)
    assert first["recorded_at"] == result.events[0].recorded_at
    assert first["slot"] == slot_of("order-1") and 0 <= first["slot"] < SLOT_COUNT
    assert first["published_at"] is None and first["dead_at"] is None and first["attempts"] == 0


async def test_events_no_route_matches_produce_no_message(store: EventStore) -> None:
    Outbox([Route("orders", ["OrderPlaced"], category="order")]).install(store)
    await store.append("order-1", [NewEvent("OrderNoted")])
    await store.append("invoice-1", [NewEvent("OrderPlaced")])
    assert await _rows(store) == []
    await store.append("order-2", [NewEvent("OrderPlaced")])
    assert [r["stream_id"] for r in await _rows(store)] == ["order-2"]


async def test_every_matching_route_fans_out_with_its_own_key(store: EventStore) -> None:
    def by_customer(event: RecordedEvent) -> str:
        return f"customer-{event.json()['customer']}"

    Outbox([Route("orders", category="order"), Route("billing", ["OrderPlaced"], key=by_customer)]).install(store)
    await store.append("order-9", [NewEvent("OrderPlaced", {"customer": 7}), NewEvent("OrderNoted")])
    rows = await _rows(store)
    assert sorted((r["topic"], r["key"], r["event_type"]) for r in rows) == [
        ("billing", "customer-7", "OrderPlaced"),
        ("orders", "order-9", "OrderNoted"),
        ("orders", "order-9", "OrderPlaced"),
    ]
    billing = next(r for r in rows if r["topic"] == "billing")
    assert billing["slot"] == slot_of("customer-7")


async def test_rolled_back_unit_of_work_leaves_no_message(store: EventStore) -> None:
    Outbox([Route("orders")]).install(store)

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        async with store.unit_of_work() as uow:
            await uow.append("order-1", [NewEvent("OrderPlaced")])
            assert len(await uow.connection.fetch("SELECT 1 FROM outbox")) == 1  # written, not committed
            raise Abort
    assert await _rows(store) == []
    assert await store.stream_version("order-1") == -1


async def test_an_idempotent_retry_of_an_append_writes_no_second_message(store: EventStore) -> None:
    Outbox([Route("orders")]).install(store)
    event = NewEvent("OrderPlaced", {"n": 1})
    await store.append("order-1", [event], StreamState.NO_STREAM)
    again = await store.append("order-1", [event], StreamState.NO_STREAM)
    assert again.duplicate
    assert len(await _rows(store)) == 1


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (lambda e: "", "returned ''"),
        (lambda e: 42, "returned 42"),
        (lambda e: "a\x00b", "without NUL"),
        (lambda e: e.json()["missing"], "raised KeyError"),
    ],
)
async def test_a_failing_key_function_is_a_typed_error_and_writes_nothing(
    store: EventStore, key: Any, reason: str
) -> None:
    Outbox([Route("orders", key=key)]).install(store)
    with pytest.raises(RoutingError, match=reason) as caught:
        await store.append("order-1", [NewEvent("OrderPlaced", {})])
    assert caught.value.topic == "orders" and caught.value.stream_id == "order-1"
    assert await store.stream_version("order-1") == -1
    assert await _rows(store) == []


@pytest.mark.parametrize(
    "build",
    [
        lambda: Route(""),
        lambda: Route("has space"),
        lambda: Route("x" * 250),
        lambda: Route(".."),
        lambda: Route("orders", "OrderPlaced"),
        lambda: Route("orders", []),
        lambda: Route("orders", [""]),
        lambda: Route("orders", category=""),
        lambda: Route("orders", key="stream_id"),  # type: ignore[arg-type]
        lambda: Outbox(Route("orders")),  # type: ignore[arg-type]
        lambda: Outbox([Route("orders")], source=""),
    ],
)
def test_malformed_routes_are_rejected_when_built(build: Any) -> None:
    with pytest.raises(InvalidRoute):
        build()


async def test_rollback_publishes_nothing(
    outbox_store: EventStore, database_url: str, kafka: str, collector: Collector
) -> None:
    rolled_back = NewEvent("OrderPlaced", {"n": "rolled back"})
    with pytest.raises(RuntimeError):
        async with outbox_store.unit_of_work() as uow:
            await uow.append("order-1", [rolled_back])
            raise RuntimeError("abort")
    committed = NewEvent("OrderPlaced", {"n": "committed"})
    await outbox_store.append("order-1", [committed])
    async with Relay(database_url, kafka, relay_settings()):
        await collector.wait_count(1)
    # Same key, so a published rolled-back message would sit before the committed one in one partition.
    assert [e.id for e in collector.events()] == [str(committed.event_id)]
