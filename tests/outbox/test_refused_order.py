"""A message the broker refused once keeps its key's later messages behind it, also while the relay drains
a backlog with its fetch cursor past it (they went out first once its backoff had run out)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from eventstore import EventStore, NewEvent
from outbox import Delivery, Outbox, OutboxMessage, Relay, Route, publish_in_key_order
from tests.outbox.conftest import relay_settings


class RefusesOnce:
    """A publisher (the relay's contract, no broker) that refuses one message the first time it sees it."""

    def __init__(self, refused: tuple[str, int]) -> None:
        self.refused = refused
        self.sent: list[tuple[str, int]] = []
        self._said_no = False

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, topic: str, messages: Sequence[OutboxMessage], leased: object) -> Delivery:
        await asyncio.sleep(0.01)

        async def send(message: OutboxMessage) -> None:
            which = (message.key, message.stream_version)
            if which == self.refused and not self._said_no:
                self._said_no = True
                raise ValueError("refused once")
            self.sent.append(which)

        return await publish_in_key_order(messages, leased, send, unreachable=lambda exc: False)


async def test_a_refused_message_is_not_overtaken_by_its_key_while_a_backlog_drains(store: EventStore) -> None:
    await Outbox([Route("orders", category="order")], source="/tests").declare(store)
    await store.append("order-k", [NewEvent("OrderPlaced", {"v": 0})])
    for i in range(400):
        await store.append(f"order-x{i}", [NewEvent("OrderPlaced", {"i": i})])
    for v in range(1, 6):
        await store.append("order-k", [NewEvent("OrderPlaced", {"v": v})])
    for i in range(100):
        await store.append(f"order-y{i}", [NewEvent("OrderPlaced", {"i": i})])
    publisher = RefusesOnce(("order-k", 0))
    settings = relay_settings(batch_size=10, lease_ttl=60.0, retry_backoff=0.2, max_retry_backoff=0.2)
    async with Relay(store, publisher, settings):
        for _ in range(600):
            if not await store.pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"):
                break
            await asyncio.sleep(0.05)
    assert [v for key, v in publisher.sent if key == "order-k"] == [0, 1, 2, 3, 4, 5]
    assert len(publisher.sent) == 506
