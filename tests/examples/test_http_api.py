"""The cart service over real HTTP: uvicorn on a loopback port, httpx as the client, a migrated database."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from eventstore import EventStore, NotStarted
from eventstore_app import Application
from examples.http_api import create_api
from examples.shop.app import APP
from examples.shop.domain import Cart


@contextlib.asynccontextmanager
async def serving(app: Application, *, retries: int) -> AsyncIterator[httpx.AsyncClient]:
    """Run the service of `app` in this event loop on a free loopback port; a client of it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_api(app, retries=retries), log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(20):
            while not server.started:
                if task.done():
                    task.result()
                    pytest.fail("uvicorn stopped during startup (the lifespan failed; see the log above)")
                await asyncio.sleep(0.02)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await task
        sock.close()


async def stream_length(database_url: str, cart_id: str) -> int:
    async with EventStore(database_url) as store:
        return len(await store.read_stream(Cart.stream_id_for(cart_id), 0))


async def open_cart(client: httpx.AsyncClient, cart_id: str) -> None:
    response = await client.post("/carts", json={"customer": "ann", "cart_id": cart_id})
    assert response.status_code == 201, response.text


async def test_open_add_read_and_the_lifespan(database_url: str) -> None:
    app = APP.using(database_url=database_url)
    async with serving(app, retries=3) as client:
        opened = await client.post("/carts", json={"customer": "ann"})
        assert opened.status_code == 201, opened.text
        cart_id = opened.json()["cart_id"]
        assert opened.headers["location"] == f"/carts/{cart_id}"
        assert opened.headers["etag"] == '"0"'

        added = await client.post(f"/carts/{cart_id}/items", json={"sku": "tea", "quantity": 2, "price": 450})
        assert added.status_code == 201, added.text
        assert added.headers["etag"] == '"1"'
        added = await client.post(f"/carts/{cart_id}/items", json={"sku": "tea", "quantity": 1, "price": 450})
        assert added.status_code == 201, added.text

        read = await client.get(f"/carts/{cart_id}")
        assert read.status_code == 200
        assert read.headers["etag"] == '"2"'
        assert read.json() == {
            "cart_id": cart_id,
            "version": 2,
            "customer": "ann",
            "lines": [{"sku": "tea", "quantity": 3, "price": 450}],
            "total": 1350,
            "checked_out": False,
        }
        assert app.store is not None  # started by the lifespan
    with pytest.raises(NotStarted):
        _ = app.store  # and stopped by it
    assert await stream_length(database_url, cart_id) == 3


async def test_if_match_runs_the_command_only_at_that_version(database_url: str) -> None:
    async with serving(APP.using(database_url=database_url), retries=3) as client:
        await open_cart(client, "c1")
        item = {"sku": "tea", "quantity": 1, "price": 450}
        fresh = await client.post("/carts/c1/items", json=item, headers={"If-Match": '"0"'})
        assert fresh.status_code == 201, fresh.text
        assert fresh.headers["etag"] == '"1"'

        stale = await client.post("/carts/c1/items", json=item, headers={"If-Match": '"0"'})
        assert stale.status_code == 409, stale.text
        assert stale.json()["detail"].startswith("the cart is at version 1, not 0")
        ahead = await client.post("/carts/c1/items", json=item, headers={"If-Match": '"7"'})
        assert ahead.status_code == 409, ahead.text

        for bad in ("0", 'W/"1"', '"1", "2"', '"-1"', "*"):
            malformed = await client.post("/carts/c1/items", json=item, headers={"If-Match": bad})
            assert malformed.status_code == 422, (bad, malformed.text)
            assert "If-Match" in malformed.json()["detail"]
        assert (await client.get("/carts/c1")).json()["version"] == 1
    assert await stream_length(database_url, "c1") == 2  # nothing written by the refused commands


async def test_concurrent_adds_without_retries_lose_no_update(database_url: str) -> None:
    async with serving(APP.using(database_url=database_url), retries=0) as client:
        await open_cart(client, "busy")
        items = {f"sku-{n}": n + 1 for n in range(40)}
        responses = await asyncio.gather(
            *(client.post("/carts/busy/items", json={"sku": s, "quantity": q, "price": 100}) for s, q in items.items())
        )
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {201, 409}, [r.text for r in responses if r.status_code not in (201, 409)]
        assert 409 in statuses, "40 concurrent writers with no retry should have conflicted at least once"
        added = {s: q for (s, q), r in zip(items.items(), responses, strict=True) if r.status_code == 201}

        cart = (await client.get("/carts/busy")).json()
        assert {line["sku"]: line["quantity"] for line in cart["lines"]} == added
        assert cart["version"] == len(added)
    assert await stream_length(database_url, "busy") == 1 + len(added)


async def test_concurrent_adds_with_enough_retries_all_succeed(database_url: str) -> None:
    # Each conflict means another writer succeeded, so 39 retries are always enough for 40 writers.
    async with serving(APP.using(database_url=database_url), retries=39) as client:
        await open_cart(client, "busy")
        responses = await asyncio.gather(
            *(
                client.post("/carts/busy/items", json={"sku": f"sku-{n}", "quantity": 1, "price": 100})
                for n in range(40)
            )
        )
        assert [r.status_code for r in responses] == [201] * 40
        cart = (await client.get("/carts/busy")).json()
        assert len(cart["lines"]) == 40
        assert cart["version"] == 40


async def test_missing_cart_is_404(database_url: str) -> None:
    async with serving(APP.using(database_url=database_url), retries=3) as client:
        read = await client.get("/carts/nobody")
        assert read.status_code == 404
        assert read.json() == {"detail": "no cart 'nobody'"}
        add = await client.post("/carts/nobody/items", json={"sku": "tea", "quantity": 1, "price": 450})
        assert add.status_code == 404
        add = await client.post(
            "/carts/nobody/items", json={"sku": "tea", "quantity": 1, "price": 1}, headers={"If-Match": '"0"'}
        )
        assert add.status_code == 404
    assert await stream_length(database_url, "nobody") == 0


BAD_BODIES: list[tuple[object, str]] = [
    ({"sku": "tea", "quantity": "many", "price": 450}, "body.quantity: Input should be a valid integer"),
    ({"sku": "tea", "price": 450}, "body.quantity: Field required"),
    ({"sku": "", "quantity": 1, "price": 450}, "body.sku: String should have at least 1 character"),
    ({"sku": "tea", "quantity": 1, "price": -5}, "body.price: Input should be greater than or equal to 0"),
    ([1, 2], "body: Input should be a valid dictionary"),
]


async def test_bad_input_is_422_with_a_reason(database_url: str) -> None:
    async with serving(APP.using(database_url=database_url), retries=3) as client:
        await open_cart(client, "c1")
        for body, reason in BAD_BODIES:
            response = await client.post("/carts/c1/items", json=body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["detail"].startswith("invalid request: ")
            assert reason in response.json()["detail"], (body, response.text)
        not_json = await client.post("/carts/c1/items", content=b"{", headers={"Content-Type": "application/json"})
        assert not_json.status_code == 422
        assert "JSON" in not_json.json()["detail"]
        no_customer = await client.post("/carts", json={"cart_id": "c2"})
        assert no_customer.status_code == 422
        assert "body.customer: Field required" in no_customer.json()["detail"]
    assert await stream_length(database_url, "c1") == 1
    assert await stream_length(database_url, "c2") == 0


async def test_a_rule_the_cart_enforces_is_422(database_url: str) -> None:
    async with serving(APP.using(database_url=database_url), retries=3) as client:
        await open_cart(client, "c1")
        zero = await client.post("/carts/c1/items", json={"sku": "tea", "quantity": 0, "price": 450})
        assert zero.status_code == 422
        assert zero.json() == {"detail": "quantity must be positive"}
        again = await client.post("/carts", json={"customer": "bob", "cart_id": "c1"})
        assert again.status_code == 422
        assert again.json() == {"detail": "cart c1 is already open"}
        too_long = await client.get("/carts/" + "x" * 5000)
        assert too_long.status_code == 422
        assert "invalid aggregate id" in too_long.json()["detail"]
    assert await stream_length(database_url, "c1") == 1
