"""The relay: publishes outbox messages to a broker (Kafka, NATS JetStream, RabbitMQ) in order per key, at least once.

Work is split by slot (a key always hashes to the same slot) and each slot is leased to one relay at a
time (`outbox.leases`), so two relays never publish messages of one key concurrently. Within its slots
a relay sends messages in outbox order, waits for the broker's acknowledgement (acks=all), and only
then marks them published: a crash between the two publishes them again on restart (at least once,
never lost). Messages go out in the order of the log (see `eventstore.Checkpoint`): a relay only sees
messages whose events are visible in the log, so a transaction that commits late can never have a
message of its key overtaken by a later one, and a stream's messages follow its versions.

How one round's messages reach the broker, in order per key whatever fails, is `outbox.publishing`
(and, for Kafka, `outbox.kafka`).
When the broker is unreachable the relay backs off and resumes where it stopped, counting nothing
against the messages. A message the broker refuses is retried after a backoff; after `max_attempts` it
moves to the dead-letter state, and from then on later messages of its key flow again: a message the
broker keeps refusing must not stop its key for good (progress over order). `retry_dead` puts it back;
it is then published after the messages that overtook it, with its original id, time and stream
version so a consumer can tell.

One limit: a topic that does not exist on a broker that does not create topics looks like an
unreachable broker (aiokafka times out waiting for its metadata), so the relay backs off as a whole
until the topic is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from eventstore import (
    CONNECTION_ERRORS,
    NOTIFY_CHANNEL,
    Backoff,
    EventStore,
    InvalidArgument,
    NotStarted,
    with_retries,
)
from outbox import sql, telemetry
from outbox.brokers import Broker, publisher_for, resolve
from outbox.leases import DATABASE_ERRORS, SlotLeases
from outbox.operations import prune_published
from outbox.publishing import BrokerDown, OutboxMessage, Sender, describe
from outbox.settings import RelaySettings

log = logging.getLogger(__name__)

_LISTEN_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


@dataclass
class RelayStats:
    published: int = 0
    refused: int = 0
    dead: int = 0
    rounds: int = 0
    broker_errors: int = 0
    database_errors: int = 0
    max_in_flight: int = 0


class Relay:
    """One relay process. Use as `async with Relay(store, "nats://127.0.0.1:4222") as relay:`.

    The broker is a URL (`host:9092` or `kafka://...`, `nats://...`, `amqp://...`), its settings
    (`KafkaSettings`, `NatsSettings`, `RabbitMQSettings`) or a `Publisher` of your own.

    It queries through the started `store`'s pool and listens for notifications on a connection of its
    own to the store's URL (a store built from a bare pool has none: the relay then polls). Several
    relays may run at once: each takes a fair share of the slots, and a stopped or crashed relay's slots
    move to the others (at once on `stop()`, after `lease_ttl` on a crash).
    """

    def __init__(
        self,
        store: EventStore,
        broker: Broker,
        settings: RelaySettings | None = None,
    ) -> None:
        if not isinstance(store, EventStore):
            raise InvalidArgument(f"Relay needs an EventStore, got {type(store).__name__}")
        self.store = store
        self.broker = resolve(broker)
        self.settings = settings or RelaySettings()
        self.stats = RelayStats()
        self._leases = SlotLeases(store, self.relay_id, self.settings)
        self._publisher = Sender(
            publisher_for(self.broker, self.settings.send_timeout), self._leases, 2 * self.settings.send_timeout,
            self.settings.dataschema,
        )
        self._backlog = _Backlog(store, self.settings.batch_size, self._mark_published)
        self._wakeups = _Wakeups(store.url, self.settings.poll_interval)
        self._stopped = asyncio.Event()
        self._main_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._next_rebalance = 0.0
        self._next_prune = 0.0
        self._busy_until = 0.0
        self._held = Backoff.held_back(self.settings.poll_interval)
        self._idled = False
        """The last round sent nothing: the next one asks whether the log holds messages back first."""
        self._held_now: bool | None = None
        """This round's answer to that question (None: not asked)."""

    @property
    def relay_id(self) -> str:
        return self.settings.relay_id

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._leases.check_slots()
        telemetry.watch(self)
        self._stopped.clear()
        self._main_task = asyncio.create_task(self._main(), name=f"outbox-relay-{self.relay_id}")
        self._renew_task = asyncio.create_task(self._leases.renew_forever(), name=f"outbox-lease-{self.relay_id}")

    async def stop(self) -> None:
        """Finish the round in progress, hand the slots back, close the producer and the listener."""
        started = self._main_task is not None
        self._stopped.set()
        self._wakeups.set()
        if self._renew_task is not None:
            self._renew_task.cancel()
        for task in (self._main_task, self._renew_task):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._main_task = self._renew_task = None
        if started:
            with contextlib.suppress(Exception):
                await self._backlog.settle()
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._leases.release()
        await self._publisher.stop()
        await self._wakeups.close()
        telemetry.unwatch(self)

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait(self) -> None:
        """Run until stopped (or until the relay fails in a way it cannot recover from)."""
        if self._main_task is None:
            raise NotStarted("Relay is not started")
        await asyncio.shield(self._main_task)

    def wake(self) -> None:
        self._wakeups.set()

    @property
    def owned_slots(self) -> list[int]:
        return self._leases.owned

    # -- the loop ----------------------------------------------------------------------------------

    async def _main(self) -> None:
        broker = Backoff(self.settings.broker_backoff, self.settings.max_broker_backoff)
        database = Backoff(limit=2.0)
        while not self._stopped.is_set():
            try:
                now = time.monotonic()
                if now >= self._next_rebalance:
                    await self._backlog.settle()  # never release a slot whose batch is still being marked
                    await self._leases.rebalance()
                    self._next_rebalance = now + self.settings.renew_interval
                if self.settings.retention is not None and now >= self._next_prune:
                    await prune_published(self.store, self.settings.retention)
                    self._next_prune = now + self.settings.prune_interval
                sent = await self._round()
                self._idled = not sent
                broker.reset()
                database.reset()
                if sent:
                    self._busy_until = time.monotonic() + self.settings.busy_window
                else:
                    await self._idle()
            except BrokerDown as exc:
                self.stats.broker_errors += 1
                delay = broker.failed()
                log.warning("broker unavailable (%s); retrying in %.1fs", exc, delay)
                await self._publisher.stop()
                await self._sleep(delay)
            except DATABASE_ERRORS as exc:
                self.stats.database_errors += 1
                delay = database.failed()
                log.warning("database unavailable (%s); retrying in %.2fs", exc, delay)
                await self._sleep(delay)
            except Exception:
                log.exception("relay round failed; retrying in %.1fs", self.settings.max_broker_backoff)
                await self._sleep(self.settings.max_broker_backoff)

    async def _held_back(self, slots: list[int]) -> bool:
        async with self.store.connection() as conn:
            return bool(await conn.fetchval(sql.HELD_BACK, slots))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def _idle(self) -> None:
        """Sleep until a NOTIFY, the poll interval, or the next lease check, whichever comes first.

        For `busy_window` after publishing it looks again after `busy_poll_interval` at the latest: a
        writer whose connection pool is saturated sends its NOTIFY late. A NOTIFY still wakes it sooner;
        writers send at most one every few milliseconds (`eventstore.store.NOTIFY_INTERVAL`), so that
        costs at most a query each.
        """
        now = time.monotonic()
        if now < self._busy_until:
            await self._wakeups.wait(self.settings.busy_poll_interval)
            return
        await self._wakeups.listen()
        slots = list(self._leases.usable())
        if slots and self._held_now is None:
            # Asked after this round's fetch, the question would miss messages that an older transaction
            # released in between (it sends no NOTIFY): one more round, which asks before it fetches.
            return
        if slots and self._held_now:
            # No NOTIFY comes when the older transaction holding them back ends without writing events.
            await self._wakeups.wait(self._held.failed())
            return
        self._held.reset()
        await self._wakeups.wait(min(self.settings.poll_interval, max(self._next_rebalance - now, 0.0)))

    @telemetry.relay_round
    async def _round(self) -> int:
        """Fetch, send and await acknowledgements for one batch; return how many messages went out."""
        slots = list(self._leases.usable())
        self._held_now = None
        if not slots:
            await self._backlog.settle()
            return 0
        self._wakeups.clear()
        if self._idled:
            self._held_now = await self._held_back(slots)
        messages = await self._backlog.next(slots)
        if not messages:
            return 0
        self.stats.rounds += 1
        await self._publisher.start()
        usable = self._leases.usable()
        held: set[str] = set()  # keys whose later messages must wait for an earlier one
        queued: list[OutboxMessage] = []
        for message in messages:
            if message.slot not in usable or message.key in held:
                continue
            if message.attempts:
                # A retry goes out alone for its key: should it fail again, nothing of the key overtook it.
                held.add(message.key)
            queued.append(message)
        full = len(queued) == len(messages) == self.settings.batch_size
        if full:
            self._backlog.fetch_ahead(slots, messages[-1])
        try:
            outcome = await self._publisher.send(telemetry.publishing(queued))
            telemetry.acknowledged(queued, outcome.published)
            self.stats.max_in_flight = max(self.stats.max_in_flight, outcome.max_in_flight)
            await self._backlog.mark(outcome.published)
            if outcome.refused:
                await self._record_refusals(outcome.refused)
        except Exception:
            await self._backlog.drop_prefetch()  # it skips messages of this round that may still be pending
            raise
        if full and len(outcome.published) == len(messages):
            self._backlog.go_on_after(messages[-1])
        else:
            await self._backlog.drop_prefetch()
        if outcome.down is not None:
            await self._backlog.settle_marking()
            raise BrokerDown(describe(outcome.down)) from outcome.down
        return len(outcome.published) + len(outcome.refused)

    # -- recording the broker's answers ------------------------------------------------------------

    async def _mark_published(self, ids: list[int]) -> None:
        await self._persist(sql.MARK_PUBLISHED, ids, self.relay_id)
        self.stats.published += len(ids)

    async def _record_refusals(self, refused: Sequence[tuple[OutboxMessage, BaseException]]) -> None:
        rows = await self._persist(
            sql.RECORD_FAILURES,
            [message.id for message, _ in refused],
            [describe(exc) for _, exc in refused],
            [self.settings.retry_delay(message.attempts) for message, _ in refused],
            self.settings.max_attempts,
        )
        dead = sum(1 for row in rows if row["dead"])
        telemetry.refused(refused, [row["id"] for row in rows if row["dead"]])
        self.stats.refused += len(refused)
        self.stats.dead += dead
        for message, exc in refused:
            log.warning("broker refused outbox message %s (key %r, attempt %d): %s",
                        message.id, message.key, message.attempts + 1, describe(exc))
        if dead:
            log.error("%d outbox message(s) moved to the dead-letter state", dead)

    async def _persist(self, statement: str, *args: Any) -> list[asyncpg.Record]:
        """Record what the broker answered, retrying on a fresh connection if this one was lost.

        Giving up here would not lose messages, but would publish them all again: worth retrying for as
        long as a round may take.
        """

        async def attempt() -> list[asyncpg.Record]:
            try:
                async with self.store.connection() as conn:
                    return list(await conn.fetch(statement, *args))
            except CONNECTION_ERRORS:
                self.stats.database_errors += 1
                raise

        return await with_retries(attempt, patience=self.settings.send_margin, what="recording the broker's answer")


class _Backlog:
    """The pending messages of the relay's slots, fetched batch after batch.

    Marking a batch published overlaps the next round, whose fetch leaves that batch out (acknowledged,
    not yet marked: it must not be sent twice). While a backlog drains (full batches, all published)
    fetches continue after the last message in log order instead of from the first pending one, which
    would wade through the index entries of everything just marked; and the next batch is fetched while
    this one is sent (nothing of it is sent before this one's acknowledgements are in). Skipping ahead
    is safe because fetches only see messages below the log's visibility line, under which nothing new
    can appear. A round that is not full, or leaves a message behind (a held key, a lapsing lease, a
    refusal, a failed send), ends both: the next fetch starts from the first pending message again, so
    the message left behind goes first.
    """

    def __init__(
        self, store: EventStore, batch_size: int, mark: Callable[[list[int]], Coroutine[Any, Any, None]]
    ) -> None:
        self._store = store
        self._batch_size = batch_size
        self._mark = mark
        self._cursor: tuple[int, int, int] | None = None  # the place of the last message sent
        self._prefetch: asyncio.Task[list[OutboxMessage]] | None = None
        self._marking: asyncio.Task[None] | None = None
        self._marking_ids: list[int] = []

    async def next(self, slots: list[int]) -> list[OutboxMessage]:
        """The next batch of pending messages: the one fetched ahead, or one fetched now."""
        if self._prefetch is not None:
            prefetch, self._prefetch = self._prefetch, None
            messages = await prefetch
        elif self._cursor is not None:
            messages = await self._fetch_after(slots, self._cursor)
        else:
            async with self._store.connection() as conn:
                rows = await conn.fetch(sql.FETCH_PENDING, slots, self._batch_size, self._marking_ids)
            messages = await self._open([OutboxMessage._make(row) for row in rows])
        self._cursor = None
        return messages

    def fetch_ahead(self, slots: list[int], last: OutboxMessage) -> None:
        """Fetch the batch after `last` while this one is sent."""
        self._prefetch = asyncio.create_task(self._fetch_after(slots, last.place))

    def go_on_after(self, last: OutboxMessage) -> None:
        """Everything up to `last` is published: the next fetch starts after it."""
        self._cursor = last.place

    async def mark(self, ids: list[int]) -> None:
        """Mark `ids` published in the background, once the batch marked before them is (one at a time)."""
        await self.settle_marking()
        if ids:
            self._marking = asyncio.create_task(self._mark(ids))
            self._marking_ids = ids

    async def settle_marking(self) -> None:
        """Wait for the batch being marked published (if it fails, its messages are sent again later)."""
        task, self._marking = self._marking, None
        try:
            if task is not None:
                await task
        finally:
            self._marking_ids = []

    async def drop_prefetch(self) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            with contextlib.suppress(Exception):
                await prefetch

    async def settle(self) -> None:
        """Nothing in the air: no batch fetched ahead, none being marked; fetch from the start."""
        self._cursor = None
        await self.drop_prefetch()
        await self.settle_marking()

    async def _fetch_after(self, slots: list[int], after: tuple[int, int, int]) -> list[OutboxMessage]:
        async with self._store.connection() as conn:
            rows = await conn.fetch(sql.FETCH_PENDING_AFTER, slots, self._batch_size, *after)
        return await self._open([OutboxMessage._make(row) for row in rows])

    async def _open(self, messages: list[OutboxMessage]) -> list[OutboxMessage]:
        """Publish personal fields opened, or redacted once their subject is forgotten: never the ciphertext.

        Opened at fetch time, so a message sent after `forget` carries the redacted value even when the
        event was written before it.
        """
        sealed = [i for i, m in enumerate(messages) if m.sealed is not None]
        if not sealed:
            return messages
        chosen = [messages[i] for i in sealed]
        opened = await self._store.keyring.open(
            self._store.pool, [m.event_id for m in chosen], [m.data for m in chosen], [m.sealed or "" for m in chosen]
        )
        for i, data in zip(sealed, opened, strict=True):
            messages[i] = messages[i]._replace(data=data)
        return messages


class _Wakeups:
    """What wakes an idle relay: a NOTIFY of every committed append (the store's channel) or of the outbox.

    Notifications arrive on a connection of the relay's own, outside the pool (pooled connections are
    reset and reclaimed); while it has none (PostgreSQL down, or a store without a URL) the relay polls.
    """

    def __init__(self, url: str | None, poll_interval: float) -> None:
        self._url = url
        self._poll_interval = poll_interval
        self._listener: asyncpg.Connection | None = None
        self._event = asyncio.Event()

    def set(self, *_: object) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)

    async def listen(self) -> None:
        if self._url is None or (self._listener is not None and not self._listener.is_closed()):
            return
        await self.close()
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(self._url, timeout=self._poll_interval + 1)
            await conn.add_listener(NOTIFY_CHANNEL, self.set)
            await conn.add_listener(sql.NOTIFY_CHANNEL, self.set)
            conn.add_termination_listener(self.set)  # a lost listener wakes the relay to listen again
        except _LISTEN_ERRORS as exc:
            log.debug("relay cannot listen (%s); polling every %ss", exc, self._poll_interval)
            if conn is not None:
                conn.terminate()
            return
        self._listener = conn
        self.set()  # what was committed while nobody listened: look once more before sleeping

    async def close(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
