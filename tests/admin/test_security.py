"""Read-only unless started with a token; operations need a session, its CSRF token and the console's origin."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import httpx
import pytest

from eventstore_admin import AdminSettings, ConsoleError
from eventstore_admin.backend import Backend
from eventstore_admin.errors import Unavailable
from eventstore_admin.jobs import RebuildJobs
from eventstore_admin.model import RebuildProgressView
from eventstore_admin.security import Redactor, mask_url
from tests.admin.conftest import TOKEN, console_client, settings_for, sign_in

OPERATIONS = [
    "/api/projections/order_summary/rebuild",
    "/api/projections/order_summary/reset",
    "/api/projections/notes/resume",
    "/api/outbox/dead/retry",
    "/api/outbox/dead/1/retry",
]


async def test_every_response_carries_the_security_headers(client: httpx.AsyncClient) -> None:
    for path in ["/streams", "/api/projections", "/static/admin.js", "/nowhere"]:
        response = await client.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "same-origin"
    assert (await client.get("/streams")).headers["cache-control"] == "no-store"


async def test_a_host_name_it_was_not_told_about_is_refused(client: httpx.AsyncClient) -> None:
    """A DNS-rebinding page reaches the console under its own name: refused."""
    refused = await client.get("/streams", headers={"host": "attacker.example:8000"})
    assert refused.status_code == 400
    assert (await client.get("/streams", headers={"host": "localhost:8000"})).status_code == 200


async def test_read_only_without_a_token(shop_database: str) -> None:
    async with console_client(settings_for(shop_database, token=None)) as client:
        for path in OPERATIONS:
            response = await client.post(path, headers={"origin": "http://127.0.0.1:8000"})
            assert response.status_code == 403, path
            assert "read-only" in response.json()["error"]
        page = await client.get("/projections")
        assert "data-action" not in page.text and "read-only" in page.text
        login = await client.post("/login", data={"token": "anything"}, headers={"origin": "http://127.0.0.1:8000"})
        assert login.status_code == 403


async def test_operations_need_a_session_csrf_token_and_the_same_origin(client: httpx.AsyncClient) -> None:
    origin = {"origin": "http://127.0.0.1:8000"}
    signed_out = await client.post("/api/projections/notes/resume", headers=origin)
    assert signed_out.status_code == 403 and "sign in" in signed_out.json()["error"]
    assert "data-action" not in (await client.get("/projections")).text

    csrf = await sign_in(client)
    assert 'data-action="/api/projections/order_summary/rebuild"' in (await client.get("/projections")).text
    no_token = await client.post("/api/projections/notes/resume", headers=origin)
    assert no_token.status_code == 403 and "CSRF" in no_token.json()["error"]
    forged = csrf[:-2] + ("11" if csrf.endswith("00") else "00")  # never the token itself (it failed once)
    wrong = await client.post("/api/projections/notes/resume", headers={**origin, "x-csrf-token": forged})
    assert wrong.status_code == 403
    elsewhere = await client.post(
        "/api/projections/notes/resume", headers={"origin": "http://evil.example", "x-csrf-token": csrf}
    )
    assert elsewhere.status_code == 403 and "own pages" in elsewhere.json()["error"]
    no_origin = await client.post("/api/outbox/dead/999999/retry", headers={"x-csrf-token": csrf})
    assert no_origin.status_code == 403
    allowed = await client.post("/api/outbox/dead/999999/retry", headers={**origin, "x-csrf-token": csrf})
    assert allowed.status_code == 404  # past every check: there is no such dead letter


async def test_signing_out_ends_the_session_even_for_a_replayed_cookie(client: httpx.AsyncClient) -> None:
    origin = {"origin": "http://127.0.0.1:8000"}
    csrf = await sign_in(client)
    cookies = dict(client.cookies)
    out = await client.post("/logout", data={"csrf": csrf}, headers=origin)
    assert out.status_code == 303
    client.cookies.update(cookies)
    replayed = await client.post("/api/outbox/dead/999999/retry", headers={**origin, "x-csrf-token": csrf})
    assert replayed.status_code == 403


async def test_a_wrong_token_signs_nobody_in(client: httpx.AsyncClient) -> None:
    response = await client.post("/login", data={"token": TOKEN + "x"}, headers={"origin": "http://127.0.0.1:8000"})
    assert response.status_code == 403
    assert "That is not the token" in response.text
    assert not client.cookies


def test_settings_refuse_a_short_token() -> None:
    with pytest.raises(ConsoleError, match="at least 16 characters"):
        AdminSettings(database_url="postgresql://x@127.0.0.1/db", token="short")
    assert AdminSettings(database_url="postgresql://x@127.0.0.1/db").read_only
    assert not AdminSettings(database_url="postgresql://x@127.0.0.1/db", host="0.0.0.0").loopback


def test_secrets_are_masked_and_redacted() -> None:
    url = "postgresql://app:pa55word@db.internal:5432/shop?sslpassword=also-secret"
    assert mask_url(url) == "postgresql://app:***@db.internal:5432/shop"
    redact = Redactor.for_settings(url, "the-operators-token-xyz")
    message = redact(f"cannot connect to {url}: password pa55word refused; token the-operators-token-xyz")
    assert "pa55word" not in message and "the-operators-token-xyz" not in message and "also-secret" not in message


def test_a_password_is_redacted_however_a_url_spells_it() -> None:
    """A message may quote the URL rewritten (another scheme, say), so it does not match the console's whole."""
    url = "postgresql://app:pa%20ss%40wd@db.internal/shop"  # the password is `pa ss@wd`
    redact = Redactor.for_settings(url, None)
    for spelling in ["pa ss@wd", "pa%20ss%40wd", "pa+ss%40wd"]:
        assert redact(f"cannot connect to postgresql+asyncpg://app:{spelling}@db.internal/shop") == (
            "cannot connect to postgresql+asyncpg://app:***@db.internal/shop"
        )


async def test_a_failed_rebuild_keeps_its_error_redacted() -> None:
    url = "postgresql://app:pa55word@db.internal/shop"

    class FailingBackend:
        def declared(self, name: str) -> bool:
            return True

        async def rebuild(self, name: str, progress: Callable[[RebuildProgressView], None]) -> RebuildProgressView:
            raise Unavailable(f"lost the connection to PostgreSQL: cannot reach {url}")

    jobs = RebuildJobs(cast(Backend, FailingBackend()), Redactor.for_settings(url, None))
    jobs.start("order_summary")
    async with asyncio.timeout(10):
        while True:
            progress = jobs.progress("order_summary")
            assert progress is not None
            if progress.finished:
                break
            await asyncio.sleep(0)
    assert progress.phase == "failed"
    assert progress.error == "lost the connection to PostgreSQL: cannot reach ***"
