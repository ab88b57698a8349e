"""Whatever an address or a form says, the console answers with a 4xx or a page, never a 500."""

from __future__ import annotations

import httpx
import pytest

from tests.admin.conftest import sign_in

HUGE = str(2**64)
ODD = ["\u00b2", "-1", "1e3", " 7 ", HUGE, "%00", "\x00", "0x10", "", "9" * 400]


@pytest.mark.parametrize("value", ODD)
async def test_odd_query_values_are_answered(client: httpx.AsyncClient, value: str) -> None:
    await sign_in(client)
    for path, name in [
        ("/streams", "before"), ("/streams", "after"), ("/streams", "category"), ("/streams", "prefix"),
        ("/stream", "id"), ("/stream", "from"), ("/event", "position"), ("/log", "category"),
        ("/log", "types"), ("/projections", "x"), ("/outbox", "x"), ("/api/projections", "fresh"),
        ("/api/projections/lag", "x"), ("/api/outbox", "x"),
    ]:
        response = await client.get(path, params={name: value})
        assert response.status_code < 500, (path, name, value, response.status_code, response.text[:300])


@pytest.mark.parametrize("value", ["\u00b2", HUGE, "-5", "abc", "9" * 400, "%00", "\u00b2.1", f"1.{HUGE}"])
async def test_odd_path_values_and_log_positions_are_answered(client: httpx.AsyncClient, value: str) -> None:
    csrf = await sign_in(client)
    origin = str(client.base_url).rstrip("/")
    headers = {"x-csrf-token": csrf, "origin": origin}
    for method, path in [
        ("POST", f"/api/outbox/dead/{value}/retry"),
        ("GET", f"/api/projections/{value}/rebuild"),
        ("POST", f"/api/projections/{value}/reset"),
        ("POST", f"/api/projections/{value}/resume"),
        ("POST", f"/api/projections/{value}/rebuild"),
    ]:
        response = await client.request(method, path, headers=headers)
        assert response.status_code < 500, (method, path, response.status_code, response.text[:300])
    response = await client.get("/api/log", params={"after": value})
    assert 400 <= response.status_code < 500, (value, response.status_code)
