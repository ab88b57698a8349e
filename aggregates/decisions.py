"""Decisions across streams (dynamic consistency boundaries): the state a command needs, from one read.

An aggregate draws its consistency boundary once, around a stream. A decision draws it per command: it
declares the projections it needs (each a query of event types and tags, an initial state and a fold),
reads the events of all of them at once, decides, and appends with the combined query as its
condition. The store refuses the append if anything matching that query was appended since the read,
and `Decisions.execute` then reads and decides again, like `Repository.execute`.

    def course_capacity(course: str) -> DecisionProjection[int]:
        return DecisionProjection(Query.of(["CourseDefined"], [f"course:{course}"]), 0,
                                  lambda state, event: event.json()["capacity"])

    await decisions.execute({"capacity": course_capacity("c1"), ...}, subscribe)
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from uuid_utils.compat import uuid7

from eventstore import (
    AppendConditionFailed,
    AppendResult,
    Condition,
    EventStore,
    InvalidArgument,
    NewEvent,
    Query,
    RecordedEvent,
    StreamState,
    category_of,
    storable_text,
)

log = logging.getLogger(__name__)

S = TypeVar("S")

Decide = Callable[[Mapping[str, Any]], Sequence[NewEvent] | Awaitable[Sequence[NewEvent]]]
"""A function from the projections' states (by name) to the events to append (sync or async)."""


@dataclass(frozen=True, slots=True)
class DecisionProjection(Generic[S]):
    """One fact a decision needs: the events that make it (`query`), its state before any, and the fold.

    Every read folds from a deep copy of `initial`, so a fold may update its state in place.
    """

    query: Query
    initial: S
    apply: Callable[[S, RecordedEvent], S]


@dataclass(frozen=True, slots=True)
class DecisionState:
    """The projections' states after one read, and the condition an append decided on them must carry."""

    states: Mapping[str, Any]
    condition: Condition

    def __getitem__(self, name: str) -> Any:
        return self.states[name]


class Decisions:
    """Runs commands that decide from projections over tagged events and append with their condition.

    Each decision's events go to a stream of their own (`category`-uuid7, expected new), so decisions
    never wait on a stream row: only the locks of overlapping conditions order them.
    """

    def __init__(self, store: EventStore, *, category: str = "decision") -> None:
        if (
            not isinstance(category, str) or not category or category_of(category) != category
            or not storable_text(category)
        ):
            raise InvalidArgument(
                f"category must be a non-empty name without '-', NUL or lone surrogates, got {category!r}"
            )
        self.store = store
        self.category = category

    async def build(self, projections: Mapping[str, DecisionProjection[Any]]) -> DecisionState:
        """Read every event the projections need, once and in log order, and fold each into its projections.

        The read sees every committed event, not only what the log shows yet (see
        `EventStore.read_with_condition`): a decision never waits for someone else's long transaction.
        """
        if not isinstance(projections, Mapping) or not projections:
            raise InvalidArgument("a decision needs at least one projection, by name")
        states: dict[str, Any] = {}
        for name, projection in projections.items():
            if not isinstance(projection, DecisionProjection):
                raise InvalidArgument(f"projection {name!r} must be a DecisionProjection")
            if not isinstance(projection.query, Query) or not callable(projection.apply):
                raise InvalidArgument(f"projection {name!r} needs a Query and a callable fold")
            try:  # each read folds from a copy: a fold that updates its state in place would keep the last one's
                states[name] = copy.deepcopy(projection.initial)
            except Exception as exc:
                raise InvalidArgument(f"projection {name!r}: its initial state cannot be copied ({exc!r})") from None
        query = Query(*(item for p in projections.values() for item in p.query.items))
        events, condition = await self.store.read_with_condition(query)
        for event in events:
            tags = event.tags
            for name, projection in projections.items():
                if any(item.matches(event.event_type, tags) for item in projection.query.items):
                    states[name] = projection.apply(states[name], event)
        return DecisionState(states, condition)

    async def execute(
        self,
        projections: Mapping[str, DecisionProjection[Any]],
        decide: Decide,
        *,
        retries: int = 5,
        stream_id: str | None = None,
    ) -> AppendResult | None:
        """Build the state, run `decide`, append its events on condition; on a conflict, do it all again.

        `decide` must decide from the states alone, since it may run more than once; its errors (the
        domain saying no) propagate at once. Returns None when it decides to append nothing. After the
        last retry the `AppendConditionFailed` propagates.
        """
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgument(f"retries must be an int >= 0, got {retries!r}")
        attempt = 0
        while True:
            state = await self.build(projections)
            outcome = decide(state.states)
            events = await outcome if inspect.isawaitable(outcome) else outcome
            if not events:
                return None
            stream = stream_id if stream_id is not None else f"{self.category}-{uuid7().hex}"
            expected = StreamState.ANY if stream_id is not None else StreamState.NO_STREAM
            try:
                return await self.store.append(stream, events, expected, condition=state.condition)
            except AppendConditionFailed as exc:
                if attempt >= retries:
                    raise
                attempt += 1
                log.debug("decision overtaken (%s); retry %d of %d", exc.reason, attempt, retries)
