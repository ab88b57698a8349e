"""Variants of the shop for the CLI tests: `--app tests.contracts.apps:NAME`, run from the repository root."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ConfigDict

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


class Hooked(DomainEvent, event_type="Hooked"):
    """A field pydantic cannot describe as JSON Schema."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    callback: Callable[[int], int] | None = None


class Here(DomainEvent, event_type="."):
    a: int


class Up(DomainEvent, event_type=".."):
    a: int


class Hidden(DomainEvent, event_type=".hidden"):
    a: int


NO_SCHEMA = shop_with(Hooked)
DOTS = Application("dots", registry=EventRegistry(Here, Up, Hidden))
