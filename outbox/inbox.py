"""The consumer side: an idempotent inbox that makes at-least-once delivery safe to act on.

The relay publishes at least once, so a consumer can see a message twice (after a relay crash, or
after its own crash before committing its Kafka offset). The inbox records each handled message id in
PostgreSQL in the same transaction as the consumer's effect: either both commit or neither does, and a
redelivered message finds its id and is skipped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from eventstore import Connection, EventStore, InvalidArgument, UnitOfWork, storable_text
from outbox import sql, telemetry
from outbox.cloudevents import CloudEvent
from outbox.operations import check_age

Effect = Callable[[UnitOfWork], Awaitable[None]]


def _message_id(message: CloudEvent | str) -> str:
    message_id = message.id if isinstance(message, CloudEvent) else message
    if not isinstance(message_id, str) or not message_id or not storable_text(message_id):  # off the wire
        raise InvalidArgument(f"a message id is a non-empty string without NUL or lone surrogates, got {message_id!r}")
    return message_id


class Inbox:
    """Handled message ids of one consumer (`consumer` names it; consumers do not see each other's ids)."""

    def __init__(self, store: EventStore, consumer: str) -> None:
        if not isinstance(consumer, str) or not consumer or not storable_text(consumer):
            raise InvalidArgument("consumer must be a non-empty string without NUL or lone surrogates")
        self.store = store
        self.consumer = consumer

    async def record(self, connection: Connection, message: CloudEvent | str) -> bool:
        """Inside the caller's transaction: record the id; False if it was handled before.

        A concurrent transaction handling the same id makes this wait for it, then answer False if it
        committed (True if it rolled back), so two consumers never both apply one message.
        """
        return bool(await connection.fetchval(sql.INBOX_RECORD, self.consumer, _message_id(message)))

    async def handle(self, message: CloudEvent | str, effect: Effect) -> bool:
        """Run `effect` in a unit of work with the inbox record, unless the message was handled already.

        Returns whether the effect ran. If `effect` raises, nothing is recorded and the message can be
        handled again (so do not commit the Kafka offset).
        """
        message_id = _message_id(message)
        with telemetry.consuming(message, self.consumer) as ran:
            async with self.store.unit_of_work() as uow:
                if not await self.record(uow.connection, message_id):
                    ran(False)
                    return False
                await effect(uow)
            ran(True)
        return True

    async def seen(self, message: CloudEvent | str) -> bool:
        return bool(await self.store.pool.fetchval(sql.INBOX_SEEN, self.consumer, _message_id(message)))

    async def prune(self, older_than: float) -> int:
        """Forget ids handled more than `older_than` seconds ago (a redelivery older than that is applied again)."""
        check_age(older_than)
        result = await self.store.pool.execute(sql.INBOX_PRUNE, self.consumer, older_than)
        return int(result.split()[-1])
