"""Property tests: replay rebuilds the same state; save then load round-trips, with or without snapshots."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregates import EventRegistry, Repository
from aggregates.testing import round_trip
from eventstore import EventStore
from tests.aggregates.domain import Account, AccountError, SnapshottedAccount

text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)
commands = st.lists(
    st.one_of(
        st.tuples(st.just("deposit"), st.integers(1, 10_000), text),
        st.tuples(st.just("withdraw"), st.integers(1, 10_000), text),
        st.tuples(
            st.just("rate"),
            st.decimals(min_value=-1, max_value=1, places=6, allow_nan=False),
            st.datetimes(timezones=st.sampled_from([None, UTC])),
        ),
        st.tuples(st.just("close"), text),
    ),
    max_size=40,
)
opening = st.tuples(text.filter(bool), st.integers(0, 5_000))


def run(account: Account, opening: tuple[str, int], steps: list[tuple[Any, ...]]) -> None:
    """Apply the commands in order; rejected commands emit nothing and are skipped."""
    account.open(*opening)
    for name, *args in steps:
        try:
            if name == "deposit":
                account.deposit(args[0], memo=args[1])
            elif name == "withdraw":
                account.withdraw(args[0], memo=args[1])
            elif name == "rate":
                rate: Decimal = args[0]
                effective: datetime = args[1]
                account.set_interest(rate, effective)
            else:
                account.close(args[0])
        except AccountError:
            pass


@given(opening, commands)
def test_replaying_the_events_rebuilds_the_same_state(opened: tuple[str, int], steps: list[tuple[Any, ...]]) -> None:
    account = Account("p")
    run(account, opened, steps)
    events = account.pending_events
    registry = EventRegistry(*Account.event_types())
    decoded = [round_trip(registry, e, "account-p", i) for i, e in enumerate(events)]
    assert decoded == list(events)
    first, second = Account.from_events("p", events), Account.from_events("p", decoded)
    assert first.state == second.state == account.state
    assert first.version == second.version == len(events) - 1


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(opening, commands, st.lists(st.integers(1, 8), min_size=1, max_size=6))
async def test_save_then_load_round_trips(
    store: EventStore, opened: tuple[str, int], steps: list[tuple[Any, ...]], batches: list[int]
) -> None:
    aggregate_id = uuid.uuid4().hex  # one database for every example: each gets its own stream
    snapshotted, plain = Repository(store, SnapshottedAccount), Repository(store, Account)
    expected = SnapshottedAccount(aggregate_id)
    run(expected, opened, steps)
    events = list(expected.pending_events)

    # Save the same history in batches, loading before each one as an application would.
    account = SnapshottedAccount(aggregate_id)
    for i, event in enumerate(events):
        account._emit(event)
        if len(account.pending_events) >= batches[i % len(batches)] or i == len(events) - 1:
            await snapshotted.save(account)
            account = await snapshotted.get(aggregate_id)

    loaded = await snapshotted.get(aggregate_id)
    replayed = await plain.get(aggregate_id)
    assert loaded.version == replayed.version == len(events) - 1
    assert loaded.state == replayed.state == expected.state
    assert await plain.history(aggregate_id) == events
    snapshot = await store.load_snapshot(f"account-{aggregate_id}")
    assert (snapshot is not None) == (len(events) >= SnapshottedAccount.snapshot_every)  # type: ignore[operator]
