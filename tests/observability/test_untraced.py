"""Metrics without tracing: appends skip the span (nothing would record it) but are counted all the same.

In a process of its own: OpenTelemetry's providers are set once per process, and the other tests of
this package set a tracer provider.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from eventstore import EventStore, NewEvent, WrongExpectedVersion
    from eventstore.telemetry import _untraced

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    async def main() -> None:
        async with EventStore(sys.argv[1]) as store:
            assert _untraced(), "no tracer provider and no span: the fast path"
            await store.append("untraced-1", [NewEvent("A"), NewEvent("B")])
            await store.append("untraced-1", [NewEvent("C")], 1)
            try:
                await store.append("untraced-1", [NewEvent("D")], 0)
            except WrongExpectedVersion:
                pass
            else:
                raise AssertionError("expected a conflict")
            try:  # rolled back: its events were never written
                async with store.unit_of_work() as uow:
                    await uow.append("untraced-2", [NewEvent("E"), NewEvent("F")])
                    raise KeyError("the rest of the unit of work failed")
            except KeyError:
                pass
            async with store.unit_of_work() as uow:
                await uow.append("untraced-3", [NewEvent("G")])
        found = {}
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    for point in m.data.data_points:
                        key = (m.name, tuple(sorted(point.attributes.items())))
                        found[key] = getattr(point, "value", None) if hasattr(point, "value") else point.count
        print(found)
        assert found[("eventstore.appended_events", ())] == 4
        assert found[("eventstore.append.duration", (("eventstore.outcome", "appended"),))] == 4
        assert found[("eventstore.append.duration", (("eventstore.outcome", "wrong_expected_version"),))] == 1
        assert found[("eventstore.append.conflicts", (("eventstore.conflict.kind", "wrong_expected_version"),))] == 1
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)

    asyncio.run(main())
    """
)


def test_appends_are_counted_without_a_tracer_provider(database_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, database_url], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
