"""The shop demo, small, against real PostgreSQL and each real broker: every check holds."""

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


async def _run(database_url: str, broker: str, customers: int = 80) -> str:
    console = Console(record=True, width=120)
    report = await run_demo(database_url, broker, console, customers=customers, concurrency=16)
    failed = [(c.name, c.expected, c.actual) for c in report.checks if not c.ok]
    assert failed == [], failed
    assert len(report.checks) >= 10
    assert report.tally.commands > 6 * customers
    assert report.tally.conflicts > 0
    text = console.export_text()
    assert "rebuilt from" in text
    return text


async def test_shop_demo_checks_itself(database_url: str, kafka_servers: str) -> None:
    await _run(database_url, kafka_servers)


async def test_shop_demo_on_nats_jetstream(database_url: str, nats_url: str) -> None:
    assert "relays to NATS JetStream" in await _run(database_url, nats_url, customers=40)


async def test_shop_demo_on_rabbitmq(database_url: str, rabbitmq_url: str) -> None:
    assert "relays to RabbitMQ" in await _run(database_url, rabbitmq_url, customers=40)
