"""Relays as separate processes (the `eventstore outbox relay` command): crashes and concurrency."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from eventstore import EventStore, NewEvent
from tests.outbox.conftest import Collector
from tests.outbox.test_relay import versions_by_key, wait_until

EVENTSTORE = str(Path(sys.executable).parent / "eventstore")


class RelayProcess:
    def __init__(self, database_url: str, kafka: str, relay_id: str, *options: str) -> None:
        self.relay_id = relay_id
        self.log = tempfile.NamedTemporaryFile(prefix=f"relay-{relay_id}-", suffix=".log")  # noqa: SIM115
        command = [
            EVENTSTORE, "--database-url", database_url, "--kafka", kafka, "outbox", "relay",
            "--relay-id", relay_id, "--send-timeout", "1", "--lease-ttl", "6", "--poll-interval", "0.5",
            "--retention", "-1", *options,
        ]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"relay {self.relay_id} ignored SIGTERM:\n{self.output()}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def relays() -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for relay in started:
        relay.close()


async def _published(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"))


@pytest.mark.fault
async def test_sigkill_mid_batch_then_restart_delivers_every_message(
    outbox_store: EventStore, database_url: str, kafka: str, collector: Collector, relays: list[RelayProcess]
) -> None:
    total = 6000
    async with outbox_store.unit_of_work() as uow:
        for stream in range(60):
            await uow.append(f"order-{stream}", [NewEvent("OrderPlaced", {"n": n}) for n in range(100)])
    pool = outbox_store.pool

    # Kill the relay as soon as it has made progress, and check that the broker got messages the
    # relay had not marked published yet. A kill can land between rounds, so try again if needed
    # (same relay id: it takes its slots back at once).
    unmarked = marked = 0
    for _ in range(8):
        relay = RelayProcess(database_url, kafka, "first", "--batch-size", "50")
        relays.append(relay)
        await wait_until(functools.partial(_progressed, pool, marked), timeout=30, what="the relay to publish")
        relay.kill()
        marked = await _published(pool)
        await asyncio.sleep(0.5)  # let the consumer catch up with what the broker has
        unmarked = len(collector.ids()) - marked
        if unmarked > 0:
            break
    assert unmarked > 0, "no kill landed between the broker's acknowledgement and the mark"
    assert marked < total

    # A relay with another id takes the dead relay's slots once their leases (6 s) run out.
    relays.append(RelayProcess(database_url, kafka, "second", "--batch-size", "500"))
    await collector.wait_count(total, timeout=60)
    await wait_until(lambda: _all_published(pool, total), what="all marked published")
    assert relays[-1].terminate() == 0, relays[-1].output()

    expected = {r[0] for r in await pool.fetch("SELECT e.event_id::text FROM outbox JOIN events e USING (position)")}
    assert collector.ids() == expected
    # At least once: what was sent but not marked when the relay died is sent again ...
    assert len(collector.records) - len(expected) >= unmarked
    # ... and the first arrival of each message still follows its key's order.
    for key, versions in versions_by_key(collector).items():
        assert list(dict.fromkeys(versions)) == list(range(100)), key
    owners = {r[0] for r in await pool.fetch("SELECT DISTINCT published_by FROM outbox")}
    assert owners == {"first", "second"}


async def _progressed(pool: asyncpg.Pool, marked: int) -> bool:
    return await _published(pool) > marked


async def _started(pool: asyncpg.Pool) -> bool:
    return await _published(pool) > 0


async def _all_published(pool: asyncpg.Pool, total: int) -> bool:
    return await _published(pool) == total


async def _slot_owners(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch("SELECT DISTINCT owner FROM outbox_slots WHERE lease_until > now()")
    return {r[0] for r in rows}


@pytest.mark.fault
async def test_two_relay_processes_share_the_slots_and_keep_order_per_key(
    outbox_store: EventStore, database_url: str, kafka: str, collector: Collector, relays: list[RelayProcess]
) -> None:
    streams, rounds = 30, 40
    pool = outbox_store.pool
    relays.append(RelayProcess(database_url, kafka, "a", "--batch-size", "20"))
    await wait_until(lambda: _owned_by(pool, {"a"}), timeout=30, what=f"relay a:\n{relays[0].output()}")

    async def append(stream: int, n: int) -> None:
        await outbox_store.append(f"order-{stream}", [NewEvent("OrderPlaced", {"n": n})])

    for n in range(rounds):
        await asyncio.gather(*(append(s, n) for s in range(streams)))
        if n == 5:
            relays.append(RelayProcess(database_url, kafka, "b", "--batch-size", "20"))
        if n == rounds // 2:  # keep writing while both relays hold slots
            await wait_until(lambda: _owned_by(pool, {"a", "b"}), timeout=30, what="slots split")
        await asyncio.sleep(0.03)
    await collector.wait_count(streams * rounds, timeout=60)
    for relay in relays:
        assert relay.terminate() == 0, relay.output()

    publishers = {r[0] for r in await pool.fetch("SELECT DISTINCT published_by FROM outbox")}
    assert publishers == {"a", "b"}
    # Handing a slot over is orderly (marked published, then released), so nothing is sent twice.
    assert versions_by_key(collector) == {f"order-{s}": list(range(rounds)) for s in range(streams)}
    assert await _slot_owners(pool) == set(), "stopped relays hand their slots back"


async def _owned_by(pool: asyncpg.Pool, owners: set[str]) -> bool:
    return await _slot_owners(pool) == owners


def test_relay_command_fails_cleanly_on_bad_settings(database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    missing = subprocess.run(
        [EVENTSTORE, "--database-url", database_url, "outbox", "relay"], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 2 and "no Kafka" in missing.stderr
    short = subprocess.run(
        [EVENTSTORE, "--database-url", database_url, "--kafka", "127.0.0.1:1", "outbox", "relay",
         "--lease-ttl", "2"],
        capture_output=True, text=True,
    )
    assert short.returncode == 2 and "lease_ttl" in short.stderr
    assert "Traceback" not in missing.stderr + short.stderr
