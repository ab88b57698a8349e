"""Variants of the shop for the CLI tests: `--app tests.contracts.apps:NAME`, run from the repository root."""

from __future__ import annotations

from typing import Any

from aggregates import DomainEvent, EventRegistry
from eventstore_app import Application
from eventstore_examples.shop.app import APP
from eventstore_examples.shop.domain import OrderLine


class OrderPlacedTotalAsText(DomainEvent, event_type="OrderPlaced"):
    """A breaking change: `total` retyped at the same version."""

    customer: str
    lines: list[OrderLine]
    total: str


class ItemAddedV2(DomainEvent, event_type="ItemAdded", version=2):
    """A new version with a required field; stored v1 events need an upcaster to load."""

    sku: str
    quantity: int
    price: int
    currency: str


def _add_currency(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "currency": "EUR"}


def shop_with(*replacements: type[DomainEvent], upcast: bool = False) -> Application:
    replaced = {event.event_type for event in replacements}
    registry = EventRegistry(
        *(cls for name, cls in APP.registry.event_types.items() if name not in replaced), *replacements
    )
    if upcast:
        for event in replacements:
            for version in range(1, event.schema_version):
                registry.add_upcaster(event, version, _add_currency)
    assert APP.outbox is not None
    return Application(APP.name, registry=registry, routes=APP.outbox.routes, source=APP.outbox.source)


RETYPED = shop_with(OrderPlacedTotalAsText)
ITEM_ADDED_V2 = shop_with(ItemAddedV2, upcast=True)
ITEM_ADDED_V2_NO_UPCASTER = shop_with(ItemAddedV2)
