"""What observing costs: appends, aggregate loads and a projection replay with the OpenTelemetry SDK
installed and exporting, against the same work with the API alone (no SDK: every instrument a no-op).

    python -m benchmarks.telemetry [--rounds 5]

An SDK, once installed, stays for the life of a process, so each mode runs in a child process of its
own; rounds alternate the modes on one server and the table compares their medians as ratios (each
child runs each workload three times and reports the medians; the replays in a database of their own,
as autovacuum after the appends would otherwise fall on them in some rounds and not others). The SDK
runs twice: sampling every span (the worst case) and sampling 10% of traces
(`ParentBased(TraceIdRatioBased(0.1))`, what the README recommends where appends are hot). Spans go
through a batch processor to an exporter that drops them, metrics to a Prometheus reader that the
child scrapes once over HTTP at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from aggregates import Aggregate, DomainEvent, Repository, applies
from benchmarks.common import Timer, fresh_database, rate
from eventstore import AppendResult, Checkpoint, EventStore, NewEvent, RecordedEvent
from eventstore.embedded import database_url
from eventstore.telemetry import instrumented_append
from projections import Projection, ProjectionRunner, handles

APPENDS = 6000
WRITERS = 8
LOADS = 300
STREAM_LENGTH = 100
REPLAY = 100_000
SAMPLED = 0.1
REPEATS = 3  # of each workload in one child


WRAPPED = 20_000
_RESULT = AppendResult("s", 0, 1, 1, 1, (), False)


class _Cpu:
    """This process's CPU time over a block: what the client spends, whatever else the machine runs."""

    def __enter__(self) -> _Cpu:
        self.start = time.process_time()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.process_time() - self.start


class Added(DomainEvent):
    amount: int


class TallyState(BaseModel):
    total: int = 0


class Tally(Aggregate[TallyState], category="tally"):
    @applies(Added)
    def _added(self, event: Added) -> None:
        self.state.total += event.amount


def _totals(n: int) -> Projection:
    """The replay's projection; each replay of one child builds a projection (and table) of its own."""
    table = f"bench_totals_{n}"

    class Totals(Projection):
        name = table
        tables = {table: f"CREATE TABLE {table} (stream text PRIMARY KEY, total bigint NOT NULL)"}

        @handles("Added", batch=True)
        async def added(self, conn: Any, events: list[RecordedEvent]) -> None:
            await conn.executemany(
                f"INSERT INTO {table} VALUES ($1, 1) ON CONFLICT (stream) DO UPDATE SET total = {table}.total + 1",
                [(e.stream_id,) for e in events],
            )

    return Totals()


def _install_sdk(ratio: float | None) -> tuple[Any, Any]:
    """The SDK exporting metrics and spans: every span, or (`ratio`) the sampling the README recommends."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased

    from eventstore import serve_metrics

    class Dropping(SpanExporter):
        exported = 0

        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            Dropping.exported += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ALWAYS_ON if ratio is None else ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    trace.set_tracer_provider(provider)
    return serve_metrics(0), (provider, Dropping)


async def _appends(store: EventStore, tag: str) -> tuple[float, float]:
    """(events/s, client CPU seconds per append) of `APPENDS` appends of one event by `WRITERS` writers."""
    per_writer = APPENDS // WRITERS

    async def writer(w: int) -> None:
        for i in range(per_writer):
            await store.append(f"{tag}w{w}-{i}", [NewEvent("Added", {"amount": i})])

    with Timer() as timer, _Cpu() as cpu:
        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    return rate(per_writer * WRITERS, timer.seconds), cpu.seconds / (per_writer * WRITERS)


async def _loads(store: EventStore) -> tuple[float, float]:
    tallies = Repository(store, Tally)
    with Timer() as timer, _Cpu() as cpu:
        for i in range(LOADS):
            await tallies.get(str(i % 10))
    return rate(LOADS * STREAM_LENGTH, timer.seconds), cpu.seconds / (LOADS * STREAM_LENGTH)


async def _fill_replay(store: EventStore) -> Checkpoint:
    for chunk in range(REPLAY // 1000):
        await store.append(f"replay-{chunk}", [NewEvent("Added", {"amount": i}) for i in range(1000)])
    last = (await store.append("replay-end", [NewEvent("Added", {"amount": 0})])).checkpoint
    # As autovacuum would after a load this size: with the statistics of a much smaller table the
    # planner sorts every event of the type for each page (three times slower here; docs/operations.md).
    await store.pool.execute("ANALYZE events")
    return last


async def _replay(store: EventStore, last: Checkpoint, n: int) -> tuple[float, float]:
    with Timer() as timer, _Cpu() as cpu:
        async with ProjectionRunner(store, [_totals(n)], batch_size=500) as runner:
            await runner.wait_caught_up(last, interval=0.005)
    return rate(REPLAY + 1, timer.seconds), cpu.seconds / (REPLAY + 1)


async def _wrapper_cost() -> float:
    """Seconds the append instrumentation adds around one call (an append that does nothing)."""

    class Nothing:
        @instrumented_append
        async def append(self, stream_id: str, events: list[NewEvent]) -> AppendResult:
            return _RESULT

    nothing, events = Nothing(), [NewEvent("Added")]
    for _ in range(1000):
        await nothing.append("s", events)
    with _Cpu() as cpu:
        for _ in range(WRAPPED):
            await nothing.append("s", events)
    return cpu.seconds / WRAPPED


async def _measure(server_url: str) -> dict[str, Any]:
    """Each workload `REPEATS` times (the child reports their medians); the replays in a database of
    their own, so that autovacuum after the appends falls on no replay."""
    runs: dict[str, list[tuple[float, float]]] = {"append": [], "load": [], "replay": []}
    async with fresh_database(server_url) as url, EventStore(url, max_connections=WRITERS) as store:
        await _appends(store, "warm")  # warm-up: connections, prepared statements, the first calls
        for n in range(REPEATS):
            runs["append"].append(await _appends(store, f"r{n}"))
        for n in range(10):
            await store.append(f"tally-{n}", [NewEvent("Added", {"amount": i}) for i in range(STREAM_LENGTH)])
        await _loads(store)
        for _ in range(REPEATS):
            runs["load"].append(await _loads(store))
    async with fresh_database(server_url) as url, EventStore(url, max_connections=WRITERS) as store:
        last = await _fill_replay(store)
        for n in range(REPEATS):
            runs["replay"].append(await _replay(store, last, n))
    out: dict[str, Any] = {}
    for key, measured in runs.items():
        out[key] = statistics.median(rate for rate, _ in measured)
        out[f"cpu_{key}"] = statistics.median(cpu for _, cpu in measured)
    out["wrapper"] = await _wrapper_cost()
    return out


MODES = {"api": "API only (no SDK)", "sdk": "SDK, every span", "sampled": f"SDK, {SAMPLED:.0%} sampled"}


def _child(server_url: str, mode: str) -> dict[str, Any]:
    if mode == "api":
        return asyncio.run(_measure(server_url))
    server, (provider, exporter) = _install_sdk(SAMPLED if mode == "sampled" else None)
    out = asyncio.run(_measure(server_url))
    provider.force_flush()
    with urllib.request.urlopen(server.url) as response:
        text = response.read().decode()
    counts = "eventstore_append_duration_seconds_count"
    out["scraped_append_series"] = sum(1 for line in text.splitlines() if line.startswith(counts))
    out["spans_exported"] = exporter.exported
    server.close()
    return out


ROWS = (
    ("append", f"appends ({WRITERS} writers, 1 event each)", "events/s"),
    ("load", f"aggregate loads ({STREAM_LENGTH} events replayed each)", "events/s"),
    ("replay", f"projection replay ({REPLAY:,} events, batches of 500)", "events/s"),
)


CPU_ROWS = (
    ("cpu_append", "client CPU per append", "µs"),
    ("cpu_load", "client CPU per event loaded", "µs"),
    ("cpu_replay", "client CPU per event replayed", "µs"),
    ("wrapper", "the append instrumentation alone, per call", "µs"),
)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.telemetry")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=tuple(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.url, args.child)))
        return
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    console = Console()
    order = list(MODES)
    with database_url() as url:
        for n in range(args.rounds):
            for mode in order[n % 3:] + order[: n % 3]:  # each mode goes first in turn
                output = subprocess.run(
                    [sys.executable, "-m", "benchmarks.telemetry", "--child", mode, "--url", url],
                    check=True, capture_output=True, text=True,
                ).stdout
                runs[mode].append(json.loads(output.strip().splitlines()[-1]))
            console.print(f"round {n + 1}/{args.rounds} done")
    table = Table(title=f"telemetry cost: medians of {args.rounds} rounds, modes alternating")
    for column in ("benchmark", MODES["api"], MODES["sdk"], "ratio", MODES["sampled"], "ratio ", "unit"):
        table.add_column(column, justify="left" if column in ("benchmark", "unit") else "right")
    for rows, scale, digits in ((ROWS, 1.0, 0), (CPU_ROWS, 1e6, 1)):
        for key, label, unit in rows:
            base, every, sampled = (statistics.median(r[key] for r in runs[m]) * scale for m in MODES)
            table.add_row(label, f"{base:,.{digits}f}", f"{every:,.{digits}f}", f"{every / base:.3f}",
                          f"{sampled:,.{digits}f}", f"{sampled / base:.3f}", unit)
    console.print(table)
    for mode in ("sdk", "sampled"):
        last = runs[mode][-1]
        console.print(f"{MODES[mode]}: exported {last['spans_exported']:,} spans and "
                      f"{last['scraped_append_series']} eventstore_append_duration_seconds_count series (last round)")


if __name__ == "__main__":
    main()
