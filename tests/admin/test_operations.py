"""Operating through the console: rebuild with progress, reset, resume, retry dead letters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.admin.conftest import console_client, settings_for, sign_in, with_password
from tests.admin.workload import dead_at, fill, kill_a_message
from tests.conftest import _admin, with_database


@pytest.fixture(scope="module")
def operated_database(server_url: str, template_database: str) -> Iterator[str]:
    """The shop's workload in a database these tests change freely."""
    name = f"es_admin_ops_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    url = with_password(with_database(server_url, name))
    try:
        asyncio.run(fill(url, customers=6))
        yield url
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class Operator:
    """A signed-in browser session, as the pages' scripts make their requests."""

    def __init__(self, client: httpx.AsyncClient, csrf: str) -> None:
        self.client = client
        self.headers = {"origin": str(client.base_url).rstrip("/"), "x-csrf-token": csrf}

    async def post(self, path: str) -> httpx.Response:
        return await self.client.post(path, headers=self.headers)

    async def projection(self, name: str) -> dict[str, Any]:
        status = (await self.client.get("/api/projections", params={"fresh": "1"})).json()
        found: dict[str, Any] = next(p for p in status["projections"] if p["name"] == name)
        return found


@pytest.fixture
async def operator(operated_database: str) -> AsyncIterator[Operator]:
    async with console_client(settings_for(operated_database)) as client:
        yield Operator(client, await sign_in(client))


async def test_rebuild_runs_in_the_background_and_reports_its_progress(operator: Operator) -> None:
    before = await operator.projection("order_summary")
    started = await operator.post("/api/projections/order_summary/rebuild")
    assert started.status_code == 202, started.text
    assert started.json()["progress"]["phase"] == "starting"
    again = await operator.post("/api/projections/order_summary/rebuild")
    assert again.status_code == 409
    phases = []
    async with asyncio.timeout(30):
        while True:
            progress = (await operator.client.get("/api/projections/order_summary/rebuild")).json()
            phases.append(progress["phase"])
            if progress["finished"]:
                break
            await asyncio.sleep(0.05)
    assert progress["phase"] == "done", progress
    assert progress["done"] > 0 and progress["error"] is None
    after = await operator.projection("order_summary")
    assert after["generation"] == before["generation"] + 1
    assert after["lag_events"] == 0


async def test_only_declared_projections_can_be_rebuilt_or_reset(operator: Operator) -> None:
    for path in ["/api/projections/nothing_here/rebuild", "/api/projections/nothing_here/reset"]:
        response = await operator.post(path)
        assert response.status_code == 400 and "--app" in response.json()["error"]


async def test_reset_starts_a_projection_over_in_new_tables(operator: Operator) -> None:
    before = await operator.projection("product_sales")
    response = await operator.post("/api/projections/product_sales/reset")
    assert response.status_code == 200, response.text
    after = await operator.projection("product_sales")
    assert after["generation"] == before["generation"] + 1
    assert after["checkpoint"] == "0/0" and after["lag_events"] > 0  # no runner here: it stays behind


async def test_resume_lets_a_failed_projection_go_on(operator: Operator) -> None:
    assert (await operator.projection("notes"))["state"] == "failed"
    response = await operator.post("/api/projections/notes/resume")
    assert response.status_code == 200 and "resumed notes" in response.json()["message"]
    assert (await operator.projection("notes"))["state"] == "stopped"
    again = await operator.post("/api/projections/notes/resume")
    assert "had not failed" in again.json()["message"]


async def test_a_dead_letter_is_retried_once(operator: Operator, operated_database: str) -> None:
    message_id = await kill_a_message(operated_database)
    page = await operator.client.get("/outbox")
    assert f'data-action="/api/outbox/dead/{message_id}/retry"' in page.text
    retried = await operator.post(f"/api/outbox/dead/{message_id}/retry")
    assert retried.status_code == 200, retried.text
    assert await dead_at(operated_database, message_id) is None
    assert (await operator.post(f"/api/outbox/dead/{message_id}/retry")).status_code == 404
    others = [await kill_a_message(operated_database) for _ in range(2)]
    everything = await operator.post("/api/outbox/dead/retry")
    assert everything.status_code == 200 and everything.json()["message"].startswith("3 dead")
    assert [await dead_at(operated_database, m) for m in others] == [None, None]

