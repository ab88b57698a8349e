"""Metrics, spans and logs of the projection runner, through the OpenTelemetry API only.

Counters and the batch histogram are kept by the runner that owns a projection; lag and state are
read from the checkpoint table when metrics are collected, so any runner (owner or standby) reports
the same figures.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from eventstore import EventStore
from eventstore.telemetry import Probe, Probes
from projections import sql
from projections.projection import HandlerFailed

if TYPE_CHECKING:
    from projections.runner import ProjectionRunner

log = logging.getLogger("projections.telemetry")

tracer = trace.get_tracer("projections")
meter = metrics.get_meter("projections")

LAG_CAP = 1_000_000
"""Lag in events is counted up to this many: a projection further behind reports this figure."""

STATUSES = ("running", "stopped", "failed")

_NAME = "projection.name"

_events = meter.create_counter(
    "projection.events", unit="{event}", description="Events read and applied in committed batches, by projection"
)
_batches = meter.create_histogram(
    "projection.batch.duration", unit="s", description="One batch transaction: read, handle, move the checkpoint"
)
_failures = meter.create_counter(
    "projection.failures", unit="{failure}", description="Handler failures that stopped a projection"
)

_gauges: Probes[list[asyncpg.Record]] = Probes()


def _lag(options: CallbackOptions) -> Iterable[Observation]:
    for rows in _gauges.samples():
        for row in rows:
            yield Observation(row["lag"], {_NAME: row["name"]})


def _lag_seconds(options: CallbackOptions) -> Iterable[Observation]:
    for rows in _gauges.samples():
        for row in rows:
            yield Observation(row["lag_seconds"], {_NAME: row["name"]})


def _state(options: CallbackOptions) -> Iterable[Observation]:
    for rows in _gauges.samples():
        for row in rows:
            for status in STATUSES:
                yield Observation(int(row["status"] == status), {_NAME: row["name"], "projection.status": status})


meter.create_observable_gauge(
    "projection.lag", [_lag], unit="{event}", description="Events in the log after the projection's checkpoint"
)
meter.create_observable_gauge(
    "projection.lag.age", [_lag_seconds], unit="s",
    description="Age of the oldest event the projection has yet to handle (0 when caught up)",
)
meter.create_observable_gauge(
    "projection.state", [_state], unit="1", description="1 for the projection's current status, 0 for the others"
)


def watch_projections(owner: object, store: EventStore, names: Sequence[str] | None = None) -> None:
    """Report the lag and state of these projections (default: every one in the database) through
    `store`, on the running loop, until `unwatch(owner)`."""
    chosen = None if names is None else list(names)

    async def gauges() -> list[asyncpg.Record]:
        return list(await store.pool.fetch(sql.PROJECTION_GAUGES, chosen, LAG_CAP))

    _gauges.add(owner, Probe(gauges))


def watch(runner: ProjectionRunner) -> None:
    watch_projections(runner, runner.store, [p.name for p in runner.projections])


def unwatch(owner: object) -> None:
    _gauges.discard(owner)


Step = TypeVar("Step", bound=Callable[..., Awaitable[tuple[Any, int]]])


def batch(method: Step) -> Step:
    """Wrap a worker's batch step (`_Worker._step`): its duration, the events it applied, and a span.

    Idle steps (nothing to apply, once per poll interval) leave no trace: the span of a batch is made
    once its outcome is known, with the batch's start time.
    """

    @functools.wraps(method)
    async def step(worker: Any, *args: Any) -> tuple[Any, int]:
        attributes = {_NAME: worker.projection.name}
        started, started_ns = time.perf_counter(), time.time_ns()
        try:
            outcome, count = await method(worker, *args)
        except HandlerFailed as failed:
            span = tracer.start_span("projection batch", kind=SpanKind.INTERNAL, attributes=attributes,
                                     start_time=started_ns)
            span.record_exception(failed.error)
            span.set_status(Status(StatusCode.ERROR, "handler failed"))
            span.end()
            raise
        if count:
            _events.add(count, attributes)
            _batches.record(time.perf_counter() - started, attributes)
            span = tracer.start_span("projection batch", kind=SpanKind.INTERNAL, attributes=attributes,
                                     start_time=started_ns)
            span.set_attribute("projection.batch.events", count)
            span.end()
        return outcome, count

    return step  # type: ignore[return-value]


Fail = TypeVar("Fail", bound=Callable[..., Awaitable[None]])


def failure(method: Fail) -> Fail:
    """Wrap a worker's `_fail`: count the failure and log it with its ids under a stable name."""

    @functools.wraps(method)
    async def fail(worker: Any, conn: Any, failed: HandlerFailed) -> None:
        event = failed.event
        _failures.add(1, {_NAME: worker.projection.name})
        log.warning(  # the runner logs the failure with its traceback; this record carries the ids
            "projection.failed",
            extra={"projection": worker.projection.name, "event_id": str(event.event_id),
                   "event_type": event.event_type, "position": event.position, "log_xid": event.log_xid,
                   "error": repr(failed.error)},
        )
        await method(worker, conn, failed)

    return fail  # type: ignore[return-value]
