"""Partitioned projections: replay and live throughput with 1, 2 and 4 runner processes on one database.

`python -m benchmarks.partitions [--events N] [--rounds R] [--io-ms MS]`. A projection with N partitions
is run by N processes (`worker` below, each a `ProjectionRunner`; the runners split the partitions
fairly, one each). Its handler waits `--io-ms` per batch of `--batch` events, as a call to another
service would, then writes one row per event. Replay: the log is written first, the workers start
together and the clock runs until every partition's checkpoint has reached the head. Live: the
workers are caught up and idle, another batch of the same size commits in one transaction, and the
clock runs from its commit until the projection has caught up (notified, not polling). `--io-ms 0`
shows where PostgreSQL (and this machine's two cores) become the limit. Ratios are against 1 process,
in the same run; the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import WorkerProcesses, fresh_database
from eventstore import START, Checkpoint, EventStore, NewEvent, RecordedEvent
from eventstore.embedded import database_url
from projections import Projection, ProjectionRunner, handles
from projections import sql as projection_sql

STREAMS = 2000


class Waiting(Projection):
    """One row per event, after waiting `io` seconds per batch (a remote call)."""

    tables = {"waited": "CREATE TABLE waited (position bigint PRIMARY KEY, stream_id text NOT NULL)"}

    def __init__(self, name: str, partitions: int, io: float) -> None:
        self.io = io
        super().__init__(name=name, partitions=partitions)

    @handles("Tick", batch=True)
    async def ticked(self, conn: Any, events: list[RecordedEvent]) -> None:
        if self.io:
            await asyncio.sleep(self.io)
        await conn.executemany(
            "INSERT INTO waited VALUES ($1, $2)", [(e.position, e.stream_id) for e in events]
        )


async def _worker(url: str, name: str, partitions: int, io: float, batch: int) -> None:
    """One runner process: ready once connected, runs from the `go` line on stdin until stdin closes."""
    async with EventStore(url, max_connections=2) as store:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        runner = ProjectionRunner(
            store, [Waiting(name, partitions, io)], batch_size=batch, poll_interval=0.05, lease_interval=0.1
        )
        async with runner:
            await asyncio.to_thread(sys.stdin.read)


async def _append(store: EventStore, count: int, transactions: int) -> Checkpoint:
    """`count` events over `STREAMS` streams (several per append), in `transactions` transactions."""
    per_stream = max(1, count // STREAMS)
    streams = list(range(count // per_stream))
    last = START
    size = -(-len(streams) // transactions)
    for start in range(0, len(streams), size):
        async with store.unit_of_work() as uow:
            for s in streams[start : start + size]:
                batch = [NewEvent("Tick", {"n": n}) for n in range(per_stream)]
                last = (await uow.append(f"tick-{s}-{last.position}", batch)).checkpoint
    return last


async def _caught_up(store: EventStore, name: str, head: Checkpoint) -> None:
    while True:
        row = await store.pool.fetchrow(projection_sql.CHECKPOINTS, [name])
        if row is not None and (row["log_xid"], row["position"]) >= tuple(head):
            return
        await asyncio.sleep(0.01)


def _workers(url: str, name: str, processes: int, io: float, batch: int) -> WorkerProcesses:
    command = [sys.executable, "-m", "benchmarks.partitions", "worker", url, name, str(processes), str(io), str(batch)]
    return WorkerProcesses([command] * processes)


async def _round(server: str, processes: int, events: int, io: float, batch: int, n: int) -> tuple[float, float]:
    """(replay, live) events per second with `processes` workers on a projection of as many partitions."""
    name = f"wait_{processes}_{n}"
    async with fresh_database(server) as url, EventStore(url, max_connections=4) as store:
        head = await _append(store, events, transactions=40)
        workers = _workers(url, name, processes, io, batch)
        try:
            await asyncio.to_thread(workers.ready)
            started = time.perf_counter()
            workers.go()
            await _caught_up(store, name, head)
            replay = events / (time.perf_counter() - started)
            burst = await _append(store, events, transactions=1)  # all visible at once
            started = time.perf_counter()  # from its commit: the runners were idle, waiting for a notification
            await _caught_up(store, name, burst)
            live = events / (time.perf_counter() - started)
        finally:
            workers.stop()
        applied = await store.pool.fetchval(f"SELECT count(*) FROM projection_{name}_g1.waited")
        assert applied == 2 * events, f"{name}: {applied} rows for {2 * events} events"
    return replay, live


async def main(args: argparse.Namespace, url: str) -> None:
    console = Console()
    counts = (1, 2, 4)
    with_io, without_io = {}, {}
    for io, results in ((args.io_ms / 1000, with_io), (0.0, without_io)):
        await _round(url, 1, min(args.events, 2000), io, args.batch, 0)  # warm-up
        for processes in counts:
            rounds = [await _round(url, processes, args.events, io, args.batch, r + 1) for r in range(args.rounds)]
            results[processes] = (statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds))
    table = Table(title=f"partitioned projection: {args.events:,} events, batch {args.batch}, median of {args.rounds}")
    for column in ("handler", "processes = partitions", "replay ev/s", "x", "live ev/s", "x"):
        table.add_column(column, justify="right")
    for label, results in ((f"waits {args.io_ms:g} ms per batch", with_io), ("no wait (PostgreSQL-bound)", without_io)):
        base_replay, base_live = results[1]
        for processes in counts:
            replay, live = results[processes]
            table.add_row(label, str(processes), f"{replay:,.0f}", f"{replay / base_replay:.2f}", f"{live:,.0f}",
                          f"{live / base_live:.2f}")
    console.print(table)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.partitions")
    parser.add_argument("--database-url")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--io-ms", type=float, default=20.0)
    return parser.parse_args()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        url, name, partitions, io, batch = sys.argv[2:7]
        asyncio.run(_worker(url, name, int(partitions), float(io), int(batch)))
    else:
        args = _parse()
        with database_url(args.database_url) as url:  # the embedded server when none is given
            asyncio.run(main(args, url))
