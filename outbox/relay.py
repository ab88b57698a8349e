"""The relay: publishes outbox messages to Kafka in order per key, at least once.

Work is split by slot (a key always hashes to the same slot) and each slot is leased to one relay at a
time, so two relays never publish messages of one key concurrently. Within its slots a relay sends
messages in outbox order, waits for the broker's acknowledgement (acks=all), and only then marks them
published: a crash between the two publishes them again on restart (at least once, never lost).
Messages go out in the order of the log (see `eventstore.Checkpoint`): a relay only sees messages
whose events are visible in the log, so a transaction that commits late can never have a message of
its key overtaken by a later one, and a stream's messages follow its versions.

A key's messages all go to one partition (the producer's own partitioner picks it from the key), and
each partition's messages go out as record batches one after another: the next batch is sent only
once the broker has acknowledged the one before. The broker appends a record batch whole or not at
all, so when a batch fails (the broker went away, or refused it) nothing after it in its partition has
been sent, and no message can overtake an earlier message of its key, whatever fails and however it
fails. Partitions are sent concurrently.

Failures are split in two. When the broker is unreachable (connection refused, timeouts, leader
elections: aiokafka's retriable errors) nothing is counted against the messages: the relay backs off
and resumes where it stopped. When the broker refuses a message (too large, invalid, not authorized)
the message's attempts go up and it is retried after a backoff, alone; while it waits, later messages
of the same key wait too, so the key's order holds. A refused batch of several messages does not say
which one the broker objects to: its halves are sent again, in order, until the refusal is narrowed
down to a single message, and only that one is counted (the messages before it are published, those
after it in its partition wait for the next round). After `max_attempts` a message moves to the
dead-letter state, and from then on later messages of its key flow again: a message the broker keeps
refusing must not stop its key for good (progress over order). `retry_dead` puts it back; it is then
published after the messages that overtook it, with its original id, time and stream version so a
consumer can tell.

One limit: a topic that does not exist on a broker that does not create topics looks like an
unreachable broker (aiokafka times out waiting for its metadata), so the relay backs off as a whole
until the topic is created.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, ProducerClosed
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from eventstore import CONNECTION_ERRORS, DatabaseUnavailable, NotStarted, asyncpg_dsn, with_retries
from eventstore import sql as store_sql
from outbox import sql
from outbox.cloudevents import kafka_headers
from outbox.errors import InvalidSettings
from outbox.operations import prune_published
from outbox.schema import SLOT_COUNT

log = logging.getLogger(__name__)

_DATABASE_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, DatabaseUnavailable)
_LISTEN_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


def _default_relay_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class _Settings(BaseModel):
    """Settings whose bad values raise `InvalidSettings` (an `EventStoreError`), not pydantic's error."""

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidSettings(f"{type(self).__name__}: {exc}") from None


class KafkaSettings(_Settings):
    """How the relay reaches Kafka. Everything here is passed through to `aiokafka.AIOKafkaProducer`.

    `enable_idempotence` is for real Kafka clusters: the embedded `tansu` broker used by the tests
    rejects InitProducerId, so the tests run without it (acks=all, at least once, duplicates possible
    after a crash; consumers use the `Inbox` to skip them).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True, extra="forbid")

    bootstrap_servers: str = Field(min_length=1)
    client_id: str = "eventstore-outbox"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_context: ssl.SSLContext | None = None
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER"] = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    enable_idempotence: bool = False
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    max_request_size: int = Field(default=1024 * 1024, gt=0)
    max_batch_size: int = Field(default=256 * 1024, gt=0)
    linger_ms: int = Field(default=0, ge=0)
    extra: dict[str, Any] = Field(default_factory=dict)
    """Further AIOKafkaProducer keyword arguments, passed verbatim."""

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSettings:
        if self.security_protocol in ("SSL", "SASL_SSL") and self.ssl_context is None:
            raise ValueError(f"security_protocol {self.security_protocol} needs an ssl_context")
        needs_password = self.security_protocol.startswith("SASL") and self.sasl_mechanism in (
            "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"
        )
        if needs_password and (self.sasl_plain_username is None or self.sasl_plain_password is None):
            raise ValueError(f"SASL {self.sasl_mechanism} needs sasl_plain_username and password")
        reserved = {"acks", "bootstrap_servers", "request_timeout_ms", "transactional_id"} & set(self.extra)
        if reserved:
            raise ValueError(f"extra must not set {', '.join(sorted(reserved))}: the relay owns them")
        return self

    def producer_options(self, request_timeout_ms: int) -> dict[str, Any]:
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "acks": "all",
            "request_timeout_ms": request_timeout_ms,
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": (
                self.sasl_plain_password.get_secret_value() if self.sasl_plain_password else None
            ),
            "enable_idempotence": self.enable_idempotence,
            "compression_type": self.compression_type,
            "max_request_size": self.max_request_size,
            "max_batch_size": self.max_batch_size,
            "linger_ms": self.linger_ms,
        }
        options.update(self.extra)
        return options


class RelaySettings(_Settings):
    """Tuning and failure policy of one relay process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    relay_id: str = Field(default_factory=_default_relay_id, min_length=1)
    """Unique among running relays. A restarted relay with the same id takes its slots back at once."""
    batch_size: int = Field(default=1000, gt=0)
    """Messages fetched, sent and acknowledged per round; also the bound on messages in flight."""
    poll_interval: float = Field(default=1.0, gt=0)
    """Longest sleep without a notification (NOTIFY lost, listener connection down)."""
    busy_poll_interval: float = Field(default=0.005, gt=0)
    """Sleep between looks while busy (see `Relay._idle`)."""
    busy_window: float = Field(default=1.0, ge=0)
    """How long after publishing the relay counts as busy."""
    send_timeout: float = Field(default=5.0, gt=0)
    """The producer's request timeout: how long the broker may take to acknowledge."""
    lease_ttl: float = Field(default=30.0, gt=0)
    """A slot lease lasts this long unless renewed; a crashed relay's slots move on after it."""
    max_attempts: int = Field(default=5, gt=0)
    """Refusals by the broker before a message is dead-lettered."""
    retry_backoff: float = Field(default=1.0, ge=0)
    max_retry_backoff: float = Field(default=60.0, ge=0)
    broker_backoff: float = Field(default=0.2, gt=0)
    max_broker_backoff: float = Field(default=5.0, gt=0)
    retention: float | None = Field(default=24 * 3600.0, ge=0)
    """Seconds a published message is kept before pruning; None keeps them."""
    prune_interval: float = Field(default=60.0, gt=0)
    connect_timeout: float = Field(default=60.0, ge=0)
    """How long `start()` waits for PostgreSQL to accept connections (it may be restarting)."""

    @model_validator(mode="after")
    def _lease_outlives_a_round(self) -> RelaySettings:
        if self.lease_ttl < self.send_margin + 2 * self.renew_interval:
            raise ValueError(
                f"lease_ttl {self.lease_ttl}s is too short for send_timeout {self.send_timeout}s: "
                f"it must be at least {self.send_margin + 2 * self.renew_interval:.1f}s"
            )
        return self

    @property
    def send_margin(self) -> float:
        """Lease time a slot must have left before its messages are sent.

        A round waits for metadata (≤ send_timeout), then for acknowledgements (aiokafka expires a
        queued batch after send_timeout and the request after another), so three timeouts bound it.
        """
        return 3 * self.send_timeout + 1.0

    @property
    def renew_interval(self) -> float:
        return self.lease_ttl / 6


@dataclass
class RelayStats:
    published: int = 0
    refused: int = 0
    dead: int = 0
    rounds: int = 0
    broker_errors: int = 0
    database_errors: int = 0
    max_in_flight: int = 0


@dataclass
class _Outcome:
    """What the broker answered in one round, collected from the round's partitions."""

    published: list[int] = field(default_factory=list)
    refused: list[tuple[asyncpg.Record, BaseException]] = field(default_factory=list)
    down: BaseException | None = None
    in_flight: int = 0


class _BrokerDown(Exception):
    """The broker could not be reached; nothing is held against the messages."""


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, KafkaError):
        return bool(exc.retriable) or isinstance(exc, KafkaTimeoutError | ProducerClosed)
    return isinstance(exc, OSError | TimeoutError)


def _refusal(exc: BaseException) -> bool:
    """The broker answered and said no; anything else ends the round as if the broker were down."""
    return isinstance(exc, KafkaError) and not _unreachable(exc)


def _place(row: asyncpg.Record) -> tuple[int, int, int]:
    """A fetched message's place in the log: (log_xid, position, id)."""
    return row["log_xid"], row["position"], row["id"]


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Relay:
    """One relay process. Use as `async with Relay(url, KafkaSettings(...)) as relay:`.

    Several relays may run at once: each takes a fair share of the slots, and a stopped or crashed
    relay's slots move to the others (at once on `stop()`, after `lease_ttl` on a crash).
    """

    def __init__(
        self,
        database_url: str,
        kafka: KafkaSettings | str,
        settings: RelaySettings | None = None,
    ) -> None:
        self.kafka = KafkaSettings(bootstrap_servers=kafka) if isinstance(kafka, str) else kafka
        self.settings = settings or RelaySettings()
        self.relay_id = self.settings.relay_id
        self.stats = RelayStats()
        self._url = asyncpg_dsn(database_url)
        self._pool: asyncpg.Pool | None = None
        self._producer: AIOKafkaProducer | None = None
        self._producer_options = self.kafka.producer_options(
            request_timeout_ms=int(self.settings.send_timeout * 1000)
        )
        self._max_request_size = int(self._producer_options["max_request_size"])
        self._partitioner = DefaultPartitioner()
        self._listener: asyncpg.Connection | None = None
        self._deadlines: dict[int, float] = {}
        self._lease_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._main_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._next_rebalance = 0.0
        self._next_prune = 0.0
        self._marking: asyncio.Task[None] | None = None
        self._prefetch: asyncio.Task[list[asyncpg.Record]] | None = None
        self._marking_ids: list[int] = []
        self._cursor: tuple[int, int, int] | None = None  # (log_xid, position, id) of the last row sent
        self._busy_until = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        async def connect() -> asyncpg.Pool:
            return await asyncpg.create_pool(self._url, min_size=1, max_size=3, max_inactive_connection_lifetime=60)

        # A server that is restarting refuses connections for a while: a relay started meanwhile waits.
        self._pool = await with_retries(connect, patience=self.settings.connect_timeout, what="relay cannot connect")
        try:
            slots = await self._pool.fetchval(sql.COUNT_SLOTS)
            if slots != SLOT_COUNT:
                raise InvalidSettings(f"outbox_slots has {slots} rows, this code expects {SLOT_COUNT}")
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        self._stopping = False
        self._stop_event.clear()
        self._main_task = asyncio.create_task(self._main(), name=f"outbox-relay-{self.relay_id}")
        self._renew_task = asyncio.create_task(self._renew_forever(), name=f"outbox-lease-{self.relay_id}")

    async def stop(self) -> None:
        """Finish the round in progress, hand the slots back, close everything."""
        self._stopping = True
        self._stop_event.set()
        self._wakeup.set()
        for task in (self._main_task, self._renew_task):
            if task is not None:
                if task is self._renew_task:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._main_task = self._renew_task = None
        with contextlib.suppress(Exception):
            await self._settle()
        if self._pool is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                async with self._pool.acquire() as conn, conn.transaction():
                    await conn.execute(sql.RELEASE_ALL_SLOTS, self.relay_id)
                    await conn.execute(sql.UNREGISTER_RELAY, self.relay_id)
        self._deadlines.clear()
        await self._close_producer()
        await self._unlisten()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

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
        self._wakeup.set()

    @property
    def owned_slots(self) -> list[int]:
        return sorted(self._deadlines)

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise NotStarted("Relay is not started")
        return self._pool

    # -- the loop ----------------------------------------------------------------------------------

    async def _main(self) -> None:
        broker_delay = self.settings.broker_backoff
        db_delay = 0.05
        while not self._stopping:
            try:
                now = time.monotonic()
                if now >= self._next_rebalance:
                    await self._settle()  # never release a slot whose batch is still being marked
                    await self._rebalance()
                    self._next_rebalance = now + self.settings.renew_interval
                if self.settings.retention is not None and now >= self._next_prune:
                    await prune_published(self.pool, self.settings.retention)
                    self._next_prune = now + self.settings.prune_interval
                sent = await self._round()
                broker_delay = self.settings.broker_backoff
                db_delay = 0.05
                if sent:
                    self._busy_until = time.monotonic() + self.settings.busy_window
                else:
                    await self._idle()
            except _BrokerDown as exc:
                self.stats.broker_errors += 1
                log.warning("broker unavailable (%s); retrying in %.1fs", exc, broker_delay)
                await self._close_producer()
                await self._sleep(broker_delay)
                broker_delay = min(broker_delay * 2, self.settings.max_broker_backoff)
            except _DATABASE_ERRORS as exc:
                self.stats.database_errors += 1
                log.warning("database unavailable (%s); retrying in %.2fs", exc, db_delay)
                await self._sleep(db_delay)
                db_delay = min(db_delay * 2, 2.0)
            except Exception:
                log.exception("relay round failed; retrying in %.1fs", self.settings.max_broker_backoff)
                await self._sleep(self.settings.max_broker_backoff)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    async def _idle(self) -> None:
        """Sleep until a NOTIFY, the poll interval, or the next lease check, whichever comes first.

        For `busy_window` after publishing it sleeps `busy_poll_interval` instead, whatever arrives:
        while messages keep coming, a NOTIFY per commit would only cost a query each, and a writer
        whose connection pool is saturated sends its NOTIFY late anyway (it waits for a connection).
        """
        now = time.monotonic()
        if now < self._busy_until:
            await self._sleep(self.settings.busy_poll_interval)
            return
        await self._listen()
        timeout = min(self.settings.poll_interval, max(self._next_rebalance - now, 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _usable_slots(self) -> list[int]:
        """Slots whose lease outlasts a whole round, so no send can outlive the lease."""
        horizon = time.monotonic() + self.settings.send_margin
        return [slot for slot, deadline in self._deadlines.items() if deadline > horizon]

    async def _fetch(self, slots: list[int]) -> list[asyncpg.Record]:
        if self._cursor is not None:
            return await self._fetch_after(slots, self._cursor)
        return list(await self.pool.fetch(sql.FETCH_PENDING, slots, self.settings.batch_size, self._marking_ids))

    async def _fetch_after(self, slots: list[int], after: tuple[int, int, int]) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(sql.FETCH_PENDING_AFTER, slots, self.settings.batch_size, *after))

    async def _round(self) -> int:
        """Fetch, send and await acknowledgements for one batch; return how many messages went out.

        Marking a batch published overlaps the next round, whose fetch leaves that batch out
        (acknowledged, not yet marked: it must not be sent twice). While a backlog drains (full
        batches, all published) fetches continue after the last message in log order instead of from
        the first pending one, which would wade through the index entries of everything just marked;
        and the next batch is fetched while this one is sent (nothing of it is sent before this one's
        acknowledgements are in). Skipping ahead is safe because fetches only see messages below the
        log's visibility line, under which nothing new can appear. A round that is not full, or leaves
        a row behind (a held key, a lapsing lease, a refusal, a failed send), ends both: the next fetch
        starts from the first pending message again, so the row left behind goes first.
        """
        slots = self._usable_slots()
        if not slots:
            await self._settle()
            return 0
        self._wakeup.clear()
        if self._prefetch is not None:
            prefetch, self._prefetch = self._prefetch, None
            rows = await prefetch
        else:
            rows = await self._fetch(slots)
        self._cursor = None
        if not rows:
            return 0
        self.stats.rounds += 1
        producer = await self._ensure_producer()
        usable = set(self._usable_slots())
        held: set[str] = set()  # keys whose later messages must wait for an earlier one
        queued: list[asyncpg.Record] = []
        for row in rows:
            slot, key, attempts = row[1], row[3], row[13]
            if slot not in usable or key in held:
                continue
            if attempts:
                # A retry goes out alone for its key: should it fail again, nothing of the key overtook it.
                held.add(key)
            queued.append(row)
        full = len(queued) == len(rows) == self.settings.batch_size
        if full:
            self._prefetch = asyncio.create_task(self._fetch_after(slots, _place(rows[-1])))
        outcome = _Outcome()
        try:
            partitions = await self._by_partition(producer, queued, outcome)
            await asyncio.gather(*(
                self._send_rows(producer, topic, partition, part, set(), outcome)
                for (topic, partition), part in partitions.items()
            ))
            await self._settle_marking()  # at most one batch being marked at a time
            if outcome.published:
                self._marking = asyncio.create_task(self._mark_published(outcome.published))
                self._marking_ids = outcome.published
            if outcome.refused:
                await self._record_refusals(outcome.refused)
        except Exception:
            await self._drop_prefetch()  # it skips rows of this round that may still be pending
            raise
        if full and len(outcome.published) == len(rows):
            self._cursor = _place(rows[-1])
        else:
            await self._drop_prefetch()
        if outcome.down is not None:
            await self._settle_marking()
            raise _BrokerDown(_describe(outcome.down)) from outcome.down
        return len(outcome.published) + len(outcome.refused)

    async def _by_partition(
        self, producer: AIOKafkaProducer, rows: list[asyncpg.Record], outcome: _Outcome
    ) -> dict[tuple[str, int], list[asyncpg.Record]]:
        """Rows by the partition the producer's partitioner picks for their key, in outbox order."""
        partitions: dict[str, list[int] | BaseException] = {}
        for topic in dict.fromkeys(row[2] for row in rows):
            try:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            except KafkaError as exc:
                if not _refusal(exc):
                    outcome.down = exc
                    return {}
                partitions[topic] = exc
        chosen: dict[tuple[str, str], int] = {}
        groups: dict[tuple[str, int], list[asyncpg.Record]] = {}
        refused_keys: set[str] = set()
        for row in rows:
            topic, key = row[2], row[3]
            candidates = partitions[topic]
            if isinstance(candidates, BaseException):  # refused for the whole topic (not authorized, ...)
                if key not in refused_keys:
                    refused_keys.add(key)
                    outcome.refused.append((row, candidates))
                continue
            partition = chosen.get((topic, key))
            if partition is None:
                partition = chosen[topic, key] = self._partitioner(key.encode(), candidates, candidates)
            groups.setdefault((topic, partition), []).append(row)
        return groups

    async def _send_rows(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partition: int,
        rows: Sequence[asyncpg.Record],
        held: set[str],
        outcome: _Outcome,
    ) -> bool:
        """Send one partition's rows as record batches, each only once the one before is acknowledged.

        Returns False when the partition must stop for this round: the broker is unreachable, or it
        refused a batch and splitting it found the message it objects to (one such search per
        partition and round; the next round goes on without that message, which waits out its backoff).
        """
        start = 0
        while start < len(rows):
            if outcome.down is not None:
                return False
            batch, members, start = self._fill(producer, rows, start, held, outcome)
            if not members:
                continue
            failure = await self._send_batch(producer, topic, partition, batch, members, outcome)
            if failure is None:
                outcome.published.extend(row[0] for row in members)
            elif not _refusal(failure):
                outcome.down = outcome.down or failure
                return False
            elif len(members) == 1:
                outcome.refused.append((members[0], failure))
                held.add(members[0][3])
                return False
            else:
                # Which message does the broker object to (if not to the batch as a whole)? Its halves
                # go again, in order, until a single message is refused; the others are published.
                half = len(members) // 2
                for part in (members[:half], members[half:]):
                    if not await self._send_rows(producer, topic, partition, part, held, outcome):
                        return False
        return True

    def _fill(
        self,
        producer: AIOKafkaProducer,
        rows: Sequence[asyncpg.Record],
        start: int,
        held: set[str],
        outcome: _Outcome,
    ) -> tuple[Any, list[asyncpg.Record], int]:
        """A record batch of the rows from `start` on that fit, and the index of the first row left."""
        batch = producer.create_batch()
        members: list[asyncpg.Record] = []
        horizon = time.monotonic() + self.settings.send_margin
        index = start
        while index < len(rows):
            row = rows[index]
            (_id, slot, _topic, key, data, event_id, event_type, source, stream_id, stream_version,
             correlation_id, causation_id, time_text, attempts) = row[:14]
            if key in held:
                index += 1
                continue
            if self._deadlines.get(slot, 0.0) <= horizon:  # the lease might lapse while this batch is out
                held.add(key)
                index += 1
                continue
            if attempts and members:
                break  # a retry goes in a batch of its own
            key_bytes, value = key.encode(), data.encode()
            headers = kafka_headers(
                id=event_id, type=event_type, source=source, time=time_text, subject=stream_id,
                correlation_id=correlation_id, causation_id=causation_id, stream_version=stream_version,
            )
            size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key_bytes, value, headers)
            if size > self._max_request_size:
                outcome.refused.append((row, MessageSizeTooLargeError(
                    f"the message is {size} bytes, more than max_request_size {self._max_request_size}"
                )))
                held.add(key)
                index += 1
                continue
            if batch.append(key=key_bytes, value=value, timestamp=None, headers=headers) is None:
                if members:
                    break  # full: the row starts the next batch
                outcome.refused.append((row, MessageSizeTooLargeError(
                    f"the message is {size} bytes, more than fits in a record batch"
                )))
                held.add(key)
                batch = producer.create_batch()  # a refused append closes the batch
                index += 1
                continue
            members.append(row)
            index += 1
            if attempts:
                break
        return batch, members, index

    async def _send_batch(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        partition: int,
        batch: Any,
        members: Sequence[asyncpg.Record],
        outcome: _Outcome,
    ) -> BaseException | None:
        """Send a record batch and await the broker's answer; return why it failed, if it did."""
        count = len(members)
        outcome.in_flight += count
        self.stats.max_in_flight = max(self.stats.max_in_flight, outcome.in_flight)
        try:
            await (await producer.send_batch(batch, topic, partition=partition))
        except Exception as exc:
            return exc
        finally:
            outcome.in_flight -= count
        return None

    async def _mark_published(self, ids: list[int]) -> None:
        await self._persist(sql.MARK_PUBLISHED, ids, self.relay_id)
        self.stats.published += len(ids)

    async def _settle_marking(self) -> None:
        """Wait for the batch being marked published (if it fails, its rows are sent again later)."""
        task, self._marking = self._marking, None
        try:
            if task is not None:
                await task
        finally:
            self._marking_ids = []

    async def _drop_prefetch(self) -> None:
        prefetch, self._prefetch = self._prefetch, None
        if prefetch is not None:
            with contextlib.suppress(Exception):
                await prefetch

    async def _settle(self) -> None:
        """Nothing in the air: no prefetched batch, no batch being marked; fetch from the start."""
        self._cursor = None
        await self._drop_prefetch()
        await self._settle_marking()

    async def _persist(self, statement: str, *args: Any) -> list[asyncpg.Record]:
        """Record what the broker answered, retrying on a fresh connection if this one was lost.

        Giving up here would not lose messages, but would publish them all again: worth a retry.
        """
        deadline = time.monotonic() + self.settings.send_margin
        delay = 0.05
        while True:
            try:
                return list(await self.pool.fetch(statement, *args))
            except CONNECTION_ERRORS as exc:
                if time.monotonic() + delay > deadline:
                    raise
                self.stats.database_errors += 1
                log.warning("cannot record the broker's answer (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _record_refusals(self, refused: Sequence[tuple[asyncpg.Record, BaseException]]) -> None:
        s = self.settings
        delays = [
            min(s.retry_backoff * 2 ** row["attempts"], s.max_retry_backoff) for row, _ in refused
        ]
        rows = await self._persist(
            sql.RECORD_FAILURES,
            [row[0] for row, _ in refused],
            [_describe(exc) for _, exc in refused],
            delays,
            s.max_attempts,
        )
        dead = sum(1 for r in rows if r[1])
        self.stats.refused += len(refused)
        self.stats.dead += dead
        for row, exc in refused:
            log.warning("broker refused outbox message %s (key %r, attempt %d): %s",
                        row[0], row[3], row["attempts"] + 1, _describe(exc))
        if dead:
            log.error("%d outbox message(s) moved to the dead-letter state", dead)

    # -- producer ----------------------------------------------------------------------------------

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(**self._producer_options)
        try:
            await producer.start()
        except KafkaError as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise _BrokerDown(_describe(exc)) from exc
        self._producer = producer
        return producer

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 2 * self.settings.send_timeout)

    # -- leases ------------------------------------------------------------------------------------

    async def _rebalance(self) -> None:
        """Heartbeat, renew, then move towards a fair share: ceil(slots / live relays).

        Runs between rounds only, so a slot is never released while its messages are in flight.
        """
        ttl = self.settings.lease_ttl
        async with self._lease_lock:
            started = time.monotonic()
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(sql.HEARTBEAT, self.relay_id, ttl)
                await conn.execute(sql.FORGET_EXPIRED_RELAYS)
                live = int(await conn.fetchval(sql.LIVE_RELAYS))
                owned = {r[0] for r in await conn.fetch(sql.RENEW_LEASES, self.relay_id, ttl)}
                share = math.ceil(SLOT_COUNT / max(live, 1))
                if len(owned) > share:
                    extra = sorted(owned)[share:]
                    await conn.execute(sql.RELEASE_SLOTS, self.relay_id, extra)
                    owned -= set(extra)
                elif len(owned) < share:
                    gained = await conn.fetch(sql.ACQUIRE_SLOTS, self.relay_id, ttl, share - len(owned))
                    owned |= {r[0] for r in gained}
            self._deadlines = dict.fromkeys(owned, started + ttl)

    async def _renew(self) -> None:
        ttl = self.settings.lease_ttl
        async with self._lease_lock:
            started = time.monotonic()
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(sql.HEARTBEAT, self.relay_id, ttl)
                renewed = {r[0] for r in await conn.fetch(sql.RENEW_LEASES, self.relay_id, ttl)}
            lost = set(self._deadlines) - renewed
            if lost:
                log.warning("lost the lease of slot(s) %s to another relay", sorted(lost))
            self._deadlines = dict.fromkeys(renewed, started + ttl)

    async def _renew_forever(self) -> None:
        """Keeps leases alive independently of the rounds, which may be slow while the broker is down."""
        while True:
            await asyncio.sleep(self.settings.renew_interval)
            try:
                await self._renew()
            except _DATABASE_ERRORS as exc:
                log.warning("cannot renew slot leases (%s); they lapse unless renewed in time", exc)
            except Exception:
                log.exception("lease renewal failed")

    # -- notifications -----------------------------------------------------------------------------

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        await self._unlisten()
        try:
            conn = await asyncpg.connect(self._url, timeout=self.settings.poll_interval + 1)
            await conn.add_listener(store_sql.NOTIFY_CHANNEL, self._on_notify)
            await conn.add_listener(sql.NOTIFY_CHANNEL, self._on_notify)
        except _LISTEN_ERRORS as exc:
            log.debug("relay cannot listen (%s); polling every %ss", exc, self.settings.poll_interval)
            return
        self._listener = conn

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
