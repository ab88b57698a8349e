"""The relay's CloudEvents name the schema version that shaped their data (`ce_dataschema`)."""

from __future__ import annotations

import dataclasses

import jsonschema
import pytest

from eventstore import EventStore, NewEvent
from eventstore_contracts import Contracts, standalone_schema
from eventstore_examples.shop.app import APP
from eventstore_examples.shop.domain import OrderLine, OrderPlaced
from outbox import InvalidRoute, InvalidSettings, Outbox, Relay, RelaySettings, Route
from outbox.cloudevents import DATASCHEMA, DataSchemas, from_record
from tests.outbox.conftest import Collector, create_topic, relay_settings

TEMPLATE = "https://schemas.example.com/{source}/{type}/v{version}.json"


async def test_typed_events_carry_the_uri_of_their_schema_and_raw_ones_none(store: EventStore, kafka: str) -> None:
    topic = await create_topic(kafka)
    await Outbox([Route(topic, category="order")], source="shop").declare(store)
    placed = OrderPlaced(customer="c1", lines=[OrderLine(sku="s1", quantity=2, price=5)], total=10)
    await store.append("order-1", [APP.registry.encode(placed)])
    await store.append("order-2", [NewEvent("OrderNoted", {"note": "untyped"})])
    collector = Collector(kafka, topic)
    await collector.start()
    try:
        async with Relay(store, kafka, relay_settings(dataschema=TEMPLATE)):
            await collector.wait_count(2)
    finally:
        await collector.stop()
    events = {event.type: event for event in map(from_record, collector.records)}
    assert events["OrderPlaced"].dataschema == "https://schemas.example.com/shop/OrderPlaced/v1.json"
    assert events["OrderNoted"].dataschema is None, "no schema version, no dataschema"

    # The URI is the `$id` of the exported schema, and the payload validates against that schema.
    contracts = dataclasses.replace(Contracts.of(APP), source="shop", dataschema=TEMPLATE)
    schema = standalone_schema(contracts, "OrderPlaced", 1, contracts.events["OrderPlaced"].schema)
    assert schema["$id"] == events["OrderPlaced"].dataschema
    jsonschema.Draft202012Validator(schema).validate(events["OrderPlaced"].json())


def test_the_default_template_matches_the_exported_ids() -> None:
    assert RelaySettings().dataschema == DATASCHEMA
    expected = Contracts.of(APP).schema_id("OrderPlaced", 3)
    assert DataSchemas(DATASCHEMA).uri("examples.shop", "OrderPlaced", "3") == expected
    assert expected == "urn:eventstore:examples.shop:OrderPlaced:v3"
    assert DataSchemas(DATASCHEMA).uri("a b/c", "Odd/Type", "1") == "urn:eventstore:a%20b%2Fc:Odd%2FType:v1"
    assert DataSchemas(DATASCHEMA).uri("s", "T", "true") is None, "a version that is no number names no schema"
    assert DataSchemas(None).uri("s", "T", "1") is None


@pytest.mark.parametrize("template", ["https://x/{type}.json", "https://x/{type}/{version}/{tenant}", "{type}{version"])
def test_a_template_without_type_and_version_is_refused(template: str) -> None:
    with pytest.raises(InvalidSettings, match="dataschema"):
        RelaySettings(dataschema=template)


def test_a_route_promises_one_of_the_known_compatibilities() -> None:
    assert Route("t", ["A"]).compatibility == "backward"
    assert Route("t", ["A"], compatibility="full").compatibility == "full"
    with pytest.raises(InvalidRoute, match="compatibility must be one of backward, forward, full, none"):
        Route("t", ["A"], compatibility="sideways")  # type: ignore[arg-type]


def test_a_dataschema_uri_names_the_folder_the_export_writes() -> None:
    from eventstore_contracts import schema_folder
    from outbox.cloudevents import dataschema_uri

    for event_type in (".", "..", ".hidden", "Order/Placed", "a.b", "Ünïcode"):
        uri = dataschema_uri("https://s.example/{type}/v{version}.json", "shop", event_type, 1)
        assert uri == f"https://s.example/{schema_folder(event_type)}/v1.json"
        assert "/./" not in uri and "/../" not in uri
