"""Fault injection: runner processes killed with SIGKILL, connections terminated by PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import asyncpg
import pytest

from eventstore import Checkpoint, EventStore
from projections import ProjectionAdmin, ProjectionStatus
from tests.projections.app import (
    SLOW_ENV,
    TRACE_ENV,
    Ledger,
    assert_ledger_exactly_once,
    caught_up,
    deposit,
    eventually,
    fill,
    withdraw,
)

pytestmark = pytest.mark.fault

ROOT = Path(__file__).resolve().parents[2]
EVENTSTORE = Path(sys.executable).with_name("eventstore")


async def spawn_runner(database_url: str, log: Path, *, batch_size: int = 10, **env: str) -> asyncio.subprocess.Process:
    """`eventstore projections run` for the ledger projection, as a process of its own."""
    with log.open("ab") as stderr:
        return await asyncio.create_subprocess_exec(
            str(EVENTSTORE), "projections", "run", "--app", "tests.projections.app:APP", "--only", "ledger",
            "--batch-size", str(batch_size), "--poll-interval", "0.2", "--lease-interval", "0.2",
            cwd=ROOT, env={**os.environ, "EVENTSTORE_DATABASE_URL": database_url, **env},
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )


async def ledger_status(store: EventStore) -> ProjectionStatus:
    (status,) = await ProjectionAdmin(store, [Ledger()]).status()
    return status


async def reached(store: EventStore, checkpoint: Checkpoint) -> bool:
    rows = await store.pool.fetch("SELECT log_xid, position FROM projection_checkpoints WHERE name = 'ledger'")
    return bool(rows) and Checkpoint(rows[0][0], rows[0][1]) >= checkpoint


async def stop(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        return await process.wait()


async def test_runner_killed_mid_batch_then_restarted_applies_every_event_once(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    last = await fill(store, accounts=4, rounds=10)
    trace, log = tmp_path / "trace", tmp_path / "runner.log"
    trace.touch()
    runner = await spawn_runner(database_url, log, **{SLOW_ENV: "15", TRACE_ENV: str(trace)})
    try:

        async def inside_a_batch() -> bool:
            try:
                committed = await store.pool.fetchval("SELECT count(*) FROM ledger_applied")
            except asyncpg.exceptions.UndefinedTableError:  # the runner has not created it yet
                return False
            handled = len(trace.read_text().split())
            return committed >= 20 and handled > committed

        await eventually(inside_a_batch, what=f"the runner is half-way through a batch; log: {log.read_text()}")
        runner.kill()
        await runner.wait()
    finally:
        if runner.returncode is None:
            runner.kill()
    committed = await store.pool.fetchval("SELECT count(*) FROM ledger_applied")
    assert committed < 120 and len(trace.read_text().split()) > committed  # it died with work in flight

    restarted = await spawn_runner(database_url, log, **{TRACE_ENV: str(trace)})
    try:
        await eventually(lambda: reached(store, last), what=f"the restarted runner catches up; log: {log.read_text()}")
    finally:
        assert await stop(restarted) == 0
    assert await assert_ledger_exactly_once(store) == 120
    handled_twice = [p for p, n in Counter(trace.read_text().split()).items() if n > 1]
    assert handled_twice  # the killed batch was handled again, and still counted once
    status = await ledger_status(store)
    assert (status.state, status.status, status.runner) == ("stopped", "stopped", None)


async def test_a_second_runner_process_takes_over_when_the_first_is_killed(
    store: EventStore, database_url: str, tmp_path: Path
) -> None:
    first = await fill(store, accounts=3, rounds=5)
    log = tmp_path / "runners.log"
    runners = [await spawn_runner(database_url, log) for _ in range(2)]
    try:
        await eventually(lambda: reached(store, first), what=f"one runner catches up; log: {log.read_text()}")
        status = await ledger_status(store)
        assert status.active and status.runner is not None
        owner_pid = int(status.runner.split(":")[1])
        (owner,) = [r for r in runners if r.pid == owner_pid]
        (standby,) = [r for r in runners if r.pid != owner_pid]
        held = await store.pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = 'eventstore projection ledger'"
        )
        assert held == 1  # both compete, one holds it

        owner.kill()
        await owner.wait()
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        second = await fill(store, accounts=3, rounds=5, prefix="after")

        async def taken_over() -> bool:
            s = await ledger_status(store)
            return s.active and s.runner is not None and s.runner.endswith(f":{standby.pid}")

        await eventually(taken_over, 10, f"the standby takes over within seconds; log: {log.read_text()}")
        took = loop.time() - killed_at
        await eventually(lambda: reached(store, second), what="the standby catches up")
        assert await stop(standby) == 0
    finally:
        for r in runners:
            if r.returncode is None:
                r.kill()
                await r.wait()
    assert took < 10
    assert await assert_ledger_exactly_once(store) == 90


async def _terminate(store: EventStore, application_name: str) -> int:
    return int(
        await store.pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE $1",
            application_name,
        )
    )


async def test_runner_survives_terminated_connections(store: EventStore) -> None:
    projections = ProjectionAdmin(store, [Ledger()])
    stop_writing = asyncio.Event()

    async def writer() -> Checkpoint:
        n, last = 0, Checkpoint(0, 0)
        while not stop_writing.is_set():
            account = f"t{n % 5}"
            last = (await store.append(f"t-{n % 5}", [deposit(account, n), withdraw(account, 1)])).checkpoint
            n += 1
            await asyncio.sleep(0.002)
        return last

    async with projections.runner(batch_size=5, poll_interval=0.1, lease_interval=0.1) as runner:
        writing = asyncio.create_task(writer())
        for _ in range(6):
            await asyncio.sleep(0.1)

            async def terminated() -> bool:  # once the runner is back at work
                return runner.owned == ["ledger"] and await _terminate(store, "eventstore projection ledger") == 1

            await eventually(terminated, what="the runner reconnects after its connection was terminated")
        stop_writing.set()
        last = await writing
        await caught_up(runner, last)
    assert await assert_ledger_exactly_once(store) > 100


async def test_rebuild_survives_terminated_connections(store: EventStore) -> None:
    await store.wait_until_visible(await fill(store, accounts=5, rounds=20))
    projections = ProjectionAdmin(store, [Ledger()])
    async with projections.runner() as runner:
        await runner.wait_caught_up()
    rebuilding = asyncio.create_task(projections.rebuild("ledger", batch_size=3))
    killed = 0
    while not rebuilding.done() and killed < 4:
        await asyncio.sleep(0.05)
        killed += await _terminate(store, "eventstore rebuild ledger")
    result = await rebuilding
    assert killed >= 1 and result.done == 300
    assert await assert_ledger_exactly_once(store) == 300
    (status,) = await projections.status()
    assert (status.generation, status.rebuild) == (2, None)
