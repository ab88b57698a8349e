"""The AsyncAPI document: valid AsyncAPI 3.0 (the official JSON Schema, checked with `jsonschema`), and complete."""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID

import jsonschema
from pydantic import BaseModel, Field

from aggregates import DomainEvent, EventRegistry
from eventstore_app import Application
from eventstore_contracts import Contracts, asyncapi_document, locked
from outbox import Route

ASYNCAPI_SCHEMA = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.schema.json"


@cache
def validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))


def errors_of(document: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator().iter_errors(document)]


class Line(BaseModel):
    sku: str
    price: int


class Placed(DomainEvent, event_type="OrderPlaced"):
    customer: str
    lines: list[Line]


class v2:
    """A namespace: the same class name `Line`, another shape; both must survive in one document."""

    class Line(BaseModel):
        sku: str
        price: int
        currency: str


class PlacedV2(DomainEvent, event_type="OrderPlaced", version=2):
    customer_id: str
    lines: list[v2.Line]


class Paid(DomainEvent, event_type="PaymentCaptured"):
    amount: int
    customer_id: str


def document() -> dict[str, Any]:
    before = Application("billing", registry=EventRegistry(Placed, Paid), routes=[Route("orders", ["OrderPlaced"])])
    registry = EventRegistry(PlacedV2, Paid)
    registry.add_upcaster(PlacedV2, 1, lambda d: {"customer_id": d["customer"], "lines": d["lines"]})
    now = Application(
        "billing",
        registry=registry,
        routes=[
            Route("orders", ["OrderPlaced", "OrderNoted"]),
            Route("payments", ["PaymentCaptured"], key="data.customer_id", compatibility="full"),
        ],
        source="/billing",
    )
    return asyncapi_document(Contracts.of(now), locked(Contracts.of(before)), version="2.1.0",
                             servers={"local": "127.0.0.1:9092"})


def test_the_document_is_valid_asyncapi_3() -> None:
    generated = document()
    assert errors_of(generated) == []
    assert generated["asyncapi"] == "3.0.0" and generated["info"]["version"] == "2.1.0"


def test_the_validator_is_not_vacuous() -> None:
    broken = document()
    broken["operations"]["publish.orders"]["action"] = "publish"  # AsyncAPI 2 wording
    del broken["channels"]["payments"]["messages"]["PaymentCaptured.v1"]["$ref"]
    broken["channels"]["payments"]["messages"]["PaymentCaptured.v1"]["payload"] = 5
    assert len(errors_of(broken)) >= 2


def test_channels_messages_headers_and_keys() -> None:
    generated = document()
    assert {k: c["address"] for k, c in generated["channels"].items()} == {"orders": "orders", "payments": "payments"}
    orders = generated["channels"]["orders"]["messages"]
    # Every version a topic can carry: the relay publishes a stored v1 event as it was written.
    assert set(orders) == {"OrderPlaced.v1", "OrderPlaced.v2", "OrderNoted"}
    messages = generated["components"]["messages"]
    v2 = messages["OrderPlaced.v2"]
    headers = v2["headers"]["properties"]
    assert headers["ce_type"]["const"] == "OrderPlaced" and headers["ce_source"]["const"] == "/billing"
    assert headers["ce_dataschema"]["const"] == "urn:eventstore:%2Fbilling:OrderPlaced:v2"
    assert {"ce_id", "ce_time", "ce_specversion", "ce_subject", "content-type"} <= set(headers)
    assert v2["bindings"]["kafka"]["key"]["description"] == "The message key: the stream id."
    assert "data.customer_id" in messages["PaymentCaptured.v1"]["bindings"]["kafka"]["key"]["description"]
    assert messages["OrderNoted"]["payload"] == {"type": "object"}, "routed but no class: no schema to give"
    assert "full" in generated["channels"]["payments"]["description"]
    operations = generated["operations"]
    assert operations["publish.payments"]["action"] == "send"
    assert operations["publish.payments"]["messages"] == [{"$ref": "#/channels/payments/messages/PaymentCaptured.v1"}]


def test_payload_schemas_are_hoisted_and_their_references_resolve() -> None:
    generated = document()
    schemas = generated["components"]["schemas"]
    v1 = schemas["OrderPlaced.v1"]
    v2 = schemas["OrderPlaced.v2"]
    assert "$defs" not in v1 and "$defs" not in v2
    first, second = v1["properties"]["lines"]["items"]["$ref"], v2["properties"]["lines"]["items"]["$ref"]
    assert (first, second) == ("#/components/schemas/Line", "#/components/schemas/OrderPlaced.v2.Line")
    resolver = jsonschema.validators.Draft7Validator(generated)
    v2_payload = {"customer_id": "c", "lines": [{"sku": "s", "price": 1, "currency": "EUR"}]}
    resolver.evolve(schema={"$ref": "#/components/schemas/OrderPlaced.v2"}).validate(v2_payload)
    rejected = resolver.evolve(schema={"$ref": "#/components/schemas/OrderPlaced.v2"})
    assert not rejected.is_valid({"customer_id": "c", "lines": [{"sku": "s", "price": 1}]})
    assert resolver.evolve(schema={"$ref": "#/components/schemas/OrderPlaced.v1"}).is_valid(
        {"customer": "c", "lines": [{"sku": "s", "price": 1}]}
    )


class Card(BaseModel):
    kind: Literal["card"]
    last4: str


class Cash(BaseModel):
    kind: Literal["cash"]


class Marker(BaseModel):
    propertyName: str


class Unusual(DomainEvent):
    """Fields whose schemas use keywords beyond the basics: all must make valid AsyncAPI."""

    pair: tuple[int, str]
    payment: Annotated[Card | Cash, Field(discriminator="kind")]
    at: datetime
    amount: Decimal
    id: UUID
    tags: set[str]
    counts: dict[str, int]
    discriminator: Marker


def test_pydantic_keywords_beyond_draft_07_still_make_valid_asyncapi() -> None:
    app = Application("x", registry=EventRegistry(Unusual), routes=[Route("unusual", ["Unusual"])])
    generated = asyncapi_document(Contracts.of(app))
    assert errors_of(generated) == []
    payload = generated["components"]["schemas"]["Unusual.v1"]
    assert "discriminator" not in payload["properties"]["payment"], "OpenAPI's discriminator object is dropped"
    assert payload["properties"]["discriminator"] == {"$ref": "#/components/schemas/Marker"}, "a field is kept"
