"""The shop's read models: two built by a runner from the log, one updated inline with each append."""

from __future__ import annotations

from collections import defaultdict

from eventstore import REDACTED, SUBJECT_FORGOTTEN, RecordedEvent
from projections import Connection, Projection, handles


class OrderSummary(Projection):
    """One row per order with its status: what a customer-service screen would query."""

    name = "order_summary"
    version = 2
    tables = {
        "order_summary": """
            CREATE TABLE order_summary (
                order_id text PRIMARY KEY, customer text NOT NULL, status text NOT NULL,
                total bigint NOT NULL, paid bigint NOT NULL DEFAULT 0, lines integer NOT NULL, ship_to text)
        """
    }

    @handles("OrderPlaced")
    async def placed(self, conn: Connection, event: RecordedEvent) -> None:
        data = event.json()
        await conn.execute(
            "INSERT INTO order_summary (order_id, customer, status, total, lines, ship_to)"
            " VALUES ($1, $2, 'placed', $3, $4, $5)",
            event.stream_id, data["customer"], data["total"], len(data["lines"]), data.get("ship_to"),
        )

    @handles(SUBJECT_FORGOTTEN)
    async def forgotten(self, conn: Connection, event: RecordedEvent) -> None:
        """A customer was forgotten: the addresses copied here go too (the events already read redacted)."""
        await conn.execute(
            "UPDATE order_summary SET ship_to = $2 WHERE customer = $1", event.json()["subject"], REDACTED
        )

    @handles("PaymentCaptured")
    async def paid(self, conn: Connection, event: RecordedEvent) -> None:
        await conn.execute(
            "UPDATE order_summary SET status = 'paid', paid = paid + $2 WHERE order_id = $1",
            event.stream_id, event.json()["amount"],
        )

    @handles("OrderShipped", "OrderCancelled")
    async def finished(self, conn: Connection, event: RecordedEvent) -> None:
        status = "shipped" if event.event_type == "OrderShipped" else "cancelled"
        await conn.execute("UPDATE order_summary SET status = $2 WHERE order_id = $1", event.stream_id, status)


class ProductSales(Projection):
    """Units reserved per product, written a batch at a time (one statement per batch of events)."""

    name = "product_sales"
    version = 1
    tables = {
        "product_sales": """
            CREATE TABLE product_sales (sku text PRIMARY KEY, units bigint NOT NULL, reservations bigint NOT NULL)
        """
    }

    @handles("StockReserved", "StockReleased", batch=True)
    async def reservations(self, conn: Connection, events: list[RecordedEvent]) -> None:
        units: dict[str, int] = defaultdict(int)
        count: dict[str, int] = defaultdict(int)
        for event in events:
            sku = event.stream_id.split("-", 1)[1]
            sign = 1 if event.event_type == "StockReserved" else -1
            units[sku] += sign * event.json()["quantity"]
            count[sku] += sign
        skus = sorted(units)
        await conn.execute(
            """
            INSERT INTO product_sales (sku, units, reservations)
            SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
            ON CONFLICT (sku) DO UPDATE SET units = product_sales.units + EXCLUDED.units,
                                            reservations = product_sales.reservations + EXCLUDED.reservations
            """,
            skus, [units[s] for s in skus], [count[s] for s in skus],
        )


class StockLevels(Projection):
    """Available stock, updated inside the append that reserves it: never behind the write model."""

    name = "stock_levels"
    version = 1
    inline = True
    tables = {
        "stock_levels": """
            CREATE TABLE stock_levels (sku text PRIMARY KEY, available integer NOT NULL, reserved integer NOT NULL)
        """
    }

    @handles("ProductListed")
    async def listed(self, conn: Connection, event: RecordedEvent) -> None:
        data = event.json()
        await conn.execute("INSERT INTO stock_levels VALUES ($1, $2, 0)", data["sku"], data["stock"])

    @handles("StockReserved", "StockReleased")
    async def moved(self, conn: Connection, event: RecordedEvent) -> None:
        quantity = event.json()["quantity"]
        if event.event_type == "StockReleased":
            quantity = -quantity
        await conn.execute(
            "UPDATE stock_levels SET available = available - $2, reserved = reserved + $2 WHERE sku = $1",
            event.stream_id.split("-", 1)[1], quantity,
        )
