"""The shop's workload, small and without Kafka, plus the events that try to break the console's pages."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime

import asyncpg

from eventstore import NewEvent, asyncpg_dsn
from examples.shop.demo import Shop
from examples.shop.domain import OrderLine
from projections import ProjectionFailed
from tests.admin.app import APP

XSS_SCRIPT = "<script>window.__xss = 'script'</script>"
XSS_IMG = "\"><img src=x onerror=\"window.__xss='img'\">"
XSS_STREAM = "note-xss"

DEAD_LETTER_ERROR = "MessageSizeTooLargeError: <b>the broker refused it</b>"


def xss_event(note: str = XSS_SCRIPT) -> NewEvent:
    """An event whose every untrusted field tries to become markup."""
    return NewEvent(
        "NoteAdded",
        {"text": note, "html": XSS_IMG, "nested": {"<tag>": [XSS_SCRIPT]}},
        metadata={"source": XSS_IMG},
    )


async def fill(url: str, customers: int = 12, seed: int = 7) -> None:
    """Products, carts and orders through the shop's aggregates, the read models caught up, the outbox's
    messages pending (no relay runs), one dead letter, the XSS events, and the `notes` projection failed."""
    rng = random.Random(seed)
    async with APP.using(database_url=url) as app:
        store = app.store
        shop = Shop(app)
        projections = app.admin
        shop_runner = projections.runner(["order_summary", "product_sales"], batch_size=200, poll_interval=0.2)
        async with shop_runner:
            prices = {f"sku{i:03d}": 500 + 250 * i for i in range(6)}
            for sku, price in prices.items():
                await shop.products.execute(sku, lambda p, pr=price: p.list_for_sale(pr, 1000), create=True)
            for n in range(customers):
                await _customer(shop, rng, n, prices)
            await store.append(XSS_STREAM, [xss_event(), xss_event(XSS_IMG)])
            await store.append("note-failing", [xss_event("please fail " + XSS_SCRIPT)])
            await shop_runner.wait_caught_up()
        async with projections.runner(["notes"], poll_interval=0.2) as notes_runner:
            try:
                async with asyncio.timeout(20):
                    await notes_runner.wait_caught_up()
            except ProjectionFailed:
                pass  # as intended: the console shows it failed, with its event
        await store.pool.execute(
            "UPDATE outbox SET dead_at = now(), attempts = 5, last_error = $1 WHERE id = (SELECT min(id) FROM outbox)",
            DEAD_LETTER_ERROR,
        )


async def _customer(shop: Shop, rng: random.Random, n: int, prices: dict[str, int]) -> None:
    cart_id, order_id = f"c{n:04d}", f"o{n:04d}"
    await shop.carts.execute(cart_id, lambda c: c.open(f"customer-{n}"), create=True)
    skus = rng.sample(sorted(prices), 2)
    for sku in skus:
        await shop.carts.execute(cart_id, lambda c, s=sku: c.add(s, 1, prices[s]))
    await shop.carts.execute(cart_id, lambda c: c.check_out(order_id))
    lines = [OrderLine(sku=s, quantity=1, price=prices[s]) for s in sorted(skus)]
    await shop.orders.execute(order_id, lambda o: o.place(f"customer-{n}", lines), create=True)
    for line in lines:
        await shop.products.execute(line.sku, lambda p, ln=line: p.reserve(order_id, ln.quantity))
    await shop.orders.execute(order_id, lambda o: o.capture_payment(f"pay-{n}"))
    if n % 3:
        await shop.orders.execute(order_id, lambda o: o.ship())


async def kill_a_message(url: str) -> int:
    """Dead-letter a pending message as the relay does after its last refused attempt."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        message_id: int = await conn.fetchval(
            "UPDATE outbox SET dead_at = now(), attempts = 5, last_error = 'refused'"
            " WHERE id = (SELECT min(id) FROM outbox WHERE dead_at IS NULL AND published_at IS NULL) RETURNING id"
        )
        return message_id
    finally:
        await conn.close()


async def dead_at(url: str, message_id: int) -> datetime | None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        value: datetime | None = await conn.fetchval("SELECT dead_at FROM outbox WHERE id = $1", message_id)
        return value
    finally:
        await conn.close()
