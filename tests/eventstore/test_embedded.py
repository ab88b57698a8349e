"""The path a fresh laptop takes: no EVENTSTORE_DATABASE_URL, an embedded PostgreSQL from a wheel."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from eventstore import EventStore, NewEvent, StreamState
from eventstore.embedded import DATABASE_URL_ENV, EmbeddedPostgres, database_url, embedded_postgres
from eventstore_app import migrate


@pytest.mark.embedded
def test_embedded_postgres_runs_the_store() -> None:
    with embedded_postgres() as url:
        migrate(url)

        async def roundtrip() -> list[str]:
            async with EventStore(url) as store:
                await store.append("emb-1", [NewEvent("Started")], StreamState.NO_STREAM)
                return [e.event_type for e in await store.read_all()]

        assert asyncio.run(roundtrip()) == ["Started"]


@pytest.mark.embedded
def test_embedded_postgres_restarts_on_its_port_and_keeps_committed_events() -> None:
    with EmbeddedPostgres() as server:
        url = server.url
        migrate(url)

        async def append(stream: str) -> None:
            async with EventStore(url) as store:
                await store.append(stream, [NewEvent("Started")], StreamState.NO_STREAM)

        async def streams() -> list[str]:
            async with EventStore(url) as store:
                return [e.stream_id for e in await store.read_all()]

        asyncio.run(append("emb-1"))
        server.stop("immediate")  # a crash: recovery replays the WAL at the next start
        assert not server.running
        assert server.start() == url
        asyncio.run(append("emb-2"))
        server.stop("fast")
        server.start()
        assert asyncio.run(streams()) == ["emb-1", "emb-2"]
        data_dir = server.data_dir
    assert not data_dir.exists()


def test_database_url_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://example/db")
    with database_url() as url:
        assert url == "postgresql://example/db"
    with database_url("postgresql://given/db") as url:
        assert url == "postgresql://given/db"


@pytest.mark.embedded
def test_cli_demo_starts_embedded_postgres_without_configuration() -> None:
    env = {k: v for k, v in os.environ.items() if k not in (DATABASE_URL_ENV, "KAFKA_BOOTSTRAP_SERVERS")}
    done = subprocess.run(
        [sys.executable, "-m", "eventstore_cli", "demo", "--smoke"], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "embedded PostgreSQL" in done.stdout
