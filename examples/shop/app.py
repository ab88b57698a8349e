"""The shop, declared once: every process builds it from here (`--app eventstore_examples.shop.app:APP`)."""

from __future__ import annotations

from eventstore import MasterKey
from eventstore_app import Application
from outbox import Route

from .domain import Cart, Order, Product
from .read_models import OrderSummary, ProductSales, StockLevels

ORDERS_TOPIC = "shop.orders"

DEMO_MASTER_KEY = "ZGVtbyBtYXN0ZXIga2V5OiBuZXZlciBpbiBwcm9kISE="
"""The demo's master key when EVENTSTORE_MASTER_KEY is not set. A real application never ships one."""

APP = Application(
    "examples.shop",
    aggregates=[Product, Cart, Order],
    projections=[OrderSummary(), ProductSales(), StockLevels()],
    # Integration events for other services, keyed by order stream so each order's messages stay in order.
    # Their consumers upgrade first: a schema change must let new readers read old messages
    # (`eventstore schemas check` holds it to that, against examples/shop/eventstore.schemas.lock).
    routes=[Route(ORDERS_TOPIC, ["OrderPlaced", "PaymentCaptured", "OrderShipped", "OrderCancelled"],
                  compatibility="backward")],
    # Customers' e-mail and postal addresses are sealed under a key per customer (`store.forget`).
    keys=MasterKey.from_env() or MasterKey.from_base64(DEMO_MASTER_KEY),
)
