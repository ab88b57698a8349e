"""`Tally`, the hot paths' counter: exact sums from many threads, reported as the SDK's own counter."""

from __future__ import annotations

import threading

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Sum

from eventstore.telemetry import Tally


def test_sums_from_many_threads_are_exact_and_exported_as_a_monotonic_counter() -> None:
    reader = InMemoryMetricReader()
    tally = Tally(MeterProvider(metric_readers=[reader]).get_meter("t"), "t.events", "{event}", "Events")
    stream = (("kind", "stream"), ("size", 1))

    def work() -> None:
        for _ in range(5_000):
            tally.add(2, stream)
            tally.add(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.add(0, (("kind", "all"),))

    def points() -> dict[tuple[tuple[str, object], ...], int]:
        data = reader.get_metrics_data()
        assert data is not None
        (metric,) = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics]
        assert metric.name == "t.events" and metric.unit == "{event}"
        assert isinstance(metric.data, Sum) and metric.data.is_monotonic
        return {tuple(sorted((p.attributes or {}).items())): int(p.value) for p in metric.data.data_points}

    assert points() == {(("kind", "stream"), ("size", 1)): 40_000, (): 20_000, (("kind", "all"),): 0}
    tally.add(5)
    assert points()[()] == 20_005  # cumulative, as a counter
