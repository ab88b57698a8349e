"""Metrics, spans and trace context of the event store, through the OpenTelemetry API only.

Without an OpenTelemetry SDK every instrument here is the API's no-op, so the library costs next to
nothing unobserved. A process that serves Prometheus metrics installs the SDK with `serve_metrics`
(the `observability` extra); an application that configures its own SDK gets the same instruments.

The trace context of the code that appends travels with each event: the metadata keys `traceparent`
and `tracestate` (W3C Trace Context), which the outbox relay puts on the Kafka message.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from eventstore.errors import (
    AppendConditionFailed,
    AppendRefused,
    DuplicateEventId,
    InvalidArgument,
    WrongExpectedVersion,
)

if TYPE_CHECKING:
    from eventstore.model import AppendResult

log = logging.getLogger(__name__)

T = TypeVar("T")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_KEYS = (TRACEPARENT, TRACESTATE)
"""Metadata keys (and CloudEvents attributes) of the W3C trace context that an event carries."""

SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Histogram boundaries of every duration (unit `s`): an append takes a millisecond, a relay round tens."""

tracer = trace.get_tracer("eventstore")
meter = metrics.get_meter("eventstore")


Attributes = tuple[tuple[str, AttributeValue], ...]
"""A `Tally`'s attributes: (name, value) pairs, in the same order at every call of one counter."""


class Tally:
    """A counter for hot paths: summed in the process, handed to the SDK when metrics are collected.

    An SDK counter's `add` hashes its attributes and walks views and locks on every call (7-14 µs each
    on the benchmark machine); this one updates a dict under a lock (under a µs), and an observable
    counter of the same name reports the sums, so the exported series is the same counter. Without an
    SDK nothing ever collects it.
    """

    def __init__(self, meter: Meter, name: str, unit: str, description: str) -> None:
        self._sums: dict[Attributes, int] = {}
        self._lock = threading.Lock()
        meter.create_observable_counter(name, [self._observe], unit=unit, description=description)

    def add(self, amount: int, attributes: Attributes = ()) -> None:
        with self._lock:
            self._sums[attributes] = self._sums.get(attributes, 0) + amount

    def _observe(self, _: CallbackOptions) -> list[Observation]:
        with self._lock:
            sums = list(self._sums.items())
        return [Observation(total, dict(key)) for key, total in sums]


class current_span:
    """`tracer.start_as_current_span` as one small context manager: the API's nests three generator
    context managers, a third of what an unsampled span costs. Records an escaping exception on the
    span and marks it failed, as the API's does."""

    __slots__ = ("_attributes", "_name", "_token", "_tracer", "span")

    def __init__(self, tracer: trace.Tracer, name: str, attributes: Mapping[str, AttributeValue]) -> None:
        self._tracer, self._name, self._attributes = tracer, name, attributes

    def __enter__(self) -> Span:
        self.span = self._tracer.start_span(self._name, kind=SpanKind.INTERNAL, attributes=self._attributes)
        self._token = context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _: object) -> None:
        try:
            if exc is not None and self.span.is_recording():
                self.span.record_exception(exc)
                self.span.set_status(Status(StatusCode.ERROR, f"{kind.__name__ if kind else 'Error'}: {exc}"))
        finally:
            context.detach(self._token)
            self.span.end()


_appended_events = Tally(meter, "eventstore.appended_events", unit="{event}", description="Events written")
_append_duration = meter.create_histogram(
    "eventstore.append.duration", unit="s",
    description="Time of one append, until it returns, by outcome; its count is the number of appends",
)
_conflicts = meter.create_counter(
    "eventstore.append.conflicts", unit="{append}",
    description="Appends refused by optimistic concurrency, by kind (wrong_expected_version, condition_failed, ...)",
)
_reads = Tally(meter, "eventstore.reads", unit="{read}", description="Reads, by kind (stream, all)")
_read_events = Tally(meter, "eventstore.read_events", unit="{event}", description="Events read")


class TelemetryUnavailable(InvalidArgument):
    """Serving metrics needs the OpenTelemetry SDK and the Prometheus exporter (the `observability` extra)."""


# -- trace context in event metadata ---------------------------------------------------------------


def tracing() -> bool:
    """Whether a sampled span is open: then appended events carry its trace context in their metadata."""
    return bool(trace.get_current_span().get_span_context().trace_flags.sampled)


def inject_trace_context(metadata: dict[str, Any]) -> None:
    """Put the current span's trace context into an event's metadata, unless it carries one already.

    Only a sampled trace's: an event keeps no bytes for a trace nobody records. Costs one context
    lookup when nothing is traced (no SDK, or no span open).
    """
    if TRACEPARENT in metadata or not trace.get_current_span().get_span_context().trace_flags.sampled:
        return
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    for key in TRACE_KEYS:
        if key in carrier:
            metadata[key] = carrier[key]


def extract_trace_context(carrier: Mapping[str, str | None]) -> Context | None:
    """The trace context carried by metadata or message attributes, or None when there is none."""
    traceparent = carrier.get(TRACEPARENT)
    if not traceparent:
        return None
    found = {TRACEPARENT: traceparent}
    tracestate = carrier.get(TRACESTATE)
    if tracestate:
        found[TRACESTATE] = tracestate
    return propagate.extract(found)


# -- appends and reads -----------------------------------------------------------------------------


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, AppendConditionFailed):
        return "condition_failed"
    if isinstance(exc, WrongExpectedVersion):
        return "wrong_expected_version"
    if isinstance(exc, DuplicateEventId):
        return "duplicate_event_id"
    if isinstance(exc, AppendRefused):
        return "refused"
    if isinstance(exc, InvalidArgument):
        return "invalid"
    return "error"


_CONFLICTS = frozenset({"wrong_expected_version", "duplicate_event_id", "condition_failed"})
_OUTCOMES = {name: {"eventstore.outcome": name} for name in ("appended", "idempotent")}

Append = TypeVar("Append", bound=Callable[..., Awaitable["AppendResult"]])


def instrumented_append(method: Append) -> Append:
    """Wrap an `append` method: a span around it (current while the events are serialized, so they
    carry its trace context), its duration, its outcome and the events written."""

    @functools.wraps(method)
    async def append(self: Any, stream_id: str, *args: Any, **kwargs: Any) -> AppendResult:
        started = time.perf_counter()
        if _untraced():
            try:
                result = await method(self, stream_id, *args, **kwargs)
            except Exception as exc:
                _failed_append(exc, started)
                raise
        else:
            result = await _traced_append(method, self, stream_id, args, kwargs, started)
        outcome = "idempotent" if result.duplicate else "appended"
        if not result.duplicate and not getattr(self, "counts_at_commit", False):
            _appended_events.add(len(result.events))
        _append_duration.record(time.perf_counter() - started, _OUTCOMES[outcome])
        return result

    return append  # type: ignore[return-value]


def committed(results: Sequence[AppendResult]) -> None:
    """Count the events a unit of work wrote, once it has committed (its appends count none themselves:
    a unit of work that rolls back wrote nothing)."""
    written = sum(len(r.events) for r in results if not r.duplicate)
    if written:
        _appended_events.add(written)


_NO_SDK = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def _untraced() -> bool:
    """No SDK and no span open: the span an append would open records nothing and carries nothing
    (a no-op tracer's span is invalid), so it is not opened (saves about 5 µs per append)."""
    return isinstance(trace.get_tracer_provider(), _NO_SDK) and not trace.get_current_span().get_span_context().is_valid


def _failed_append(exc: Exception, started: float) -> None:
    outcome = _outcome(exc)
    if outcome in _CONFLICTS:
        _conflicts.add(1, {"eventstore.conflict.kind": outcome})
    _append_duration.record(time.perf_counter() - started, {"eventstore.outcome": outcome})


async def _traced_append(
    method: Callable[..., Awaitable[AppendResult]], self: Any, stream_id: str, args: Any, kwargs: Any, started: float
) -> AppendResult:
    with current_span(tracer, "eventstore.append", {"eventstore.stream_id": str(stream_id)}) as span:
        try:
            result = await method(self, stream_id, *args, **kwargs)
        except Exception as exc:
            _failed_append(exc, started)
            raise
        if span.is_recording():
            span.set_attribute("eventstore.events", len(result.events))
            span.set_attribute("eventstore.stream_version", result.next_expected_version)
    return result


Read = TypeVar("Read", bound=Callable[..., Awaitable[list[Any]]])


def counted_read(kind: str) -> Callable[[Read], Read]:
    """Count the calls of a read method and the events they return (no span: reads are many and small)."""
    attributes = (("eventstore.read.kind", kind),)

    def decorate(method: Read) -> Read:
        @functools.wraps(method)
        async def read(*args: Any, **kwargs: Any) -> list[Any]:
            events = await method(*args, **kwargs)
            _reads.add(1, attributes)
            _read_events.add(len(events), attributes)
            return events

        return read  # type: ignore[return-value]

    return decorate


# -- gauges that ask the database --------------------------------------------------------------------


@dataclass
class Probe(Generic[T]):
    """A cheap query run when metrics are collected, on the event loop of the component that owns it.

    Collection happens on the metrics server's thread: the query is handed to the loop and awaited
    for at most `timeout` seconds. One scrape reads several gauges of one probe; a result younger
    than `max_age` is reused, and the last one stands in when the database does not answer in time.
    """

    query: Callable[[], Awaitable[T]]
    timeout: float = 2.0
    max_age: float = 0.5
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _last: T | None = None
    _taken: float = float("-inf")
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> T | None:
        with self._lock:
            if time.monotonic() - self._taken < self.max_age:
                return self._last
            if self.loop.is_closed() or _on_loop_thread(self.loop):
                return self._last  # never block the loop the query needs
            future = asyncio.run_coroutine_threadsafe(self._run(), self.loop)
            try:
                self._last = future.result(self.timeout)
            except Exception as exc:
                future.cancel()
                log.debug("metrics probe failed: %r", exc)
            self._taken = time.monotonic()
            return self._last

    async def _run(self) -> T:
        return await self.query()


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class Probes(Generic[T]):
    """The probes of every started component of one kind in this process (a relay, a runner)."""

    def __init__(self) -> None:
        self._probes: dict[int, Probe[T]] = {}

    def add(self, owner: object, probe: Probe[T]) -> None:
        self._probes[id(owner)] = probe

    def discard(self, owner: object) -> None:
        self._probes.pop(id(owner), None)

    def samples(self) -> list[T]:
        return [s for s in (p.sample() for p in list(self._probes.values())) if s is not None]


# -- serving /metrics --------------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """The Prometheus endpoint of this process; `close()` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


_installed: Any = None


def install_prometheus() -> None:
    """Install the OpenTelemetry SDK's meter provider with a Prometheus reader (once per process)."""
    global _installed
    if _installed is not None:
        return
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import Histogram, MeterProvider
        from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
        from opentelemetry.sdk.resources import Resource
    except ImportError as exc:
        raise TelemetryUnavailable(
            f"serving metrics needs the observability extra ({exc.name} is missing): "
            "pip install 'eventstore[observability]'"
        ) from None
    if not type(metrics.get_meter_provider()).__name__.startswith("_Proxy"):
        raise TelemetryUnavailable(
            "an OpenTelemetry meter provider is installed already: add a PrometheusMetricReader to it instead"
        )
    seconds = View(
        instrument_type=Histogram, instrument_unit="s",
        aggregation=ExplicitBucketHistogramAggregation(SECONDS_BUCKETS),
    )
    options: dict[str, Any] = {}
    if "scope_info_enabled" in inspect.signature(PrometheusMetricReader).parameters:
        options["scope_info_enabled"] = False  # every name carries its component already
    provider = MeterProvider(
        metric_readers=[PrometheusMetricReader(**options)], views=[seconds],
        resource=Resource.create({"service.name": "eventstore"}),
    )
    metrics.set_meter_provider(provider)
    _installed = provider


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve this process's metrics at http://host:port/metrics in the Prometheus text format.

    Port 0 picks a free port (see `MetricsServer.port`).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgument(f"the metrics port must be an int from 0 to 65535, got {port!r}")
    if not isinstance(host, str) or not host or "\x00" in host:
        raise InvalidArgument(f"the metrics host must be a host name or address, got {host!r}")
    install_prometheus()
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        raise InvalidArgument(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    return MetricsServer(host, int(server.server_address[1]), server, thread)
