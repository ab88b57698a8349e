"""The shop demo, small, against real PostgreSQL and the real Kafka-protocol broker: every check holds."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from rich.console import Console

from examples.shop.demo import run_demo
from outbox.embedded import EmbeddedBroker


@pytest.fixture
def kafka_servers() -> Iterator[str]:
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if servers:
        yield servers
        return
    with EmbeddedBroker() as broker:
        yield broker.start()


async def test_shop_demo_checks_itself(database_url: str, kafka_servers: str) -> None:
    console = Console(record=True, width=120)
    report = await run_demo(database_url, kafka_servers, console, customers=80, concurrency=16)
    failed = [(c.name, c.expected, c.actual) for c in report.checks if not c.ok]
    assert failed == []
    assert len(report.checks) >= 10
    assert report.tally.commands > 500
    assert report.tally.conflicts > 0
    assert "rebuilt from" in console.export_text()
