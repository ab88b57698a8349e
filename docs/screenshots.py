"""Make the README's screenshots of the admin console (docs/images/*.png) from a live shop.

    EVENTSTORE_DATABASE_URL=postgresql://... .venv/bin/python docs/screenshots.py

Needs Debian's Chromium at /usr/bin/chromium. Creates (and afterwards drops) the database
`eventstore_screenshots` on that server, starts the embedded Kafka-protocol broker, and runs the shop:
customers shop while no projection runner runs (lag grows), then a runner catches up, two relays
share the outbox's slots, and an order too large for the broker ends as a dead letter. The console
samples all of it while the browser takes the pictures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from pathlib import Path

import asyncpg
import uvicorn
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from playwright.async_api import Page, async_playwright
from sqlalchemy.engine import make_url

from eventstore import NewEvent, asyncpg_dsn
from eventstore.embedded import DATABASE_URL_ENV, free_port
from eventstore_admin import AdminSettings, create_app
from eventstore_app import ApplicationSettings, migrate_async
from examples.shop.app import APP, ORDERS_TOPIC
from examples.shop.demo import Shop
from examples.shop.domain import OrderLine
from outbox import KafkaSettings, Relay, RelaySettings
from outbox.embedded import EmbeddedBroker

IMAGES = Path(__file__).resolve().parent / "images"
DATABASE = "eventstore_screenshots"
TOKEN = "screenshot-token-0123456789"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


async def customer(shop: Shop, rng: random.Random, n: int, prices: dict[str, int]) -> None:
    cart_id, order_id = f"c{n:05d}", f"o{n:05d}"
    await shop.carts.execute(cart_id, lambda c: c.open(f"customer-{n % 97}"), create=True)
    skus = rng.sample(sorted(prices), rng.randint(1, 3))
    for sku in skus:
        await shop.carts.execute(cart_id, lambda c, s=sku: c.add(s, rng.randint(1, 3), prices[s]), retries=20)
    await shop.carts.execute(cart_id, lambda c: c.check_out(order_id))
    cart = await shop.carts.get(cart_id)
    lines = [OrderLine(sku=s, quantity=q, price=p) for s, (q, p) in sorted(cart.state.lines.items())]
    await shop.orders.execute(order_id, lambda o: o.place(cart.state.customer, lines), create=True)
    for line in lines:
        await shop.products.execute(line.sku, lambda p, ln=line: p.reserve(order_id, ln.quantity), retries=50)
    await shop.orders.execute(order_id, lambda o: o.capture_payment(f"pay-{n}"))
    if rng.random() < 0.7:
        await shop.orders.execute(order_id, lambda o: o.ship())


async def shoppers(shop: Shop, seconds: float, concurrency: int, start: int, prices: dict[str, int]) -> int:
    """Customers shop for `seconds`, `concurrency` at a time; returns the next customer number."""
    rng = random.Random(start)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    counter = [start]

    async def one() -> None:
        while loop.time() < deadline:
            counter[0] += 1
            await customer(shop, rng, counter[0], prices)

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return counter[0]


async def shoot(page: Page, path: str, name: str, wait: float = 1.5, full: bool = False) -> None:
    await page.goto(path)
    await page.wait_for_timeout(wait * 1000)
    await page.screenshot(path=str(IMAGES / f"{name}.png"), full_page=full)
    print("wrote", IMAGES / f"{name}.png")


async def main() -> None:
    server = os.environ.get(DATABASE_URL_ENV)
    if not server:
        raise SystemExit(f"set {DATABASE_URL_ENV} to a PostgreSQL server (a database {DATABASE} is made there)")
    admin = await asyncpg.connect(asyncpg_dsn(server))
    await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    url = make_url(server).set(database=DATABASE).render_as_string(hide_password=False)
    IMAGES.mkdir(parents=True, exist_ok=True)
    try:
        with EmbeddedBroker() as broker:
            kafka = await asyncio.to_thread(broker.start)
            await migrate_async(url)
            await scenario(url, kafka)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.close()


async def scenario(url: str, kafka: str) -> None:
    client = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await client.start()
    await client.create_topics([NewTopic(ORDERS_TOPIC, 3, 1)])
    await client.close()
    port = free_port()
    settings = AdminSettings(database_url=url, projections=list(APP.projections), token=TOKEN, port=port,
                             sample_interval=1.0)
    console = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning", lifespan="on"))
    serving = asyncio.create_task(console.serve())
    relay = RelaySettings(poll_interval=0.5, max_attempts=2, retry_backoff=0.5, retention=None)
    async with APP.using(database_url=url, settings=ApplicationSettings(max_connections=24)) as app:
        store = app.store
        shop = Shop(app)
        projections = app.admin
        kafka_settings = KafkaSettings(bootstrap_servers=kafka, max_request_size=512 * 1024)
        relays = [Relay(store, kafka_settings, relay.model_copy(update={"relay_id": r})) for r in ("a", "b")]
        async with contextlib.AsyncExitStack() as stack:
            for r in relays:
                await stack.enter_async_context(r)
            prices = {f"sku{i:03d}": 500 + 250 * (i % 9) for i in range(16)}
            for sku, price in prices.items():
                await shop.products.execute(sku, lambda p, pr=price: p.list_for_sale(pr, 100_000), create=True)
            async with projections.runner() as first:  # records the projections, then stops
                await first.wait_caught_up()
            print("shopping without a projection runner (lag grows) ...")
            n = await shoppers(shop, 25, 8, 0, prices)
            # An order too large to send (over the producer's request size): the relay dead-letters it.
            await store.append("order-o99999", [NewEvent("OrderPlaced", {
                "customer": "customer-7", "total": 0, "lines": [], "gift_note": "x" * 600_000})])
            print("a runner catches up ...")
            runner = await stack.enter_async_context(projections.runner(batch_size=50, poll_interval=0.5))
            n = await shoppers(shop, 12, 2, n, prices)
            await runner.wait_caught_up()
            trickle = asyncio.create_task(shoppers(shop, 120, 1, n, prices))
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
                page = await browser.new_page(viewport={"width": 1400, "height": 860}, base_url=f"http://127.0.0.1:{port}")
                await page.goto("/login")
                await page.fill('input[name="token"]', TOKEN)
                await page.click('form.login button[type="submit"]')
                await page.wait_for_url("**/projections")
                await shoot(page, "/stream?id=order-o00003", "admin-stream")
                await shoot(page, "/log", "admin-log", wait=5)
                await page.goto("/projections")
                row = page.locator('tr[data-projection="order_summary"]')
                await row.locator('button[data-kind="rebuild"]').click()
                await page.click("#confirm-ok")
                await row.locator(".progress.finished").wait_for(timeout=60_000)
                await page.wait_for_timeout(1500)
                await page.screenshot(path=str(IMAGES / "admin-projections.png"))
                print("wrote", IMAGES / "admin-projections.png")
                await shoot(page, "/outbox", "admin-outbox", full=True)
                await browser.close()
            trickle.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trickle
    console.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(main())
