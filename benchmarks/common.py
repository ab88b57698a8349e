"""Shared pieces of the benchmarks: result rows, fresh databases, the peer's configuration."""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
from sqlalchemy.engine import make_url

from eventstore import asyncpg_dsn
from eventstore_app import migrate_async


@dataclass
class Result:
    """One row of the table. `peer` is the `eventsourcing` package, `limit` is raw asyncpg."""

    name: str
    ours: float
    unit: str
    peer: float | None = None
    limit: float | None = None
    cpu: float | None = None
    """Client CPU (this process, every thread) per event, in microseconds, for `ours`."""
    limit_cpu: float | None = None
    """The same for `limit`."""


ROUNDS = 5
"""Rounds measured after a warm-up; a row reports their median."""


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


class Timer:
    """Wall-clock seconds, and the CPU seconds of this process (all its threads) in the same span."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.seconds = 0.0
        self.cpu = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu = time.process_time() - self.cpu_start


@dataclass(frozen=True)
class Measure:
    """One measured round: events per second and client CPU microseconds per event."""

    rate: float
    cpu_us: float

    @classmethod
    def of(cls, count: int, timer: Timer) -> Measure:
        return cls(rate(count, timer.seconds), timer.cpu / count * 1e6 if count else 0.0)


def median_of(rounds: list[Measure]) -> Measure:
    """The median round by rate, and the median CPU per event."""
    return Measure(statistics.median(m.rate for m in rounds), statistics.median(m.cpu_us for m in rounds))


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, *, migrated: bool = True) -> AsyncIterator[str]:
    """A new database on the benchmark server, dropped afterwards."""
    name = f"es_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(server_url, name)
    try:
        if migrated:
            await migrate_async(url)
        yield url
    finally:
        admin = await asyncpg.connect(asyncpg_dsn(server_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextlib.contextmanager
def eventsourcing_env(url: str) -> Iterator[None]:
    """Point the `eventsourcing` package's PostgreSQL persistence at the database at `url`."""
    parsed = make_url(url)
    host = parsed.host or parsed.query.get("host") or "127.0.0.1"
    if isinstance(host, tuple):
        host = host[0]
    values = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": parsed.database or "postgres",
        "POSTGRES_HOST": str(host),
        "POSTGRES_PORT": str(parsed.port or 5432),
        "POSTGRES_USER": parsed.username or "postgres",
        "POSTGRES_PASSWORD": parsed.password or "",
        "POSTGRES_CREATE_TABLE": "y",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class WorkerProcesses:
    """Worker processes that print `ready` once set up and start on a `go` line; closing stdin stops them.

    Started together and released together, so a measurement times the work, not the processes' start.
    """

    def __init__(self, commands: list[list[str]]) -> None:
        self.processes = [
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for command in commands
        ]

    def ready(self) -> None:
        for process in self.processes:
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"

    def go(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()

    def stop(self) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.close()
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
