"""Given/when/then tests of aggregates, in memory: given events, when a command, then events or an error.

    given(Order, OrderPlaced(total=10)).when(lambda o: o.ship()).then(OrderShipped())
    given(Order).when(lambda o: o.ship()).then_raises(OrderNotPlaced)

Every event passes through the same JSON encoding as the store, and `then` checks that replaying the
history plus the new events rebuilds the command's state, so a command that changes state outside its
event handlers, or an event that does not survive serialization, fails the test.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Generic

import orjson

from aggregates.aggregate import A, same_state
from aggregates.errors import AggregateUsageError
from aggregates.events import DomainEvent, EventRegistry, as_jsonb
from eventstore import RecordedEvent

__all__ = ["Outcome", "Scenario", "given", "round_trip"]


def round_trip(registry: EventRegistry, event: DomainEvent, stream_id: str = "test-1", version: int = 0) -> DomainEvent:
    """`event` after encoding it as the repository does and decoding it from the JSON text."""
    new = registry.encode(event)
    recorded = RecordedEvent(
        new.event_id,
        new.type,
        as_jsonb(orjson.dumps(new.data)),  # what the store's jsonb column gives back
        orjson.dumps(new.metadata_with_ids()).decode(),
        stream_id,
        version,
        version + 1,
        1,
        datetime.now(UTC),
    )
    return registry.decode(recorded)


def given(
    aggregate_type: type[A],
    *events: DomainEvent,
    aggregate_id: str = "test",
    registry: EventRegistry | None = None,
) -> Scenario[A]:
    """An aggregate whose history is `events` (none: a new aggregate)."""
    return Scenario(aggregate_type, events, aggregate_id=aggregate_id, registry=registry)


class Scenario(Generic[A]):
    def __init__(
        self,
        aggregate_type: type[A],
        history: Sequence[DomainEvent],
        *,
        aggregate_id: str = "test",
        registry: EventRegistry | None = None,
    ) -> None:
        self.aggregate_type = aggregate_type
        self.registry = registry if registry is not None else EventRegistry()
        self.registry.register(*aggregate_type.event_types())
        self.aggregate_id = aggregate_id
        self.history = [
            round_trip(self.registry, e, aggregate_type.stream_id_for(aggregate_id), i) for i, e in enumerate(history)
        ]

    def when(self, command: Callable[[A], object]) -> Outcome[A]:
        aggregate = self.aggregate_type.from_events(self.aggregate_id, self.history)
        error: BaseException | None = None
        try:
            result = command(aggregate)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise AggregateUsageError(
                    "given/when/then runs synchronous commands; the command returned an awaitable"
                )
        except Exception as exc:
            error = exc
        return Outcome(self, aggregate, error)


class Outcome(Generic[A]):
    def __init__(self, scenario: Scenario[A], aggregate: A, error: BaseException | None) -> None:
        self.scenario = scenario
        self.aggregate = aggregate
        self.error = error
        self.events: list[DomainEvent] = list(aggregate.pending_events)

    def then(self, *expected: DomainEvent) -> A:
        """Assert the command emitted exactly `expected`, in order; returns the aggregate for more checks."""
        if self.error is not None:
            raise AssertionError(f"expected events, but the command raised {self.error!r}") from self.error
        if self.events != list(expected):
            raise AssertionError(
                "emitted events differ\n  expected: " + _listing(expected) + "\n  emitted:  " + _listing(self.events)
            )
        scenario = self.scenario
        stream_id = scenario.aggregate_type.stream_id_for(scenario.aggregate_id)
        base = len(scenario.history)
        stored: list[DomainEvent] = []
        for i, event in enumerate(self.events):
            decoded = round_trip(scenario.registry, event, stream_id, base + i)
            if decoded != event:
                raise AssertionError(f"event does not survive its JSON encoding: {event!r} came back as {decoded!r}")
            stored.append(decoded)
        replayed = scenario.aggregate_type.from_events(scenario.aggregate_id, [*scenario.history, *stored])
        if not same_state(replayed.state, self.aggregate.state):
            raise AssertionError(
                "the command changed state outside its event handlers:\n"
                f"  after the command: {self.aggregate.state!r}\n  replayed events:   {replayed.state!r}"
            )
        return self.aggregate

    def then_nothing(self) -> A:
        """Assert the command succeeded without emitting anything (e.g. an idempotent repeat)."""
        return self.then()

    def then_raises(self, error_type: type[BaseException], match: str | None = None) -> Any:
        """Assert the command raised `error_type` (message matching `match`) and emitted nothing."""
        if self.error is None:
            raise AssertionError(
                f"expected {error_type.__name__}, but the command succeeded emitting {_listing(self.events)}"
            )
        if not isinstance(self.error, error_type):
            raise AssertionError(f"expected {error_type.__name__}, got {self.error!r}") from self.error
        if match is not None and not re.search(match, str(self.error)):
            raise AssertionError(f"{self.error!r} does not match {match!r}") from self.error
        if self.events:
            raise AssertionError(f"the command raised {self.error!r} after emitting {_listing(self.events)}")
        return self.error


def _listing(events: Sequence[DomainEvent]) -> str:
    return "[" + ", ".join(repr(e) for e in events) + "]" if events else "[] (nothing)"
