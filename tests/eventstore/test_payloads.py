"""`read_stream_payloads`: the cheap read of an aggregate load, the same events as `read_stream`."""

from __future__ import annotations

import pytest

from eventstore import EventStore, InvalidArgument, NewEvent


async def test_payloads_are_the_stream_forwards(store: EventStore) -> None:
    await store.append("cart-1", [NewEvent("Added", {"n": n}, metadata={"m": n}) for n in range(5)])
    await store.append("cart-2", [NewEvent("Other")])
    recorded = await store.read_stream("cart-1", 1)
    payloads = await store.read_stream_payloads("cart-1", 1)
    assert [(p.event_type, p.data, p.metadata, p.stream_id, p.stream_version) for p in payloads] == [
        (r.event_type, r.data, r.metadata, r.stream_id, r.stream_version) for r in recorded
    ]
    assert [p.stream_version for p in await store.read_stream_payloads("cart-1", 0, limit=2)] == [0, 1]
    assert await store.read_stream_payloads("cart-3") == []
    with pytest.raises(InvalidArgument):
        await store.read_stream_payloads("", 0)
    with pytest.raises(InvalidArgument):
        await store.read_stream_payloads("cart-1", 0, limit=-1)
