"""Wiring of the shop: repositories, the outbox routes and the declared projections."""

from __future__ import annotations

from aggregates import Repository
from eventstore import EventStore
from examples.shop.domain import Cart, Order, Product
from examples.shop.read_models import OrderSummary, ProductSales, StockLevels
from outbox import Outbox, Route

ORDERS_TOPIC = "shop.orders"

PROJECTIONS = [OrderSummary(), ProductSales(), StockLevels()]
"""What `eventstore projections ... --app examples.shop.app:PROJECTIONS` loads."""

OUTBOX = Outbox(
    [Route(ORDERS_TOPIC, ["OrderPlaced", "PaymentCaptured", "OrderShipped", "OrderCancelled"])],
    source="examples.shop",
)
"""Integration events for other services, keyed by order stream so each order's messages stay in order."""


class Shop:
    """The application service: one repository per aggregate on a store with the outbox installed."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.products = Repository(store, Product)
        self.carts = Repository(store, Cart)
        self.orders = Repository(store, Order)
