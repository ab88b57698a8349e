"""The console on a real PostgreSQL filled with the shop's workload: in-process (httpx) and as a real server."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from sqlalchemy.engine import make_url

from eventstore.embedded import free_port
from eventstore_admin import AdminSettings, create_app
from eventstore_admin.app import AdminConsole
from tests.admin.app import PROJECTIONS
from tests.admin.workload import fill
from tests.conftest import _admin, with_database

TOKEN = "console-test-token-0123456789"
PASSWORD = "s3cret-pw-in-url"
"""Put in the database URL when it has none (the test servers trust local connections): no page may show it."""


def with_password(url: str) -> str:
    parsed = make_url(url)
    if parsed.password:
        return url
    return parsed.set(password=PASSWORD).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def shop_database(server_url: str, template_database: str) -> Iterator[str]:
    """The shop's workload in a database of its own, shared by the console's tests: each changes only
    what it made itself (its own dead letter, its own events), or what any order of tests tolerates."""
    name = f"es_admin_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    url = with_password(with_database(server_url, name))
    try:
        asyncio.run(fill(url))
        yield url
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def settings_for(url: str, *, token: str | None = TOKEN, port: int = 8000, **extra: object) -> AdminSettings:
    return AdminSettings(
        database_url=url, projections=PROJECTIONS, token=token, port=port, sample_interval=0.5, **extra
    )


@contextlib.asynccontextmanager
async def console_client(settings: AdminSettings) -> AsyncIterator[httpx.AsyncClient]:
    """The console in-process: its lifespan runs, requests go through httpx's ASGI transport."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{settings.port}") as client:
            yield client


@pytest.fixture
async def client(shop_database: str) -> AsyncIterator[httpx.AsyncClient]:
    async with console_client(settings_for(shop_database)) as c:
        yield c


CSRF_META = re.compile(r'<meta name="csrf-token" content="([^"]+)">')


async def sign_in(client: httpx.AsyncClient) -> str:
    """Sign in with the token as the login form does; returns the session's CSRF token."""
    origin = str(client.base_url).rstrip("/")
    response = await client.post("/login", data={"token": TOKEN}, headers={"origin": origin})
    assert response.status_code == 303, response.text
    page = await client.get("/projections")
    found = CSRF_META.search(page.text)
    assert found is not None, "a signed-in page carries the CSRF token"
    return found.group(1)


class ConsoleServer:
    """The console under uvicorn on a real port, in a thread with its own event loop."""

    def __init__(self, settings: AdminSettings) -> None:
        self.settings = settings
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning",
            access_log=False, timeout_graceful_shutdown=2, lifespan="on",
        )
        self._app = config.app
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="admin console", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def console(self) -> AdminConsole:
        """The server's state, to look at (from the test's thread: read it, do not change it)."""
        console: AdminConsole = self._app.state.console
        return console

    def __enter__(self) -> ConsoleServer:
        self._thread.start()
        for _ in range(400):
            if self._server.started:
                return self
            if not self._thread.is_alive():
                break
            threading.Event().wait(0.025)
        raise RuntimeError("the console did not start")

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(15)


@pytest.fixture(scope="module")
def console_server(shop_database: str) -> Iterator[ConsoleServer]:
    with ConsoleServer(settings_for(shop_database, port=free_port())) as server:
        yield server
