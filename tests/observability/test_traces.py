"""One trace from a command through the append, the relay and a real broker to the consumer's inbox;
spans and metrics of aggregate loads and saves, scraped from a real /metrics endpoint in this process."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import httpx
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, StatusCode, TraceState
from opentelemetry.util.types import Attributes
from prometheus_client.parser import text_string_to_metric_families

from aggregates import Repository
from eventstore import EventStore, NewEvent, UnitOfWork, WrongExpectedVersion, serve_metrics
from outbox import Inbox, Relay
from tests.aggregates.domain import SnapshottedAccount
from tests.observability.test_metrics import value
from tests.outbox.conftest import Collector, relay_settings


class _WhileRecording(Sampler):
    """Samples only inside `recording()`: the process-wide provider stays inert for the other tests."""

    on = False

    def should_sample(
        self, parent_context: Context | None, trace_id: int, name: str, kind: SpanKind | None = None,
        attributes: Attributes = None, links: Sequence[Link] | None = None, trace_state: TraceState | None = None,
    ) -> SamplingResult:
        return SamplingResult(Decision.RECORD_AND_SAMPLE if self.on else Decision.DROP, attributes)

    def get_description(self) -> str:
        return "while recording"


_SAMPLER = _WhileRecording()
_EXPORTER = InMemorySpanExporter()


@contextlib.contextmanager
def recording() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider(sampler=_SAMPLER)
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    _SAMPLER.on = True
    try:
        yield _EXPORTER
    finally:
        _SAMPLER.on = False


def one(spans: Sequence[ReadableSpan], name: str, **attributes: object) -> ReadableSpan:
    found = [
        s for s in spans if s.name == name and all((s.attributes or {}).get(k) == v for k, v in attributes.items())
    ]
    assert len(found) == 1, f"{name} {attributes}: {[s.name for s in spans]}"
    return found[0]


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_from_command_to_the_consumers_inbox(
    outbox_store: EventStore, kafka: str, topic: str, collector: Collector
) -> None:
    tracer = trace.get_tracer("tests")
    billing = Inbox(outbox_store, "billing")

    async def raise_invoice(uow: UnitOfWork) -> None:
        await uow.append("invoice-1", [NewEvent("InvoiceRaised", {"order": "order-1"})])

    with recording() as exporter:
        with tracer.start_as_current_span("command PlaceOrder"):
            await outbox_store.append("order-1", [NewEvent("OrderPlaced", {"n": 1})])
        async with Relay(outbox_store, kafka, relay_settings()):
            await collector.wait_count(1)
        (message,) = collector.events()
        assert await billing.handle(message, raise_invoice)
        assert not await billing.handle(message, raise_invoice)  # redelivered: skipped, still traced
    spans = exporter.get_finished_spans()

    command = one(spans, "command PlaceOrder")
    append = one(spans, "eventstore.append", **{"eventstore.stream_id": "order-1"})
    publish = one(spans, f"{topic} publish")
    batch = one(spans, "outbox relay batch")
    consumed = [s for s in spans if s.name == "billing process"]
    invoice = one(spans, "eventstore.append", **{"eventstore.stream_id": "invoice-1"})
    trace_id = command.context.trace_id
    assert {s.context.trace_id for s in (append, publish, *consumed, invoice)} == {trace_id}
    assert parent_of(append) == command.context.span_id
    assert parent_of(publish) == append.context.span_id and publish.kind is SpanKind.PRODUCER
    assert [parent_of(s) for s in consumed] == [publish.context.span_id] * 2
    assert [(s.attributes or {}).get("outbox.inbox.outcome") for s in consumed] == ["handled", "duplicate"]
    assert consumed[0].kind is SpanKind.CONSUMER and parent_of(invoice) == consumed[0].context.span_id
    # The relay's batch is a trace of its own, linked both ways with the messages it published.
    assert publish.context.span_id in {link.context.span_id for link in batch.links}
    assert batch.context.span_id in {link.context.span_id for link in publish.links}

    # The event keeps the append's context; the Kafka message carries the publish span's, twice.
    (stored,) = await outbox_store.read_stream("order-1")
    assert orjson.loads(stored.metadata)["traceparent"].split("-")[2] == format(append.context.span_id, "016x")
    assert message.traceparent is not None and message.traceparent.split("-")[2] == format(
        publish.context.span_id, "016x"
    )
    headers = dict(collector.records[0].headers)
    assert headers["traceparent"].decode() == message.traceparent


async def test_no_trace_context_when_nothing_records(store: EventStore) -> None:
    with trace.get_tracer("tests").start_as_current_span("unsampled"):
        await store.append("quiet-1", [NewEvent("Happened")])
    (event,) = await store.read_stream("quiet-1")
    assert "traceparent" not in orjson.loads(event.metadata)


async def test_aggregate_loads_and_saves_are_measured_and_traced(store: EventStore) -> None:
    server = serve_metrics(0)  # the process's SDK from here on; the endpoint stops with the test
    try:
        accounts = Repository(store, SnapshottedAccount)
        with recording() as exporter:
            account = SnapshottedAccount("7")
            account.open("ann")
            for _ in range(6):
                account.deposit(1)
            await accounts.save(account)  # versions 0..6: a snapshot at 6
            account.deposit(1)
            await accounts.save(account)  # version 7
            loaded = await accounts.get("7")
            assert loaded.version == 7
            with pytest.raises(WrongExpectedVersion):
                await store.append("account-7", [NewEvent("Deposited", {"amount": 1})], expected_version=3)
        spans = exporter.get_finished_spans()
        async with httpx.AsyncClient() as client:
            text = (await client.get(server.url)).text
    finally:
        server.close()

    load = one(spans, "aggregate load")
    assert (load.attributes or {}).get("aggregate.replayed_events") == 1  # only the event after the snapshot
    saves = [s for s in spans if s.name == "aggregate save"]
    appends = [s for s in spans if s.name == "eventstore.append"]
    assert [a.status.status_code for a in appends] == [StatusCode.UNSET, StatusCode.UNSET, StatusCode.ERROR]
    assert [parent_of(a) for a in appends[:2]] == [s.context.span_id for s in saves]

    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
    kind = {"aggregate_type": "SnapshottedAccount"}
    assert value(samples, "aggregate_load_snapshots_total", **kind, aggregate_snapshot_result="hit") >= 1
    assert value(samples, "aggregate_load_replayed_events_total", **kind) >= 1
    assert value(samples, "aggregate_load_duration_seconds_count", **kind) >= 1
    assert value(samples, "aggregate_save_duration_seconds_count", **kind) >= 2
    assert value(samples, "eventstore_appended_events_total") >= 8
    assert value(samples, "eventstore_append_duration_seconds_count", eventstore_outcome="appended") >= 2
    assert value(samples, "eventstore_reads_total", eventstore_read_kind="stream") >= 1
    conflict = {"eventstore_conflict_kind": "wrong_expected_version"}
    assert value(samples, "eventstore_append_conflicts_total", **conflict) >= 1
