"""Routes in the database: messages commit (or roll back) with the events that cause them, whoever writes."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from typing import Any

import pytest

from eventstore import AppendRefused, EventStore, NewEvent, StreamState
from outbox import InvalidRoute, Outbox, Relay, Route
from outbox.schema import SLOT_COUNT
from tests.outbox.conftest import Collector, relay_settings

_ROWS = """
SELECT o.*, e.event_id, e.event_type, e.stream_id, e.stream_version
FROM outbox AS o JOIN events AS e USING (position)
ORDER BY o.id
"""


async def _rows(store: EventStore) -> list[Any]:
    return list(await store.pool.fetch(_ROWS))


async def test_matching_events_become_messages_in_the_events_transaction(store: EventStore) -> None:
    await Outbox([Route("orders", ["OrderPlaced", "OrderShipped"])], source="/shop").declare(store)
    placed = NewEvent("OrderPlaced", {"total": 5})
    result = await store.append("order-1", [placed, NewEvent("OrderShipped", {"by": "post"})])
    rows = await _rows(store)
    assert [(r["topic"], r["key"], r["event_type"], r["stream_version"]) for r in rows] == [
        ("orders", "order-1", "OrderPlaced", 0),
        ("orders", "order-1", "OrderShipped", 1),
    ]
    first = rows[0]
    assert first["event_id"] == placed.event_id and first["source"] == "/shop"
    assert (first["log_xid"], first["position"]) == result.events[0].checkpoint
    assert first["recorded_at"] == result.events[0].recorded_at
    assert 0 <= first["slot"] < SLOT_COUNT
    assert first["published_at"] is None and first["dead_at"] is None and first["attempts"] == 0


async def test_a_key_always_lands_in_the_same_slot(store: EventStore) -> None:
    await Outbox([Route("orders"), Route("copies", key="data.copy_of")]).declare(store)
    await store.append("order-1", [NewEvent("OrderPlaced", {"copy_of": "order-2"})])
    await store.append("order-2", [NewEvent("OrderPlaced", {"copy_of": "order-1"})])
    slots = {(r["topic"], r["key"]): r["slot"] for r in await _rows(store)}
    assert slots["orders", "order-1"] == slots["copies", "order-1"]
    assert slots["orders", "order-2"] == slots["copies", "order-2"]


async def test_declaring_replaces_the_routes_of_every_writer(store: EventStore) -> None:
    assert await Outbox([Route("orders")]).declare(store)
    assert not await Outbox([Route("orders")]).declare(store), "the same declaration changes nothing"
    await store.append("order-1", [NewEvent("OrderPlaced")])
    assert await Outbox([Route("shipments", category="order")], source="/v2").declare(store)
    await store.append("order-1", [NewEvent("OrderShipped")])
    assert [(r["topic"], r["event_type"], r["source"]) for r in await _rows(store)] == [
        ("orders", "OrderPlaced", "eventstore"),
        ("shipments", "OrderShipped", "/v2"),
    ]
    assert await Outbox([]).declare(store)
    await store.append("order-1", [NewEvent("OrderCancelled")])
    assert len(await _rows(store)) == 2


async def test_a_process_that_imported_only_the_event_store_writes_the_messages(
    store: EventStore, database_url: str
) -> None:
    """Routes live in the database: a script that never heard of the outbox still writes its messages."""
    await Outbox([Route("orders", ["OrderPlaced"])]).declare(store)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from eventstore import EventStore, NewEvent

        async def main():
            async with EventStore({database_url!r}) as store:
                await store.append("order-7", [NewEvent("OrderPlaced", {{"n": 1}}), NewEvent("OrderNoted")])
                async with store.unit_of_work() as uow:
                    await uow.append("order-8", [NewEvent("OrderPlaced")])
            assert not any(name.startswith(("outbox", "projections", "aggregates")) for name in sys.modules)

        asyncio.run(main())
        """
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert [(r["stream_id"], r["event_type"]) for r in await _rows(store)] == [
        ("order-7", "OrderPlaced"),
        ("order-8", "OrderPlaced"),
    ]


async def test_events_no_route_matches_produce_no_message(store: EventStore) -> None:
    await Outbox([Route("orders", ["OrderPlaced"], category="order")]).declare(store)
    await store.append("order-1", [NewEvent("OrderNoted")])
    await store.append("invoice-1", [NewEvent("OrderPlaced")])
    assert await _rows(store) == []
    await store.append("order-2", [NewEvent("OrderPlaced")])
    assert [r["stream_id"] for r in await _rows(store)] == ["order-2"]


async def test_every_matching_route_fans_out_with_its_own_key(store: EventStore) -> None:
    await Outbox(
        [Route("orders", category="order"), Route("billing", ["OrderPlaced"], key="data.customer.id"),
         Route("tenants", ["OrderPlaced"], key="metadata.tenant")]
    ).declare(store)
    await store.append(
        "order-9",
        [NewEvent("OrderPlaced", {"customer": {"id": 7}}, metadata={"tenant": "acme"}), NewEvent("OrderNoted")],
    )
    rows = await _rows(store)
    assert sorted((r["topic"], r["key"], r["event_type"]) for r in rows) == [
        ("billing", "7", "OrderPlaced"),
        ("orders", "order-9", "OrderNoted"),
        ("orders", "order-9", "OrderPlaced"),
        ("tenants", "acme", "OrderPlaced"),
    ]


async def test_rolled_back_unit_of_work_leaves_no_message(store: EventStore) -> None:
    await Outbox([Route("orders")]).declare(store)

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
    await Outbox([Route("orders")]).declare(store)
    event = NewEvent("OrderPlaced", {"n": 1})
    await store.append("order-1", [event], StreamState.NO_STREAM)
    again = await store.append("order-1", [event], StreamState.NO_STREAM)
    assert again.duplicate
    assert len(await _rows(store)) == 1


@pytest.mark.parametrize(
    ("data", "meta"),
    [({}, {}), ({"customer": None}, {}), ({"customer": ""}, {}), ({"customer": {"name": "x"}}, {})],
)
async def test_an_event_without_its_key_is_refused_and_writes_nothing(
    store: EventStore, data: dict[str, Any], meta: dict[str, Any]
) -> None:
    await Outbox([Route("orders", key="data.customer.id")]).declare(store)
    with pytest.raises(AppendRefused, match=r"data\.customer\.id") as caught:
        await store.append("order-1", [NewEvent("OrderPlaced", data, metadata=meta)])
    assert caught.value.stream_id == "order-1" and "orders" in caught.value.reason
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
        lambda: Route("orders", key="stream_id"),
        lambda: Route("orders", key="data"),
        lambda: Route("orders", key="data..x"),
        lambda: Route("orders", key=lambda e: e.stream_id),  # type: ignore[arg-type]
        lambda: Outbox(Route("orders")),  # type: ignore[arg-type]
        lambda: Outbox([Route("orders")], source=""),
        lambda: Route("orders", types=123),  # type: ignore[arg-type]
        lambda: Route("orders", types=[["a"]]),  # type: ignore[list-item]
        lambda: Route("orders", ["Order\x00Placed"]),
        lambda: Route("orders", category="or\x00der"),
        lambda: Route("orders", key="data.c\x00"),
        lambda: Outbox(None),  # type: ignore[arg-type]
        # One message per event and topic: a second route to a topic would never get its messages written.
        lambda: Outbox([Route("orders", ["OrderPlaced"]), Route("orders", ["OrderPlaced"], key="data.c")]),
    ],
)
def test_malformed_routes_are_rejected_when_built(build: Any) -> None:
    with pytest.raises(InvalidRoute):
        build()


async def test_rollback_publishes_nothing(
    outbox_store: EventStore, kafka: str, collector: Collector
) -> None:
    rolled_back = NewEvent("OrderPlaced", {"n": "rolled back"})
    with pytest.raises(RuntimeError):
        async with outbox_store.unit_of_work() as uow:
            await uow.append("order-1", [rolled_back])
            raise RuntimeError("abort")
    committed = NewEvent("OrderPlaced", {"n": "committed"})
    await outbox_store.append("order-1", [committed])
    async with Relay(outbox_store, kafka, relay_settings()):
        await collector.wait_count(1)
    # Same key, so a published rolled-back message would sit before the committed one in one partition.
    assert [e.id for e in collector.events()] == [str(committed.event_id)]


async def test_a_route_selects_events_by_tag(store: EventStore) -> None:
    await Outbox([
        Route("course-7", ["StudentSubscribed"], tag="course:7", key="metadata.tags.1"),
        Route("all-subscriptions", ["StudentSubscribed"]),
    ]).declare(store)
    for student, course in [("ann", 7), ("bob", 8)]:
        await store.append(f"subscription-{student}", [NewEvent(
            "StudentSubscribed", {"student": student}, tags=[f"course:{course}", f"student:{student}"]
        )])
    rows = await _rows(store)
    assert sorted((r["topic"], r["key"]) for r in rows) == [
        ("all-subscriptions", "subscription-ann"), ("all-subscriptions", "subscription-bob"),
        ("course-7", "student:ann"),
    ]
    with pytest.raises(InvalidRoute):
        Route("t", tag="")
    assert not await Outbox([
        Route("course-7", ["StudentSubscribed"], tag="course:7", key="metadata.tags.1"),
        Route("all-subscriptions", ["StudentSubscribed"]),
    ]).declare(store), "the same routes again change nothing"
