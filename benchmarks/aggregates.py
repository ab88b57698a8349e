"""Aggregate load time: ours, the `eventsourcing` package and raw asyncpg + pydantic, on one server.

Each row loads one aggregate whose stream holds N `ItemAdded` events (median of several loads, in ms;
ours and raw take turns load by load). The snapshot rows load from a snapshot taken 100 events before
the end plus those 100 events. Raw is the floor of a load: fetch the payloads, validate each with
pydantic and fold it into the cart's state with the cart's own fold.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from pydantic import BaseModel

from aggregates import Aggregate, DomainEvent, Repository, applies
from benchmarks.common import Result, Timer, eventsourcing_env, fresh_database
from eventstore import EventStore, asyncpg_dsn

SIZES = (1_000, 10_000)
TAIL = 100  # events after the snapshot: a snapshotted load reads only these
SKUS = [f"SKU-{i:03d}" for i in range(50)]
UNIT = "ms per load"

RAW_EVENTS = "SELECT data FROM events WHERE stream_id = $1 AND stream_version >= $2 ORDER BY stream_version"
RAW_SNAPSHOT = "SELECT stream_version, data FROM snapshots WHERE stream_id = $1"


class ItemAdded(DomainEvent):
    sku: str
    quantity: int
    price_cents: int


class CartState(BaseModel):
    items: int = 0
    total_cents: int = 0
    quantities: dict[str, int] = {}


class Cart(Aggregate[CartState], category="cart"):
    def add(self, sku: str, quantity: int, price_cents: int) -> None:
        if quantity <= 0:
            raise ValueError("quantity must be positive")
        self._emit(ItemAdded(sku=sku, quantity=quantity, price_cents=price_cents))

    @applies(ItemAdded)
    def _added(self, event: ItemAdded) -> None:
        _add(self.state, event)


def _add(state: CartState, event: ItemAdded) -> None:
    """The fold of the cart, shared by the aggregate and the raw floor."""
    state.items += event.quantity
    state.total_cents += event.quantity * event.price_cents
    state.quantities[event.sku] = state.quantities.get(event.sku, 0) + event.quantity


class SnapshottedCart(Cart, snapshot_every=1_000_000):
    """Snapshots taken explicitly below, `TAIL` events before the end, so every side loads the same tail."""


def _item(i: int) -> tuple[str, int, int]:
    return SKUS[i % len(SKUS)], 1 + i % 3, 100 + i % 900


def _repeats(size: int) -> int:
    return 30 if size <= 1_000 else 7


Load = Callable[[], Awaitable[None]]


async def _medians_ms(ours: Load, raw: Load, repeats: int) -> tuple[float, float]:
    """Median load times of both, taking turns load by load so that a slow spell hits both alike."""
    await ours()  # warm: prepared statements, pydantic validators
    await raw()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for load, out in ((ours, times[0]), (raw, times[1])):
            with Timer() as t:
                await load()
            out.append(t.seconds)
    return statistics.median(times[0]) * 1000, statistics.median(times[1]) * 1000


def _median_ms_sync(load: Callable[[], object], repeats: int) -> float:
    load()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def _ours(store: EventStore) -> dict[str, Load]:
    out: dict[str, Load] = {}
    carts = Repository(store, Cart)
    for size in SIZES:
        cart = Cart(f"plain{size}")
        for i in range(size):
            cart.add(*_item(i))
        await carts.save(cart)
        aggregate_id = cart.id

        async def load(aggregate_id: str = aggregate_id, size: int = size) -> None:
            loaded = await carts.get(aggregate_id)
            assert loaded.version == size - 1

        out[f"plain{size}"] = load

    snapshotted = Repository(store, SnapshottedCart)
    for size in SIZES:
        snap = SnapshottedCart(f"snap{size}")
        for i in range(size):
            snap.add(*_item(i))
        await snapshotted.save(snap)
        await snapshotted.take_snapshot(await snapshotted.get(snap.id, version=size - TAIL - 1))

        async def load_snapshotted(snap: SnapshottedCart = snap, size: int = size) -> None:
            loaded = await snapshotted.get(snap.id)
            assert loaded.version == size - 1 and loaded.state == snap.state

        out[f"snapshot{size}"] = load_snapshotted
    return out


def _raw(conn: asyncpg.Connection) -> dict[str, Load]:
    """The floor: fetch the same payloads with asyncpg, validate each with pydantic and fold it into the
    state with the cart's own fold, nothing else (no aggregate, no registry, no metadata)."""
    out: dict[str, Load] = {}
    for size in SIZES:

        async def load(stream: str = f"cart-plain{size}", size: int = size) -> None:
            rows = await conn.fetch(RAW_EVENTS, stream, 0)
            state = CartState()
            for row in rows:
                _add(state, ItemAdded.model_validate_json(row[0]))
            assert len(rows) == size

        out[f"plain{size}"] = load

    for size in SIZES:

        async def load_snapshotted(stream: str = f"cart-snap{size}") -> None:
            row = await conn.fetchrow(RAW_SNAPSHOT, stream)
            assert row is not None
            state = CartState.model_validate_json(row[1])
            rows = await conn.fetch(RAW_EVENTS, stream, row[0] + 1)
            for event in rows:
                _add(state, ItemAdded.model_validate_json(event[0]))
            assert len(rows) == TAIL

        out[f"snapshot{size}"] = load_snapshotted
    return out


def _peer(url: str) -> dict[str, float]:
    """The same carts as `eventsourcing` aggregates, loaded with `Application.repository.get`."""
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate as PeerAggregate
    from eventsourcing.domain import event

    class PeerCart(PeerAggregate):  # type: ignore[misc]
        def __init__(self) -> None:
            self.items = 0
            self.total_cents = 0
            self.quantities: dict[str, int] = {}

        @event("ItemAdded")  # type: ignore[misc]
        def add(self, sku: str, quantity: int, price_cents: int) -> None:
            self.items += quantity
            self.total_cents += quantity * price_cents
            self.quantities[sku] = self.quantities.get(sku, 0) + quantity

    class Carts(Application):  # type: ignore[misc]
        pass

    class SnapshottedCarts(Application):  # type: ignore[misc]
        is_snapshotting_enabled = True

    def build(app: Any, size: int) -> Any:
        cart = PeerCart()  # its creation is an event too: `size` events in all
        for i in range(size - 1):
            cart.add(*_item(i))
            if i % 1000 == 999:  # psycopg's pipeline can stall on one huge save over a Unix socket
                app.save(cart)
        app.save(cart)
        return cart

    out: dict[str, float] = {}
    with eventsourcing_env(url):
        carts, snapshotted = Carts(), SnapshottedCarts()
    try:
        for size in SIZES:
            cart = build(carts, size)

            def load(cart_id: uuid.UUID = cart.id, size: int = size) -> None:
                assert carts.repository.get(cart_id).version == size  # its versions start at 1

            out[f"plain{size}"] = _median_ms_sync(load, _repeats(size))
        for size in SIZES:
            snap = build(snapshotted, size)
            snapshotted.take_snapshot(snap.id, version=size - TAIL)

            def load_snapshotted(snap: Any = snap, size: int = size) -> None:
                loaded = snapshotted.repository.get(snap.id)
                assert loaded.version == size and loaded.total_cents == snap.total_cents

            out[f"snapshot{size}"] = _median_ms_sync(load_snapshotted, _repeats(size))
    finally:
        carts.close()
        snapshotted.close()
    return out


async def run(server_url: str) -> list[Result]:
    ours: dict[str, float] = {}
    raw: dict[str, float] = {}
    async with fresh_database(server_url) as url:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            async with EventStore(url) as store:
                ours_loads, raw_loads = await _ours(store), _raw(conn)
                for key, load in ours_loads.items():
                    size = int(key.removeprefix("plain").removeprefix("snapshot"))
                    ours[key], raw[key] = await _medians_ms(load, raw_loads[key], _repeats(size))
        finally:
            await conn.close()
        peer = await asyncio.to_thread(_peer, url)
    names = {
        "plain1000": "aggregate load 1,000 events",
        "plain10000": "aggregate load 10,000 events",
        "snapshot1000": "aggregate load 1,000 events (snapshot)",
        "snapshot10000": "aggregate load 10,000 events (snapshot)",
    }
    return [Result(names[k], ours[k], UNIT, peer=peer[k], limit=raw[k]) for k in names]
