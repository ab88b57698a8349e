"""Bad input gets a typed error under one root, `EventStoreError`, and changes nothing."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from aggregates import Aggregate, AggregateError, DomainEvent, Repository, SnapshotError, applies
from eventstore import (
    START,
    EventSerializationError,
    EventStore,
    EventStoreError,
    InvalidArgument,
    NewEvent,
)
from eventstore_app import migrate, migrate_async
from outbox import InvalidSettings, KafkaSettings, OutboxError, RelaySettings
from projections import ProjectionError

NOT_JSON = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NOT_JSON)
@pytest.mark.parametrize("where", ["data", "nested data", "metadata"])
async def test_nan_and_infinity_are_refused_not_turned_into_null(store: EventStore, value: float, where: str) -> None:
    event = {
        "data": NewEvent("X", {"f": value}),
        "nested data": NewEvent("X", {"a": [1, {"b": (2, value)}]}),
        "metadata": NewEvent("X", {"f": 1}, metadata={"m": value}),
    }[where]
    with pytest.raises(EventSerializationError, match="NaN and infinity"):
        await store.append("s-1", [NewEvent("Fine"), event])
    assert await store.stream_version("s-1") == -1
    await store.append("s-1", [NewEvent("X", {"f": None, "g": 1.5})])  # a real null and a finite float go
    assert (await store.read_stream("s-1"))[0].json() == {"f": None, "g": 1.5}


async def test_pre_serialized_data_that_is_not_json_is_a_typed_error(store: EventStore) -> None:
    with pytest.raises(EventSerializationError):
        await store.append("s-1", [NewEvent("X", orjson.Fragment(b'{"f": NaN}'))])
    assert await store.stream_version("s-1") == -1
    for text in (b'{"f": "\xff"}', b'{"f": "a\x00b"}'):  # not UTF-8; a raw NUL, which PostgreSQL refuses
        with pytest.raises(EventSerializationError):
            await store.append("s-1", [NewEvent("X", orjson.Fragment(text))])
    assert await store.stream_version("s-1") == -1
    with pytest.raises(InvalidArgument):
        await store.save_snapshot("s-1", "T", "1", 0, '{"f": Infinity}')


class Measured(DomainEvent):
    value: float


class GaugeState(BaseModel):
    value: float = 0.0


class Gauge(Aggregate[GaugeState], category="gauge", snapshot_every=2):
    def measure(self, value: float) -> None:
        self._emit(Measured(value=value))

    @applies(Measured)
    def _measured(self, event: Measured) -> None:
        self.state.value = event.value


@pytest.mark.parametrize("value", NOT_JSON)
async def test_domain_events_and_snapshots_refuse_nan(store: EventStore, value: float) -> None:
    gauges = Repository(store, Gauge)
    gauge = Gauge("g1")
    gauge.measure(value)
    with pytest.raises(EventSerializationError):
        await gauges.save(gauge)
    assert await store.stream_version("gauge-g1") == -1

    # A state that holds NaN by other means: the due snapshot is skipped, an explicit one refused.
    gauge = Gauge("g2")
    gauge.measure(1.0)
    await gauges.save(gauge)
    gauge.state.value = value
    with pytest.raises(SnapshotError, match="NaN and infinity"):
        await gauges.take_snapshot(gauge)
    assert await store.load_snapshot("gauge-g2") is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.read_all(limit=0), "limit must be at least 1"),
        (lambda s: s.read_all(limit="10"), "limit must be an int"),
        (lambda s: s.read_all((1,)), "checkpoint"),
        (lambda s: s.read_all((-1, 0)), "log_xid must be at least 0"),
        (lambda s: s.read_all(types="OrderPlaced"), "types"),
        (lambda s: s.read_all(category=""), "category"),
        (lambda s: s.read_stream("s-1", limit=-1), "limit must be at least 0"),
        (lambda s: s.read_stream("s-1", "0"), "from_version"),
        (lambda s: s.read_stream("", 0), "stream id"),
        # Past a bigint: the driver's own DataError before (beyond PostgreSQL's range, never a real value).
        (lambda s: s.read_all((2**63, 0)), "log_xid must fit in 64 bits"),
        (lambda s: s.read_all(limit=2**63), "limit must fit in 64 bits"),
        (lambda s: s.read_stream("s-1", -(2**63) - 1), "from_version must fit in 64 bits"),
        (lambda s: s.count_after((0, 2**63)), "position must fit in 64 bits"),
        (lambda s: s.wait_until_visible((2**64, 0), timeout=1), "log_xid must fit in 64 bits"),
        (lambda s: s.list_streams(limit=2**63), "limit must fit in 64 bits"),
        (lambda s: s.list_streams(category=7), "category must be a string"),
        (lambda s: s.read_stream_until("s-1", "yesterday"), "until must be a datetime"),
        (lambda s: s.save_snapshot("s-1", "T", "1", 2**63, "{}"), "stream_version must fit in 64 bits"),
        (lambda s: s.save_snapshot("s-1", "T", "1", 0, {"a": 1}), "snapshot data must be JSON text"),
        (lambda s: s.save_snapshot("s-1", "T\x00", "1", 0, "{}"), "NUL"),
        (lambda s: s.read_stream("s-1", direction="up"), "direction must be a Direction"),
        (lambda s: s.stream_version("s\x00"), "stream id"),
        (lambda s: s.stream_version(5), "stream id"),
        (lambda s: s.read_all(types=["T\x00"]), "types"),
    ],
)
async def test_bad_read_arguments_are_typed(store: EventStore, call: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        await call(store)
    assert isinstance(caught.value, EventStoreError) and isinstance(caught.value, ValueError)


def test_bad_subscription_and_settings_are_typed(store: EventStore) -> None:
    with pytest.raises(InvalidArgument):
        store.subscribe(START, batch_size=0)
    with pytest.raises(InvalidArgument, match="fit in 64 bits"):
        store.subscribe((2**63, 0))
    with pytest.raises(InvalidArgument, match="poll_interval"):
        store.subscribe(START, poll_interval=0)
    with pytest.raises(InvalidSettings):
        KafkaSettings(bootstrap_servers="")
    with pytest.raises(InvalidSettings):
        RelaySettings(batch_size=0)
    for bad in ({"relay_id": "r\x00"}, {"batch_size": 2**63}, {"max_attempts": 2**40}, {"poll_interval": math.inf}):
        with pytest.raises(InvalidSettings):
            RelaySettings(**bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        EventStore()


def test_every_component_error_is_an_event_store_error() -> None:
    for error in (AggregateError, ProjectionError, OutboxError, InvalidSettings):
        assert issubclass(error, EventStoreError), error


async def test_migrate_from_inside_an_event_loop(server_url: str) -> None:
    """An async main or a FastAPI lifespan: `await migrate_async(url)`, and plain `migrate` works too."""
    import uuid

    from tests.conftest import _admin, with_database

    name = f"es_async_{uuid.uuid4().hex[:8]}"
    await _admin(server_url, f'CREATE DATABASE "{name}"')
    try:
        url = with_database(server_url, name)
        await migrate_async(url)
        migrate(url)  # already at head: nothing to do, and no "asyncio.run() cannot be called" either
        async with EventStore(url) as store:
            await store.append("s-1", [NewEvent("X")])
    finally:
        await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_an_application_declared_with_the_wrong_parts_is_refused_where_it_is_declared() -> None:
    import os

    from eventstore import MasterKey
    from eventstore_app import Application, ApplicationSettings

    for parts in [
        {"aggregates": [5]}, {"aggregates": "Cart"}, {"projections": [object()]}, {"database_url": 5},
        {"kafka": 5}, {"broker": 5}, {"settings": "fast"}, {"keys": "secret"}, {"registry": {}},
    ]:
        with pytest.raises(InvalidArgument):
            Application("shop", **parts)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        Application("sh\x00p")
    app = Application("shop", aggregates=(a for a in ()), keys=MasterKey(os.urandom(32)),
                      settings=ApplicationSettings(), broker="nats://127.0.0.1:4222")
    assert app.aggregates == () and app.name == "shop"


async def test_lone_surrogates_and_forged_markers_are_typed_errors_that_write_nothing(store: EventStore) -> None:
    """PostgreSQL's text has no form for a lone surrogate: the driver's DataError must not leak."""
    from eventstore import START, Query, lifecycle

    bad = "s-\ud800"
    calls = [
        lambda: store.append(bad, [NewEvent("T")]),
        lambda: store.append("s-1", [NewEvent("T\ud800")]),
        lambda: store.append("s-1", [NewEvent("T", tags=["t\ud800"])]),
        lambda: store.read_all(types=["T\ud800"]),
        lambda: store.read_all(category="c\ud800"),
        lambda: store.read_stream(bad),
        lambda: store.read_query(Query.of(tags=["t\ud800"])),
        lambda: store.forget("subject\ud800"),
        lambda: lifecycle.delete(store, ["s-1"], reason="because\ud800"),
        lambda: store.append("s-1", [NewEvent("T")], condition=(Query.of(types=["T"]), START, (2**70,))),
        lambda: store.append("s-1", [NewEvent("T", metadata={"personal_data": {"fields": {"email": "x"}}})]),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            await call()
    assert await store.pool.fetchval("SELECT count(*) FROM events") == 0


async def test_type_filters_are_read_once_and_a_single_string_is_refused(store: EventStore) -> None:
    await store.append("order-1", [NewEvent("OrderPlaced"), NewEvent("Other")])
    for types in (iter(["OrderPlaced"]), (t for t in ["OrderPlaced"]), ["OrderPlaced"], ("OrderPlaced",)):
        assert [e.event_type for e in await store.read_all(types=types)] == ["OrderPlaced"]
    for bad in ("OrderPlaced", 5, [5], b"OrderPlaced", ["a\x00b"]):
        with pytest.raises(InvalidArgument, match="types"):
            await store.read_all(types=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="types"):
            store.subscribe(types=bad)  # type: ignore[arg-type]
    async with store.subscribe(types=iter(["OrderPlaced"])) as sub:
        assert (await asyncio.wait_for(anext(aiter(sub)), 10)).event_type == "OrderPlaced"


@pytest.mark.parametrize("timeout", ["5", float("nan"), -1, 0, True])
async def test_wait_until_visible_refuses_a_bad_timeout(store: EventStore, timeout: object) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        await store.wait_until_visible(await store.last_committed(), timeout=timeout)  # type: ignore[arg-type]
