"""Everything at once under every fault: writers, a runner process, a relay process and a consumer,
while PostgreSQL kills sessions, the runner and the relay are SIGKILLed, and the broker restarts.

Zero lost and zero skipped: the read model applies every acknowledged event exactly once, and every
acknowledged event reaches Kafka (at least once), in order per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka.errors import TopicAlreadyExistsError

from eventstore import EventStore
from outbox import Outbox, Route, from_record
from outbox.embedded import EmbeddedBroker
from tests.outbox.conftest import Collector, create_topic
from tests.projections.app import assert_ledger_exactly_once, deposit, eventually, withdraw

pytestmark = pytest.mark.fault

ROOT = Path(__file__).resolve().parents[2]
EVENTSTORE = str(Path(sys.executable).with_name("eventstore"))
OUTBOX_EVENT_IDS = "SELECT e.event_id FROM outbox JOIN events e USING (position)"
TERMINATE = """
SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
"""


async def _spawn(log: Path, *args: str) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            EVENTSTORE, *args, cwd=ROOT, env=dict(os.environ), stdout=out, stderr=out
        )


async def _kill(process: asyncio.subprocess.Process) -> None:
    assert process.returncode is None, f"the process had already exited with {process.returncode}"
    process.send_signal(signal.SIGKILL)
    await process.wait()


async def test_no_event_lost_or_skipped_under_every_fault(database_url: str, tmp_path: Path) -> None:
    with EmbeddedBroker() as broker:
        servers = broker.start()
        topic = await create_topic(servers, f"faults-{uuid.uuid4().hex[:8]}")
        runner_args = ("--database-url", database_url, "projections", "run", "--app",
                       "tests.projections.app:APP", "--only", "ledger", "--batch-size", "20",
                       "--poll-interval", "0.2", "--lease-interval", "0.2")
        relay_args = ("--database-url", database_url, "--kafka", servers, "outbox", "relay", "--relay-id", "r1",
                      "--send-timeout", "1", "--lease-ttl", "6", "--poll-interval", "0.3", "--batch-size", "50")
        log = tmp_path / "processes.log"
        processes = [await _spawn(log, *runner_args), await _spawn(log, *relay_args)]
        collector = Collector(servers, topic)
        await collector.start()
        acknowledged: list[uuid.UUID] = []
        stop, running = asyncio.Event(), asyncio.Event()
        running.set()
        received: set[str] = set()
        try:
            async with EventStore(database_url, retry_for=60) as store, EventStore(database_url) as admin:
                await Outbox([Route(topic, category="acc")], source="/faults").declare(store)

                async def writer(a: int) -> None:
                    n = 0
                    while not stop.is_set():
                        await running.wait()
                        events = [deposit(f"acc{a}", 10 + n % 7), withdraw(f"acc{a}", n % 3)]
                        await store.append(f"acc-{a}", events)
                        acknowledged.extend(e.event_id for e in events)
                        n += 1
                        await asyncio.sleep(0.005)

                writers = [asyncio.create_task(writer(a)) for a in range(4)]
                terminated = 0
                for _ in range(3):  # sessions killed under load: writers, runner and relay reconnect
                    await asyncio.sleep(0.5)
                    terminated += await admin.pool.fetchval(TERMINATE)
                await asyncio.sleep(0.5)
                await _kill(processes[0])  # runner SIGKILLed mid-work, then restarted
                processes[0] = await _spawn(log, *runner_args)
                await asyncio.sleep(0.8)
                await _kill(processes[1])  # relay SIGKILLed, then restarted with the same id
                processes[1] = await _spawn(log, *relay_args)
                await asyncio.sleep(0.8)

                # The broker keeps messages in memory only: pause the writers and read everything it
                # has before stopping it, so what a restart loses was already received.
                running.clear()
                await asyncio.sleep(0.1)

                async def everything_published() -> bool:
                    pending = await store.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                    return bool(pending == 0)

                await eventually(everything_published, 90, "relay publishing everything before the broker stops")
                published = {str(r[0]) for r in await store.pool.fetch(OUTBOX_EVENT_IDS)}
                await collector.wait_for(lambda c: published <= c.ids(), timeout=60)
                received |= collector.ids()
                await collector.stop()
                broker.stop()
                running.set()
                await asyncio.sleep(1.5)  # writers go on; the relay backs off
                broker.start()
                # Memory storage lost the topic: create it again with its partitions before the relay's
                # producer has it auto-created with the broker's default count.
                with contextlib.suppress(TopicAlreadyExistsError):
                    await create_topic(servers, topic)
                collector = Collector(servers, topic)
                await collector.start()
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*writers)

                await eventually(everything_published, 90, "every outbox message published after the restart")
                head = await store.last_committed()

                async def runner_caught_up() -> bool:
                    row = await store.pool.fetchrow(
                        "SELECT log_xid, position FROM projection_checkpoints WHERE name = 'ledger'")
                    return row is not None and (row[0], row[1]) >= tuple(head)

                await eventually(runner_caught_up, 90, "the restarted runner catching up")
                ledger_events = await assert_ledger_exactly_once(store)
                stored = [r[0] for r in await store.pool.fetch("SELECT event_id FROM events ORDER BY position")]
                after_restart = {str(r[0]) for r in await store.pool.fetch(OUTBOX_EVENT_IDS)} - published
                await collector.wait_for(lambda c: after_restart <= c.ids(), timeout=60)
                received |= collector.ids()
                versions: dict[tuple[str, int], list[int]] = defaultdict(list)
                for record in collector.records:
                    event = from_record(record)
                    versions[(str(event.subject), record.partition)].append(int(event.extensions["streamversion"]))
        finally:
            stop.set()
            await collector.stop()
            for process in processes:
                if process.returncode is None:
                    await _kill(process)
            print(log.read_text(errors="replace")[-4000:])

    assert terminated >= 3, "sessions were not terminated"
    assert len(acknowledged) > 200
    assert sorted(stored) == sorted(acknowledged), "the log differs from the acknowledged appends"
    assert ledger_events == len(acknowledged)
    assert {str(i) for i in acknowledged} <= received, "an acknowledged event never reached Kafka"
    # Order per key within a partition, after the broker restart (the new topic holds only what came after).
    for key, seen in versions.items():
        firsts = list(dict.fromkeys(seen))
        assert firsts == sorted(firsts), f"{key}: out of order {firsts}"
