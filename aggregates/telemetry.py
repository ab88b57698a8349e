"""Metrics and spans of aggregate loads and saves, through the OpenTelemetry API only."""

from __future__ import annotations

import contextvars
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from opentelemetry import metrics, trace

from eventstore.telemetry import Tally, current_span

tracer = trace.get_tracer("aggregates")
meter = metrics.get_meter("aggregates")

_TYPE = "aggregate.type"

_load_duration = meter.create_histogram(
    "aggregate.load.duration", unit="s", description="Loading one aggregate: snapshot, read, replay"
)
_replayed = Tally(
    meter, "aggregate.load.replayed_events", unit="{event}", description="Events replayed by loads (after the snapshot)"
)
_snapshots = Tally(
    meter, "aggregate.load.snapshots", unit="{load}",
    description="Loads of aggregates that snapshot, by whether a snapshot served (hit) or not (miss)",
)
_save_duration = meter.create_histogram(
    "aggregate.save.duration", unit="s", description="Saving one aggregate: the append and a due snapshot"
)

# The stream version a load's snapshot restored (-1: none), for the load that wraps it.
_restored: contextvars.ContextVar[int] = contextvars.ContextVar("aggregate_snapshot", default=-1)

Load = TypeVar("Load", bound=Callable[..., Awaitable[Any]])


def load(method: Load) -> Load:
    """Wrap `Repository.get`: a span, its duration, and the events it replayed."""

    @functools.wraps(method)
    async def get(repository: Any, aggregate_id: str, **kwargs: Any) -> Any:
        kind = repository.aggregate_type.__qualname__
        attributes = {_TYPE: kind}
        started = time.perf_counter()
        token = _restored.set(-1)
        try:
            with current_span(tracer, "aggregate load", {**attributes, "aggregate.id": str(aggregate_id)}) as span:
                aggregate = await method(repository, aggregate_id, **kwargs)
                replayed = aggregate.version - _restored.get()
                if span.is_recording():
                    span.set_attribute("aggregate.replayed_events", replayed)
                    span.set_attribute("aggregate.version", aggregate.version)
        finally:
            _restored.reset(token)
        _replayed.add(replayed, ((_TYPE, kind),))
        _load_duration.record(time.perf_counter() - started, attributes)
        return aggregate

    return get  # type: ignore[return-value]


Restore = TypeVar("Restore", bound=Callable[..., Awaitable[int]])


def snapshot(method: Restore) -> Restore:
    """Wrap `Repository._restore_snapshot`: count hits and misses; tell the load where replay began."""

    @functools.wraps(method)
    async def restore(repository: Any, *args: Any) -> int:
        version = await method(repository, *args)
        _restored.set(version)
        result = "hit" if version >= 0 else "miss"
        _snapshots.add(1, ((_TYPE, repository.aggregate_type.__qualname__), ("aggregate.snapshot.result", result)))
        return version

    return restore  # type: ignore[return-value]


Save = TypeVar("Save", bound=Callable[..., Awaitable[Any]])


def save(method: Save) -> Save:
    """Wrap `Repository.save`: a span (the append inside is its child) and its duration."""

    @functools.wraps(method)
    async def save_(repository: Any, aggregate: Any, **kwargs: Any) -> Any:
        attributes = {_TYPE: repository.aggregate_type.__qualname__}
        started = time.perf_counter()
        with current_span(tracer, "aggregate save", {**attributes, "aggregate.id": str(getattr(aggregate, "id", ""))}):
            result = await method(repository, aggregate, **kwargs)
        _save_duration.record(time.perf_counter() - started, attributes)
        return result

    return save_  # type: ignore[return-value]
