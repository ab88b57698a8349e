"""Metrics, spans and logs of the relay and the inbox, through the OpenTelemetry API only.

Each outbox message whose event carries a trace context (see `eventstore.telemetry`) is published
under a producer span that is a child of the append's span; the Kafka message carries that span's
context (`ce_traceparent`), and `Inbox.handle` continues it in a consumer span. One trace then shows
command, append, publish and consumer. A relay batch has a span of its own, linked to each message.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from eventstore import EventStore
from eventstore.telemetry import TRACEPARENT, TRACESTATE, Probe, Probes, extract_trace_context
from outbox import sql
from outbox.cloudevents import CloudEvent

if TYPE_CHECKING:
    from outbox.publishing import OutboxMessage
    from outbox.relay import Relay

log = logging.getLogger("outbox.telemetry")

tracer = trace.get_tracer("outbox")
meter = metrics.get_meter("outbox")

_TOPIC = "messaging.destination.name"
_RELAY = "outbox.relay.id"

_published = meter.create_counter(
    "outbox.messages.published", unit="{message}", description="Messages the broker acknowledged, by topic"
)
_retried = meter.create_counter(
    "outbox.messages.retried", unit="{message}", description="Messages the broker refused, to be retried, by topic"
)
_dead = meter.create_counter(
    "outbox.messages.dead", unit="{message}", description="Messages moved to the dead-letter state, by topic"
)
_latency = meter.create_histogram(
    "outbox.publish.latency", unit="s",
    description="From the append's transaction to the broker's acknowledgement of its message, by topic",
)
_batch_duration = meter.create_histogram(
    "outbox.relay.batch.duration", unit="s", description="One relay round that sent messages: fetch, send, ack"
)
_renewals = meter.create_counter(
    "outbox.relay.lease_renewals", unit="{renewal}", description="Slot lease renewals, by relay and result"
)
_handled = meter.create_counter(
    "outbox.inbox.messages", unit="{message}", description="Messages an inbox handled, by consumer and outcome"
)

_backlog: Probes[list[asyncpg.Record]] = Probes()
_relays: dict[int, Relay] = {}


def _pending(options: CallbackOptions) -> Iterable[Observation]:
    for rows in _backlog.samples():
        for row in rows:
            yield Observation(row["pending"], {_TOPIC: row["topic"]})


def _oldest(options: CallbackOptions) -> Iterable[Observation]:
    for rows in _backlog.samples():
        for row in rows:
            yield Observation(row["oldest_age"], {_TOPIC: row["topic"]})


def _dead_letters(options: CallbackOptions) -> Iterable[Observation]:
    for rows in _backlog.samples():
        for row in rows:
            yield Observation(row["dead"], {_TOPIC: row["topic"]})


def _slots(options: CallbackOptions) -> Iterable[Observation]:
    for relay in list(_relays.values()):
        yield Observation(len(relay.owned_slots), {_RELAY: relay.relay_id})


meter.create_observable_gauge(
    "outbox.messages.pending", [_pending], unit="{message}", description="Messages waiting to be published, by topic"
)
meter.create_observable_gauge(
    "outbox.messages.oldest_pending_age", [_oldest], unit="s",
    description="Age of the oldest message waiting to be published, by topic (0 when none waits)",
)
meter.create_observable_gauge(
    "outbox.messages.dead_letters", [_dead_letters], unit="{message}",
    description="Messages in the dead-letter state now, by topic",
)
meter.create_observable_gauge(
    "outbox.relay.slots", [_slots], unit="{slot}", description="Slots whose lease the relay holds"
)


def watch_backlog(owner: object, store: EventStore) -> None:
    """Report the outbox's gauges by topic through `store` (on the running loop) until `unwatch(owner)`."""

    async def gauges() -> list[asyncpg.Record]:
        return list(await store.pool.fetch(sql.TOPIC_GAUGES))

    _backlog.add(owner, Probe(gauges))


def watch(relay: Relay) -> None:
    """Report this relay's slots, and the outbox's backlog through its store, until `unwatch`."""
    _relays[id(relay)] = relay
    watch_backlog(relay, relay.store)


def unwatch(owner: object) -> None:
    _relays.pop(id(owner), None)
    _backlog.discard(owner)


# -- a relay round -----------------------------------------------------------------------------------


@dataclass
class _Round:
    relay_id: str
    started: float = field(default_factory=time.perf_counter)
    batch: Span | None = None
    spans: dict[int, Span] = field(default_factory=dict)


_current: contextvars.ContextVar[_Round | None] = contextvars.ContextVar("outbox_round", default=None)

Round = TypeVar("Round", bound=Callable[..., Awaitable[int]])


def relay_round(method: Round) -> Round:
    """Wrap `Relay._round`: the batch span and every publish span end with it; its duration counts when it sent."""

    @functools.wraps(method)
    async def round_(relay: Relay) -> int:
        state = _Round(relay.relay_id)
        token = _current.set(state)
        sent = 0
        try:
            sent = await method(relay)
            return sent
        finally:
            _current.reset(token)
            for span in state.spans.values():
                span.end()
            if state.batch is not None:
                state.batch.set_attribute("messaging.batch.message_count", sent)
                state.batch.end()
                _batch_duration.record(time.perf_counter() - state.started, {_RELAY: relay.relay_id})

    return round_  # type: ignore[return-value]


def publishing(messages: list[OutboxMessage]) -> list[OutboxMessage]:
    """Open the round's batch span and a publish span for each traced message; the messages to send.

    A traced message goes out with its publish span's context in place of the append's.
    """
    state = _current.get()
    if state is None or not messages:
        return messages
    state.batch = tracer.start_span(
        "outbox relay batch", kind=SpanKind.INTERNAL,
        attributes={_RELAY: state.relay_id, "messaging.system": "kafka"},
    )
    state.started = time.perf_counter()
    if not state.batch.is_recording():
        return messages
    batch = trace.set_span_in_context(state.batch)
    batch_link = [Link(state.batch.get_span_context())]
    sent: list[OutboxMessage] = []
    for message in messages:
        parent = extract_trace_context({TRACEPARENT: message.traceparent, TRACESTATE: message.tracestate})
        if parent is None:
            sent.append(message)
            continue
        span = tracer.start_span(
            f"{message.topic} publish", context=parent, kind=SpanKind.PRODUCER, links=batch_link,
            attributes={
                "messaging.system": "kafka", "messaging.operation.type": "send", _TOPIC: message.topic,
                "messaging.message.id": message.event_id, "messaging.kafka.message.key": message.key,
                "outbox.message.id": message.id,
            },
        )
        state.batch.add_link(span.get_span_context())
        state.spans[message.id] = span
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span, batch))
        sent.append(message._replace(traceparent=carrier.get(TRACEPARENT), tracestate=carrier.get(TRACESTATE)))
    return sent


def _metrics_on() -> bool:
    """Whether an SDK collects metrics: per-message work (parsing times) is skipped otherwise."""
    return not type(metrics.get_meter_provider()).__name__.startswith("_Proxy")


def acknowledged(messages: Sequence[OutboxMessage], published: Sequence[int]) -> None:
    """The broker acknowledged `published` (ids) of `messages`: count them and their latency by topic."""
    if not published:
        return
    ids = set(published)
    by_topic: dict[str, int] = {}
    now = time.time()
    measure = _metrics_on()
    for message in messages:
        if message.id not in ids:
            continue
        by_topic[message.topic] = by_topic.get(message.topic, 0) + 1
        if measure:
            committed = datetime.fromisoformat(message.time).timestamp()
            _latency.record(max(now - committed, 0.0), {_TOPIC: message.topic})
    for topic, count in by_topic.items():
        _published.add(count, {_TOPIC: topic})
    state = _current.get()
    if state is not None and state.spans:
        for message_id in ids:
            span = state.spans.get(message_id)
            if span is not None:
                span.set_status(Status(StatusCode.OK))


def refused(refusals: Sequence[tuple[OutboxMessage, BaseException]], dead_ids: Iterable[int]) -> None:
    """The broker refused these messages; `dead_ids` moved to the dead-letter state."""
    dead = set(dead_ids)
    state = _current.get()
    for message, exc in refusals:
        kind = "dead" if message.id in dead else "retried"
        (_dead if kind == "dead" else _retried).add(1, {_TOPIC: message.topic})
        # Beside the relay's own line for people: this record is for machines (ids as attributes).
        log.log(
            logging.WARNING if kind == "dead" else logging.INFO, "outbox.message.%s", kind,
            extra={"outbox_id": message.id, "event_id": message.event_id, "topic": message.topic,
                   "key": message.key, "attempt": message.attempts + 1, "error": repr(exc),
                   "traceparent": message.traceparent},
        )
        span = state.spans.get(message.id) if state is not None else None
        if span is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, kind))


Renew = TypeVar("Renew", bound=Callable[..., Awaitable[None]])


def counted_renewal(method: Renew) -> Renew:
    """Wrap `SlotLeases.renew`: count each renewal by relay and result."""

    @functools.wraps(method)
    async def renew(leases: Any) -> None:
        try:
            await method(leases)
        except Exception:
            _renewals.add(1, {_RELAY: leases._relay_id, "outbox.result": "failed"})
            raise
        _renewals.add(1, {_RELAY: leases._relay_id, "outbox.result": "renewed"})

    return renew  # type: ignore[return-value]


# -- the consumer side -------------------------------------------------------------------------------


@contextlib.contextmanager
def consuming(message: CloudEvent | str, consumer: str) -> Iterator[Callable[[bool], None]]:
    """A consumer span continuing the trace the message carries; call the result with whether it ran."""
    parent = None
    attributes: dict[str, str] = {"messaging.consumer.group.name": consumer, "messaging.operation.type": "process"}
    if isinstance(message, CloudEvent):
        parent = extract_trace_context({TRACEPARENT: message.traceparent, TRACESTATE: message.tracestate})
        attributes["messaging.message.id"] = message.id
        attributes["cloudevents.event_type"] = message.type
    else:
        attributes["messaging.message.id"] = message
    with tracer.start_as_current_span(f"{consumer} process", context=parent, kind=SpanKind.CONSUMER,
                                      attributes=attributes) as span:

        def outcome(ran: bool) -> None:
            result = "handled" if ran else "duplicate"
            span.set_attribute("outbox.inbox.outcome", result)
            _handled.add(1, {"messaging.consumer.group.name": consumer, "outbox.inbox.outcome": result})

        yield outcome
