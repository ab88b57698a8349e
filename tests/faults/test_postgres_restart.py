"""PostgreSQL itself restarts under load: the server is stopped (fast, then immediate, which is a crash)
and started again while writers append, a runner process projects and a relay process publishes.

The test restarts nothing but the server: the runner and the relay must reconnect by themselves.
Nothing the store acknowledged is lost or applied twice; an append that raised during an outage is
stored at most once (and a writer that sends it again with the same ids learns whether it was); order
per stream holds in the log, in the read model and on Kafka.

It always runs a PostgreSQL server of its own (`EmbeddedPostgres`), even when EVENTSTORE_DATABASE_URL
names one: stopping a shared server would stop everyone's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from eventstore import Checkpoint, EventStore, NewEvent, StreamState
from eventstore.embedded import EmbeddedPostgres, ShutdownMode
from eventstore_app import migrate
from outbox import Outbox, Route, from_record
from outbox.embedded import EmbeddedBroker
from tests.outbox.conftest import Collector, create_topic
from tests.projections.app import SLOW_ENV, assert_ledger_exactly_once, eventually

pytestmark = pytest.mark.fault


# -- the store and outbox API this test relies on, in one place: they are being reworked ------------

ROUTED_CATEGORY = "acc"
LEDGER_CHECKPOINT = "SELECT log_xid, position FROM projection_checkpoints WHERE name = 'ledger'"
UNPUBLISHED = "SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_at IS NULL"
PUBLISHED = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"
DEAD = "SELECT count(*) FROM outbox WHERE dead_at IS NOT NULL"
ROUTED_EVENTS = "SELECT e.event_id FROM outbox JOIN events e USING (position)"


@contextlib.asynccontextmanager
async def writer_store(url: str, topic: str, retry_for: float) -> AsyncIterator[EventStore]:
    """A store whose appends to streams of `ROUTED_CATEGORY` write outbox messages for `topic`."""
    async with EventStore(url, retry_for=retry_for) as store:
        await Outbox([Route(topic, category=ROUTED_CATEGORY)], source="/faults/restart").declare(store)
        yield store


# -----------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
EVENTSTORE = str(Path(sys.executable).with_name("eventstore"))
RESTARTS: list[tuple[ShutdownMode, float]] = [("fast", 2.0), ("immediate", 2.0), ("fast", 1.0)]
"""(how the server is stopped, seconds it stays down); each restart happens under load."""
WRITERS = 4


@pytest.fixture
def private_postgres() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as server:
        migrate(server.url)
        yield server


@dataclass
class Writes:
    """What the writers were told: acknowledged appends, and appends that raised and were given up."""

    acknowledged: list[uuid.UUID] = field(default_factory=list)
    abandoned: list[uuid.UUID] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    resent_and_found: int = 0  # raised, then sent again with the same ids: the first attempt had been stored
    resent_and_written: int = 0  # raised, then sent again: the first attempt had not been stored


def _move(account: str, n: int) -> list[NewEvent]:
    """A deposit and a withdrawal; `n` is the writer's sequence number, to check order per stream."""
    return [
        NewEvent("Deposited", {"account": account, "amount": 10 + n % 7, "n": 2 * n}),
        NewEvent("Withdrawn", {"account": account, "amount": n % 3, "n": 2 * n + 1}),
    ]


async def _writer(store: EventStore, a: int, writes: Writes, stop: asyncio.Event) -> None:
    """Writers 0 and 1 expect exact versions and send a failed append again until it is acknowledged
    (the same ids: idempotent); writers 2 and 3 append at any version and give a failed append up."""
    stream, account = f"{ROUTED_CATEGORY}-{a}", f"{ROUTED_CATEGORY}{a}"
    resend = a < 2
    version = -1
    n = 0
    while not stop.is_set():
        events = _move(account, n)
        n += 1
        expected = StreamState.ANY if not resend else StreamState.NO_STREAM if version < 0 else version
        failed = False
        while True:
            try:
                result = await store.append(stream, events, expected)
            except Exception as exc:
                writes.errors[type(exc).__name__] += 1
                if not resend:
                    writes.abandoned.extend(e.event_id for e in events)
                    break
                failed = True
                await asyncio.sleep(0.1)
                continue
            writes.acknowledged.extend(e.event_id for e in events)
            version = result.next_expected_version
            if failed:
                if result.duplicate:
                    writes.resent_and_found += 1
                else:
                    writes.resent_and_written += 1
            break
        await asyncio.sleep(0.005)


async def _spawn(log: Path, *args: str, **env: str) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            EVENTSTORE, *args, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out
        )


async def _refused(url: str) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=2)
    except OSError:
        return True
    await conn.close()
    return False


async def test_components_reconnect_by_themselves_after_postgres_restarts(
    private_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    server = private_postgres
    url = server.url
    with EmbeddedBroker() as broker:
        servers = broker.bootstrap_servers
        topic = await create_topic(servers, f"restart-{uuid.uuid4().hex[:8]}")
        log = tmp_path / "processes.log"
        runner = await _spawn(
            log, "--database-url", url, "projections", "run", "--app", "tests.projections.app:APP",
            "--only", "ledger", "--batch-size", "20", "--poll-interval", "0.2", "--lease-interval", "0.2",
            **{SLOW_ENV: "1"},  # 1 ms per event: a batch transaction is open most of the time when the server stops
        )
        relay = await _spawn(
            log, "--database-url", url, "--kafka", servers, "outbox", "relay", "--relay-id", "restart",
            "--send-timeout", "1", "--lease-ttl", "6", "--poll-interval", "0.3", "--batch-size", "50",
        )
        collector = Collector(servers, topic)
        await collector.start()
        writes = Writes()
        stop = asyncio.Event()
        refused: list[bool] = []
        start_times: list[Any] = []
        alive_after_restarts: tuple[int | None, int | None] = (None, None)
        try:
            async with writer_store(url, topic, retry_for=0.5) as store:
                writers = [asyncio.create_task(_writer(store, a, writes, stop)) for a in range(WRITERS)]
                await eventually(lambda: _working(store), 30, "the runner and the relay at work")
                await asyncio.sleep(0.5)
                for mode, down in RESTARTS:
                    start_times.append(await _postmaster_start_time(url))
                    await asyncio.to_thread(server.stop, mode)
                    await asyncio.sleep(down / 2)
                    refused.append(await _refused(url))
                    await asyncio.sleep(down / 2)
                    await asyncio.to_thread(server.start)
                    await asyncio.sleep(2.0)  # the writers go on; the runner and the relay reconnect
                start_times.append(await _postmaster_start_time(url))
                acknowledged_before_the_end = len(writes.acknowledged)
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*writers)
                written_after_the_last_restart = len(writes.acknowledged) - acknowledged_before_the_end

            async with EventStore(url) as admin:
                await eventually(lambda: _none_pending(admin), 60, "the relay publishing every message")
                head = await admin.last_committed()
                await eventually(lambda: _projected(admin, head), 60, "the runner projecting every event")
                alive_after_restarts = (runner.returncode, relay.returncode)
                ledger_events = await assert_ledger_exactly_once(admin)
                stored = await admin.pool.fetch(
                    "SELECT event_id, stream_id, stream_version, (data->>'n')::int AS n FROM events"
                )
                routed = {r[0] for r in await admin.pool.fetch(ROUTED_EVENTS)}
                dead = await admin.pool.fetchval(DEAD)
            await collector.wait_for(lambda c: {str(i) for i in routed} <= c.ids(), timeout=30)
        finally:
            stop.set()
            await collector.stop()
            for process in (runner, relay):
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                    await process.wait()
            print(log.read_text(errors="replace")[-4000:])
            print(server.log_tail(3000))
            print(f"writes: {len(writes.acknowledged)} acknowledged, {len(writes.abandoned)} abandoned, "
                  f"errors {dict(writes.errors)}; sent again after raising: {writes.resent_and_found} had been "
                  f"stored, {writes.resent_and_written} had not")

    assert len(set(start_times)) == len(RESTARTS) + 1, f"the server did not restart each time: {start_times}"
    assert all(refused), "connections were not refused while the server was down"
    assert writes.errors, "no append raised: the outage was not seen by the writers"
    assert written_after_the_last_restart > 0
    assert alive_after_restarts == (None, None), "the runner or the relay exited instead of reconnecting"

    # The log: every acknowledged event exactly once, an abandoned one at most once, nothing else.
    counts = Counter(r["event_id"] for r in stored)
    assert all(counts[i] == 1 for i in writes.acknowledged), "an acknowledged event is missing or doubled"
    assert all(counts[i] <= 1 for i in writes.abandoned)
    assert set(counts) <= set(writes.acknowledged) | set(writes.abandoned), "the log holds events nobody sent"
    assert len(set(writes.acknowledged)) == len(writes.acknowledged)
    # Order per stream: versions without gaps, in the order each writer sent its events.
    by_stream: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in stored:
        by_stream[r["stream_id"]].append((r["stream_version"], r["n"]))
    for stream, rows in by_stream.items():
        rows.sort()
        assert [v for v, _ in rows] == list(range(len(rows))), f"{stream}: versions with gaps"
        sequence = [n for _, n in rows]
        assert sequence == sorted(sequence), f"{stream}: events out of the writer's order"

    # The read model applied every stored event exactly once.
    assert ledger_events == len(stored)

    # Kafka: every routed event arrived (at least once), in order per key within its partition.
    assert routed == set(counts), "an event was not routed to the outbox"
    assert dead == 0
    first_seen: dict[tuple[str, int], list[int]] = defaultdict(list)
    for record in collector.records:
        event = from_record(record)
        first_seen[(str(event.subject), record.partition)].append(int(event.extensions["streamversion"]))
    for (key, partition), versions in first_seen.items():
        firsts = list(dict.fromkeys(versions))
        assert firsts == list(range(len(by_stream[key]))), f"{key} (partition {partition}): {firsts}"
    assert {key for key, _ in first_seen} == set(by_stream)


async def test_a_runner_and_a_relay_started_while_postgres_is_down_wait_for_it(
    private_postgres: EmbeddedPostgres, tmp_path: Path
) -> None:
    """A supervisor that starts them during a restart (or before the database) gets processes that wait,
    not processes that exit."""
    server = private_postgres
    url = server.url
    with EmbeddedBroker() as broker:
        servers = broker.bootstrap_servers
        topic = await create_topic(servers, f"late-{uuid.uuid4().hex[:8]}")
        async with writer_store(url, topic, retry_for=5) as store:
            await store.append(f"{ROUTED_CATEGORY}-1", _move(f"{ROUTED_CATEGORY}1", 0))
        await asyncio.to_thread(server.stop, "fast")
        log = tmp_path / "processes.log"
        runner = await _spawn(
            log, "--database-url", url, "projections", "run", "--app", "tests.projections.app:APP",
            "--only", "ledger", "--poll-interval", "0.2", "--lease-interval", "0.2",
        )
        relay = await _spawn(
            log, "--database-url", url, "--kafka", servers, "outbox", "relay", "--relay-id", "late",
            "--send-timeout", "1", "--lease-ttl", "6", "--poll-interval", "0.3",
        )
        collector = Collector(servers, topic)
        try:
            await asyncio.sleep(3.0)
            assert (runner.returncode, relay.returncode) == (None, None), log.read_text(errors="replace")
            await asyncio.to_thread(server.start)
            await collector.start()
            async with EventStore(url) as admin:
                head = await admin.last_committed()
                await eventually(lambda: _projected(admin, head), 60, "the runner projecting")
                await eventually(lambda: _none_pending(admin), 60, "the relay publishing")
                assert await assert_ledger_exactly_once(admin) == 2
            await collector.wait_count(2, timeout=30)
        finally:
            await collector.stop()
            for process in (runner, relay):
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                    await process.wait()


async def _postmaster_start_time(url: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT pg_postmaster_start_time()")
    finally:
        await conn.close()


async def _working(store: EventStore) -> bool:
    projected = await store.pool.fetchrow(LEDGER_CHECKPOINT)
    published = await store.pool.fetchval(PUBLISHED)
    return projected is not None and projected[1] > 0 and published > 0


async def _none_pending(store: EventStore) -> bool:
    return bool(await store.pool.fetchval(UNPUBLISHED) == 0)


async def _projected(store: EventStore, head: Checkpoint) -> bool:
    row = await store.pool.fetchrow(LEDGER_CHECKPOINT)
    return row is not None and Checkpoint(row[0], row[1]) >= head
