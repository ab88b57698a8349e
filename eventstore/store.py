"""The PostgreSQL event store: appends with optimistic concurrency, stream reads, the global log."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import hashlib
import itertools
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any, TypeVar
from uuid import UUID

import asyncpg
import orjson

from eventstore import sql, telemetry
from eventstore.errors import (
    AppendConditionFailed,
    AppendRefused,
    AppendTimedOut,
    DatabaseUnavailable,
    DuplicateEventId,
    EventSerializationError,
    EventTooLarge,
    InvalidAppend,
    InvalidArgument,
    NotStarted,
    SchemaNotMigrated,
    StreamArchived,
    StreamTombstoned,
    SubjectForgotten,
    UnknownSubject,
    WrongExpectedVersion,
)
from eventstore.model import (
    MAX_BIGINT,
    START,
    TAGS,
    AppendResult,
    Checkpoint,
    Direction,
    EventPayload,
    ExpectedVersion,
    NewEvent,
    RecordedEvent,
    StreamState,
    check_int,
    check_seconds,
    check_text,
    check_types,
    fetch_events,
    storable_text,
)
from eventstore.personal import (
    PERSONAL_DATA,
    KeyProvider,
    Keyring,
    check_personal_data,
    check_subject,
    has_personal_data,
    marker,
)
from eventstore.query import Condition, Query, branches, check_tags, lock_plan
from eventstore.retry import Backoff, with_retries
from eventstore.schema import MAX_EVENT_TYPE_LENGTH
from eventstore.sql import MAX_STREAM_ID_LENGTH
from eventstore.subscription import Subscription

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_EVENT_SIZE = 1024 * 1024
# JSON text that PostgreSQL's jsonb refuses: the escaped NUL character.
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")

_REFUSED_FOR_GOOD: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidPasswordError,
)
"""Connection errors that waiting will not cure: no such database, wrong credentials."""

# What PostgreSQL says of text that is not JSON it can store (a bad orjson.Fragment).
_JSON_REFUSED: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InvalidTextRepresentationError,
    asyncpg.exceptions.UntranslatableCharacterError,
    asyncpg.exceptions.CharacterNotInRepertoireError,
)

_GAVE_UP: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout, pg_cancel_backend
)
"""What the server says when it gives up on a statement (`AppendTimedOut`)."""

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
"""A connection as handed out by asyncpg, pooled or not."""

AppendHook = Callable[["UnitOfWork", AppendResult], Awaitable[None]]

NOTIFY_INTERVAL = 0.005
"""Seconds between two NOTIFYs at most: the first of a burst goes out at once, the rest are coalesced."""

BATCHED_EVENTS = 100
"""Appends of up to this many events (and `BATCHED_BYTES`) may go in a batch (`EventStore(append_lanes=)`);
larger ones always go alone, so that no small append waits behind them."""

BATCHED_BYTES = 256 * 1024

BATCH_EVENTS = 1000
"""Events in one batch at most (and `BATCH_BYTES` of JSON, `BATCH_APPENDS` appends); the rest wait for the next."""

BATCH_APPENDS = 64
"""Each append of a batch runs in a subtransaction that writes: PostgreSQL caches 64 subtransaction ids
per transaction, and more would slow every other session's snapshots while the batch runs."""

BATCH_BYTES = 1024 * 1024

LANE_PATIENCE = 0.025
"""Seconds an append sent alone keeps its lane (`EventStore(append_lanes=)`); a slower one (it waits
for a lock) goes on outside the lanes, the appends waiting for a batch go out without it, and the next
appends to its stream go alone. In a batch, an append stops waiting for locks once the batch has taken
`sql.APPEND_BATCH_LOCK_BUDGET_MS`."""

_ALONE = object()
"""What a waiting append gets when no batch writes it (a batch of one, another append to its stream in the
batch, the batch failed or had no time left for it): it is sent alone, and meets its own error there."""

_ALONE_LOCKED = object()
"""`_ALONE` for an append that gave up waiting for a lock in a batch: its stream counts as stuck (see
`EventStore._stuck`) while it is sent alone."""


@dataclass(slots=True)
class _Queued:
    """An append waiting for the next batch; its future gets the status row, or `_ALONE`."""

    prepared: _Prepared
    future: asyncio.Future[Any]


SPARE_IDLE = 0.05
"""Seconds the store keeps a spare connection (see `EventStore._own_connection`) unused before handing
it back to the pool."""

STALE_AFTER = 10_000
"""Rows changed since the last ANALYZE below which `EventStore.refresh_statistics` never analyzes: a
planner misled about fewer rows than this costs a page a few milliseconds at most."""

# Set while a connection of the store's own pool runs only the store's own statements, which leave no
# session state behind: releasing it then skips asyncpg's reset query (a round trip per release).
_SESSION_UNTOUCHED: contextvars.ContextVar[bool] = contextvars.ContextVar("eventstore_session_untouched", default=False)


async def _reset_session(conn: asyncpg.Connection) -> None:
    """The pool's reset: asyncpg's own (UNLISTEN, RESET ALL, ...) unless the store vouches for the session."""
    if not _SESSION_UNTOUCHED.get():
        await conn.execute(conn.get_reset_query())
"""Called inside the append's transaction, after the events are written (outbox, inline projections)."""


def asyncpg_dsn(url: str) -> str:
    """Accept SQLAlchemy-style URLs (`postgresql+asyncpg://`) as well as plain libpq ones."""
    return re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", url)


@dataclass(frozen=True, slots=True)
class _Prepared:
    stream_id: str
    expected: int
    event_ids: list[UUID]
    types: list[str]
    data: list[str]
    metadata: list[str]
    tags: list[tuple[str, ...]]
    personal: list[dict[str, str] | None] | None = None  # per event: its personal fields and their subjects
    plain: list[str] | None = None  # the data as given, once `data` holds the sealed text
    size: int = 0  # bytes of JSON, data and metadata

    @property
    def tagged(self) -> bool:
        return any(self.tags)


SUBJECT_FORGOTTEN = "$SubjectForgotten"
"""The event `EventStore.forget` records (data: {"subject": ...}): handle it to scrub read models."""


def record_stream(prefix: str, of: str) -> str:
    """The store's own stream `<prefix>-<of>` recording something of `of` (a subject, a stream), or
    `<prefix>#<sha256 of it>` when `of` is too long to take the prefix: no id of the first form can be
    one of the second."""
    if len(of) < MAX_STREAM_ID_LENGTH - len(prefix):
        return f"{prefix}-{of}"
    return f"{prefix}#{hashlib.sha256(of.encode()).hexdigest()}"


def erasure_stream(subject: str) -> str:
    """The stream recording that a subject was forgotten."""
    return record_stream("$personal", subject)


@dataclass(frozen=True, slots=True)
class Erasure:
    """What `forget` did: whether the key was deleted now (not before) and how many snapshots went."""

    subject: str
    forgotten_now: bool
    snapshots_dropped: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    stream_id: str
    snapshot_type: str
    schema_version: str
    stream_version: int
    data: str
    created_at: datetime


# The statements select the columns in RecordedEvent's field order.
_MAX_LABEL = 1000
"""Longest snapshot type accepted (the column has no limit; a type name is far shorter)."""



def check_stream_id(stream_id: object, error: type[InvalidArgument] = InvalidArgument) -> str:
    return check_text("stream id", stream_id, MAX_STREAM_ID_LENGTH, error)


def _expected_number(expected: ExpectedVersion) -> int:
    if isinstance(expected, StreamState):
        return expected.value
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise InvalidAppend(f"expected version must be an int or a StreamState, got {expected!r}")
    if expected < 0:
        raise InvalidAppend(f"expected version must not be negative, got {expected}")
    if expected > MAX_BIGINT:
        raise InvalidAppend(f"expected version must fit in 64 bits (at most {MAX_BIGINT}), got {expected}")
    return expected


def has_non_finite(value: Any) -> bool:
    """Whether a NaN or an infinity hides in `value` (orjson would write it as null)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(has_non_finite(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(has_non_finite(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False


def dump_json(value: Any) -> bytes:
    """JSON for a jsonb column, or `ValueError` saying why PostgreSQL could not store it as given.

    JSON has no NaN or infinity: orjson writes them as null, which would change the data silently.
    """
    try:
        text = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise ValueError(str(exc)) from None
    if b"null" in text and has_non_finite(value):  # substring test first: most data has no null at all
        raise ValueError("NaN and infinity are not JSON")
    if b"\\u0000" in text and _JSON_NUL.search(text):  # substring test first: the regex is slow
        raise ValueError("PostgreSQL cannot store the NUL character (\\u0000)")
    return text


def _dump(event_type: str, value: Any) -> bytes:
    try:
        return dump_json(value)
    except ValueError as exc:
        raise EventSerializationError(event_type, str(exc)) from None


def _dump_fast(event_type: str, value: Any) -> bytes:
    """`_dump` for the common case, where the JSON holds neither null nor an escaped NUL to look into."""
    try:
        text = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return _dump(event_type, value)  # raises the typed error
    if b"null" in text or b"\\u0000" in text:
        return _dump(event_type, value)
    return text


def _closed(conn: Connection) -> bool:
    """Whether a pooled connection is closed, or already taken back by the pool (asyncpg detaches the
    proxy of a connection whose server session ended, and then refuses every call on it)."""
    try:
        return conn.is_closed()
    except asyncpg.exceptions.InterfaceError:
        return True


def _refusal(exc: BaseException) -> bool:
    return getattr(exc, "sqlstate", None) == sql.APPEND_REFUSED


def prepare_append(
    stream_id: str, events: Sequence[NewEvent], expected_version: ExpectedVersion, max_event_size: int
) -> _Prepared:
    """Validate and serialize everything before touching the database, so bad input changes nothing."""
    check_stream_id(stream_id, InvalidAppend)
    expected = _expected_number(expected_version)
    if isinstance(events, NewEvent) or not isinstance(events, Sequence):
        raise InvalidAppend("events must be a sequence of NewEvent")
    if not events:
        raise InvalidAppend("events must not be empty")
    ids: list[UUID] = []
    types: list[str] = []
    data: list[str] = []
    metadata: list[str] = []
    tags: list[tuple[str, ...]] = []
    personal: list[dict[str, str] | None] = []
    checked: set[str] = set()  # event types already checked in this append
    total = 0
    traced = telemetry.tracing()  # the trace context goes into every event's metadata
    for event in events:
        if not isinstance(event, NewEvent):
            raise InvalidAppend(f"events must be NewEvent instances, got {type(event).__name__}")
        event_type = event.type
        if event_type not in checked:
            check_text("event type", event_type, MAX_EVENT_TYPE_LENGTH, InvalidAppend)
            checked.add(event_type)
        if not isinstance(event.event_id, UUID):
            raise InvalidAppend(f"event id must be a UUID, got {event.event_id!r}")
        if event.metadata and TAGS in event.metadata:
            raise InvalidAppend(f"metadata key {TAGS!r} is reserved for the event's tags: pass NewEvent(tags=...)")
        if event.metadata and PERSONAL_DATA in event.metadata:
            raise InvalidAppend(
                f"metadata key {PERSONAL_DATA!r} is reserved for sealed fields: pass NewEvent(personal_data=...)"
            )
        event_tags = check_tags(event.tags, InvalidAppend)  # read once: it may be an iterator
        tags.append(event_tags)
        body = _dump_fast(event_type, event.data)
        fields = check_personal_data(event.personal_data)
        personal.append(fields)
        if (
            event.metadata or event.correlation_id is not None or event.causation_id is not None
            or event_tags or fields is not None or traced
        ):
            meta_dict = event.metadata_with_ids(event_tags)
            if fields is not None:
                meta_dict[PERSONAL_DATA] = marker(fields)
            meta = _dump_fast(event_type, meta_dict)
        else:
            meta = b"{}"
        size = len(body) + len(meta)
        if size > max_event_size:
            raise EventTooLarge(event_type, size, max_event_size)
        total += size
        ids.append(event.event_id)
        types.append(event_type)
        try:
            data.append(body.decode())
            metadata.append(meta.decode())
        except UnicodeDecodeError as exc:  # pre-serialized data (orjson.Fragment) that is not UTF-8
            raise EventSerializationError(event_type, f"not UTF-8: {exc}") from None
    if len(set(ids)) != len(ids):
        raise InvalidAppend("event ids must be unique within one append")
    has_personal = any(p is not None for p in personal)
    return _Prepared(
        stream_id, expected, ids, types, data, metadata, tags, personal if has_personal else None, size=total
    )


class _ConcurrentDuplicate(DuplicateEventId):
    """A concurrent transaction committed one of these event ids while this one was writing."""


class UnitOfWork:
    """One PostgreSQL transaction in which an application appends to streams and writes its own tables.

    Append hooks (outbox, inline projections) run inside the same transaction, so they commit or roll
    back together with the events.
    """

    counts_at_commit = True
    """Its appends' events count as written (`eventstore.appended_events`) when the unit of work commits."""

    def __init__(self, store: EventStore, connection: Connection) -> None:
        self._store = store
        self.connection = connection
        self.results: list[AppendResult] = []

    @telemetry.instrumented_append
    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: ExpectedVersion = StreamState.ANY,
        *,
        condition: Condition | tuple[Query, Checkpoint] | None = None,
    ) -> AppendResult:
        prepared = prepare_append(stream_id, events, expected_version, self._store.max_event_size)
        checked = _condition(condition)
        prepared = await self._store._seal(self.connection, prepared)
        if self._store._hooks:
            # In a savepoint: a hook that fails (an inline projection's handler) takes this append's events
            # back with it, so the unit of work cannot go on to commit them without their read models.
            async with self.connection.transaction():
                result = await self._store._append_prepared(self, prepared, expected_version, checked)
        else:
            result = await self._store._append_prepared(self, prepared, expected_version, checked)
        self.results.append(result)
        return result

    async def read_query(self, query: Query, after: Checkpoint = START, *, limit: int = 1000) -> list[RecordedEvent]:
        """`EventStore.read_query` inside this transaction."""
        rows = await fetch_events(self.connection, sql.CALL_READ_QUERY, *_query_args(query, after, limit))
        return await self._store.reveal(rows, self.connection)

    async def read_stream(
        self, stream_id: str, from_version: int = 0, limit: int | None = None
    ) -> list[RecordedEvent]:
        last = limit if limit is not None else MAX_BIGINT
        rows = await fetch_events(self.connection, sql.READ_STREAM_FORWARDS, stream_id, from_version, last)
        return await self._store.reveal(rows, self.connection)

    async def save_snapshot(
        self, stream_id: str, snapshot_type: str, schema_version: str, stream_version: int, data: str
    ) -> None:
        """Store the latest snapshot of a stream in this transaction; an older one never replaces a newer one.

        In a savepoint of its own: should it fail, the unit of work goes on without it.
        """
        check_stream_id(stream_id)
        async with self.connection.transaction():
            await _save_snapshot(self.connection, stream_id, snapshot_type, schema_version, stream_version, data)


class EventStore:
    """Async event store on PostgreSQL. Use as `async with EventStore(url) as store:`.

    Appends made outside a unit of work are retried after a lost connection: event ids make the retry
    idempotent, so a commit whose acknowledgement was lost is not written twice.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: asyncpg.Pool | None = None,
        min_connections: int = 1,
        max_connections: int = 10,
        max_event_size: int = DEFAULT_MAX_EVENT_SIZE,
        retry_for: float = 15.0,
        connect_timeout: float | None = None,
        notify: bool = True,
        check_schema: bool = True,
        keys: KeyProvider | None = None,
        append_lanes: int = 4,
    ) -> None:
        if url is None and pool is None:
            raise InvalidArgument("EventStore needs a database url or an asyncpg pool")
        if isinstance(append_lanes, bool) or not isinstance(append_lanes, int) or append_lanes < 0:
            raise InvalidArgument(f"append_lanes must be an int >= 0, got {append_lanes!r}")
        self.url = asyncpg_dsn(url) if url is not None else None
        self._pool = pool
        self._owns_pool = pool is None
        self._min = min_connections
        self._max = max_connections
        self.max_event_size = max_event_size
        self.retry_for = retry_for
        self.connect_timeout = retry_for if connect_timeout is None else connect_timeout
        self._notify = notify
        self._check_schema = check_schema
        self.keyring = Keyring(keys)
        """Seals personal data on append and opens it on read (`eventstore.personal`)."""
        self._hooks: list[AppendHook] = []
        self._notify_pending = False
        self._notify_task: asyncio.Task[None] | None = None
        self._notifier: asyncpg.Connection | None = None
        self._stopping = False
        self._busy = 0
        """Calls under way (`_working`), which `stop` lets finish."""
        self._idle = asyncio.Event()
        self._spares: list[tuple[asyncpg.pool.PoolConnectionProxy, float]] = []
        """Connections kept out of the pool for the store's own next statements (`_own_connection`)."""
        self._spare_timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()
        self._lanes = append_lanes
        """Appends outside units of work in flight at once before the next ones wait and go as one batch."""
        self._batching = False
        """Whether the database has the batch append (it is checked at start)."""
        self._lanes_busy = 0
        self._queue: collections.deque[_Queued] = collections.deque()
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._batch_counts = collections.Counter[str]()
        """Batches "sent" and "failed" (all their appends went alone), their "failed appends" and "late
        appends" (went alone), for tests and debugging."""
        self._stuck = collections.Counter[str]()
        """Streams an append sent alone is waiting on past `LANE_PATIENCE`, or an append that gave up waiting
        for a lock in a batch is sent alone to (a lock held elsewhere): their appends skip batches."""

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._pool is None:
            url = self.url
            assert url is not None

            async def connect() -> asyncpg.Pool:
                return await asyncpg.create_pool(
                    url, min_size=self._min, max_size=self._max, max_inactive_connection_lifetime=60,
                    reset=_reset_session,
                )

            # A server that is restarting refuses connections for a while: wait up to connect_timeout.
            try:
                self._pool = await with_retries(connect, patience=self.connect_timeout, what="cannot connect")
            except _REFUSED_FOR_GOOD as exc:
                raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {exc}") from None
        self._stopping = False
        # Unchecked, the batch append is assumed; a database without it (not yet migrated to revision
        # 0019) turns batching off at the first batch, whose appends then go one by one.
        self._batching = self._lanes > 0
        if self._check_schema:
            try:
                async with self.pool.acquire() as conn:
                    if not await conn.fetchval(sql.SCHEMA_PRESENT):
                        raise SchemaNotMigrated(None, "head")
                    await self.keyring.check(conn)
                    if self._batching:
                        self._batching = bool(await conn.fetchval(sql.APPEND_BATCH_PRESENT))
            except BaseException:
                await self.stop()  # a store that failed to start holds no connections
                raise

    async def stop(self) -> None:
        """Take no new work, let the calls under way finish, then close the connections.

        A call that starts meanwhile raises `NotStarted`; closing the pool under calls still running
        failed them with the driver's errors (a closed connection in the middle of a statement).
        """
        self._stopping = True  # appends finishing meanwhile schedule no NOTIFY on a connection of their own
        if self._busy:
            self._idle.clear()
            await self._idle.wait()
        await self._return_spares()
        await self._close_notifier()
        if self._pool is not None and self._owns_pool:
            await self._pool.close()
            self._pool = None
        await self._close_notifier()  # one a NOTIFY task still running as the pool closed may have opened

    async def _close_notifier(self) -> None:
        if self._notify_task is not None:
            with contextlib.suppress(Exception):
                await self._notify_task
        if self._notifier is not None:
            notifier, self._notifier = self._notifier, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(notifier.close(), 2)

    async def __aenter__(self) -> EventStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise NotStarted("EventStore is not started: use `async with EventStore(...)`")
        return self._pool

    def _begin_work(self) -> None:
        """Count a call the store's `stop` waits for; none starts once it is stopping."""
        if self._stopping:
            raise NotStarted("the event store is stopping: it takes no new calls")
        self._busy += 1

    def _end_work(self) -> None:
        self._busy -= 1
        if not self._busy:
            self._idle.set()

    @contextlib.asynccontextmanager
    async def _working(self) -> AsyncIterator[None]:
        self._begin_work()
        try:
            yield
        finally:
            self._end_work()

    @contextlib.asynccontextmanager
    async def _own_connection(self, *, counted: bool = True) -> AsyncIterator[Connection]:
        """A pooled connection for the store's own statements only (no session state to reset after).

        One that served a call without error stays out of the pool as a spare for the next call:
        asyncpg's `release` shields a task, three turns of the event loop that cost about a quarter of a
        one-event append's client CPU. There are as many spares as calls ran at once, never the pool's
        last free connection (one is kept only while the pool has another free or can open one). A
        spare goes back to the pool after `SPARE_IDLE` seconds unused, at `stop()`, and whenever a call
        on it fails (the pool then resets or replaces it). A call under way for `stop` (`_working`, inline:
        this is every append's path), unless not `counted` (for a call that `_working` counts already).
        """
        if counted:
            self._begin_work()
        try:
            spares = self._spares
            conn = None
            while spares and conn is None:
                conn = spares.pop()[0]
                if _closed(conn):  # its server session ended while it waited: the pool replaces it
                    await self._release(conn)
                    conn = None
            if conn is None:
                conn = await self.pool.acquire()
            try:
                yield conn
            except BaseException:
                await self._release(conn)
                raise
            pool = self.pool
            if (
                _closed(conn) or conn.is_in_transaction() or pool.is_closing()
                or (pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size())  # others may wait
            ):
                await self._release(conn)
                return
            loop = asyncio.get_running_loop()
            spares.append((conn, loop.time()))  # in the order of their last use: the oldest first
            if self._spare_timer is None:
                self._spare_timer = loop.call_later(SPARE_IDLE, self._spares_idle)
        finally:
            if counted:
                self._end_work()

    def _spares_idle(self) -> None:
        """Hand back the spares unused for `SPARE_IDLE` seconds; look again when the next one will be."""
        self._spare_timer = None
        loop = asyncio.get_running_loop()
        spares = self._spares
        while spares and loop.time() - spares[0][1] >= SPARE_IDLE:
            task = loop.create_task(self._release(spares.pop(0)[0]))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)
        if spares:
            self._spare_timer = loop.call_later(SPARE_IDLE - (loop.time() - spares[0][1]), self._spares_idle)

    async def _return_spares(self) -> None:
        if self._spare_timer is not None:
            self._spare_timer.cancel()
            self._spare_timer = None
        while self._spares:
            await self._release(self._spares.pop()[0])
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    async def _release(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        token = _SESSION_UNTOUCHED.set(True)
        try:
            await self.pool.release(conn)
        finally:
            _SESSION_UNTOUCHED.reset(token)

    def connection(self) -> contextlib.AbstractAsyncContextManager[Connection]:
        """A pooled connection for statements that leave no session state behind (no SET, LISTEN,
        session advisory locks, open cursors or temporary tables; a transaction is fine).

        It goes back without asyncpg's reset query (a round trip saved) and may stay out of the pool as
        one of the store's spares for the next such call. For anything else use `pool.acquire()`.
        """
        return self._own_connection()

    async def _fetch(self, query: str, *args: object, record_class: type[Any] | None = None) -> list[Any]:
        async with self._own_connection() as conn:
            rows: list[Any] = await conn.fetch(query, *args, record_class=record_class)
            return rows

    async def _fetch_events(self, query: str, *args: object) -> list[RecordedEvent]:
        async with self._own_connection() as conn:
            return await fetch_events(conn, query, *args)

    async def _fetchrow(self, query: str, *args: object) -> Any:
        async with self._own_connection() as conn:
            return await conn.fetchrow(query, *args)

    async def _fetchval(self, query: str, *args: object) -> Any:
        async with self._own_connection() as conn:
            return await conn.fetchval(query, *args)

    def add_append_hook(self, hook: AppendHook) -> None:
        """Run `hook` inside every append's transaction, after the events are written."""
        self._hooks.append(hook)

    @property
    def has_append_hooks(self) -> bool:
        return bool(self._hooks)

    # -- retries -----------------------------------------------------------------------------------

    async def retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run `operation`, retrying it on a fresh connection for `retry_for` seconds after a lost one.

        Only for operations that are safe to repeat (reads, idempotent writes, work whose progress is
        in the database); raises `DatabaseUnavailable` when the time is up.
        """
        return await with_retries(
            operation,
            patience=self.retry_for,
            what="event store",
            give_up=lambda: self._pool is None or self._pool.is_closing(),
        )

    # -- appends -----------------------------------------------------------------------------------

    @telemetry.instrumented_append
    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: ExpectedVersion = StreamState.ANY,
        *,
        condition: Condition | tuple[Query, Checkpoint] | None = None,
    ) -> AppendResult:
        """Append atomically; raise `WrongExpectedVersion` (writing nothing) if the stream moved on.

        With a `condition` (a query and the checkpoint of the read it decided on), raise
        `AppendConditionFailed`, writing nothing, if an event matching the query was appended after
        that checkpoint. See `eventstore.query` for the locks that make this safe without a table lock.
        """
        prepared = prepare_append(stream_id, events, expected_version, self.max_event_size)
        checked = _condition(condition)
        if prepared.personal is not None:
            unsealed = prepared
            prepared = await self.retrying(lambda: self._seal(self.pool, unsealed))

        async def once() -> AppendResult:
            if not self._hooks and prepared.personal is None:
                if checked is None and self._batched(prepared):
                    self._begin_work()
                    try:
                        row = await self._lane_append(prepared)
                        return await self._recorded(None, prepared, expected_version, None, row)
                    finally:
                        self._end_work()
                # One statement is its own transaction: one round trip instead of three.
                async with self._own_connection() as conn:
                    return await self._append_prepared(UnitOfWork(self, conn), prepared, expected_version, checked)
            async with self._working(), self.pool.acquire() as conn:
                uow = UnitOfWork(self, conn)
                try:
                    async with conn.transaction():
                        return await self._append_prepared(uow, prepared, expected_version, checked)
                except asyncpg.PostgresError as exc:
                    if _refusal(exc):  # a rule checked at commit
                        raise AppendRefused(exc.args[0], stream_id) from None
                    raise

        async def attempt() -> AppendResult:
            try:
                return await once()
            except _ConcurrentDuplicate:
                # A concurrent append stored one of these ids first: a second try sees it and decides.
                try:
                    return await once()
                except _ConcurrentDuplicate as exc:  # stored before, with other content or elsewhere
                    raise DuplicateEventId(exc.stream_id, exc.event_ids) from None

        result = await self.retrying(attempt)
        self._schedule_notify()
        return result

    # -- batches of appends ---------------------------------------------------------------------------

    def _batched(self, p: _Prepared) -> bool:
        """Whether the append may wait for a batch: small, untagged (no condition, hook or sealed field)."""
        return self._batching and len(p.event_ids) <= BATCHED_EVENTS and p.size <= BATCHED_BYTES and not p.tagged

    async def _lane_append(self, p: _Prepared) -> Any:
        """The status row of the append: sent alone while fewer than `append_lanes` statements are in
        flight, else in the next batch of the appends that wait (the first lane to finish sends it).

        Every caller waiting for a batch would otherwise hold a connection and a server process of its
        own for a one-row statement and a commit; in one batch they share them, which on a busy machine
        is most of what an append costs. An append the batch did not write (it failed, its time was up,
        or the whole batch failed: a lost connection) is sent alone, and meets its own error there.
        """
        if self._lanes_busy < self._lanes and not self._queue:
            self._lanes_busy += 1
            # An append that waits for a lock held elsewhere (a unit of work on its stream) gives its lane
            # up after `LANE_PATIENCE`: the appends behind it must not wait for that lock too.
            waited: list[str] = []
            timer = asyncio.get_running_loop().call_later(LANE_PATIENCE, self._lane_given_up, waited, p.stream_id)
            try:
                async with self._own_connection(counted=False) as conn:
                    return await self._write(conn, p, None)
            finally:
                timer.cancel()
                if waited:
                    self._unstuck(p.stream_id)
                else:
                    self._lane_freed()
        # A caller that gives up (a timeout) before its batch is sent leaves it out; once the batch is sent,
        # its append may be written, as an append whose own statement was sent may be. Cancelling the
        # batch instead would leave the others not knowing whether it had committed.
        item = _Queued(p, asyncio.get_running_loop().create_future())
        self._queue.append(item)
        row = await item.future
        if row is not _ALONE and row is not _ALONE_LOCKED:
            return row
        locked = row is _ALONE_LOCKED
        if locked:
            self._stuck[p.stream_id] += 1
        try:
            async with self._own_connection(counted=False) as conn:
                return await self._write(conn, p, None)
        finally:
            if locked:
                self._unstuck(p.stream_id)

    def _unstuck(self, stream_id: str) -> None:
        self._stuck[stream_id] -= 1
        if not self._stuck[stream_id]:
            del self._stuck[stream_id]

    def _lane_given_up(self, waited: list[str], stream_id: str) -> None:
        waited.append(stream_id)
        self._stuck[stream_id] += 1
        self._lane_freed()

    def _lane_freed(self) -> None:
        """A lane's statement is done: the appends waiting go out on it at once, or the lane is free.

        Synchronous, so that no append joins the queue between the look at it and the lane's release.
        """
        if self._queue:
            task = asyncio.get_running_loop().create_task(self._send_batches())
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
        else:
            self._lanes_busy -= 1

    async def _send_batches(self) -> None:
        batch: list[_Queued] = []
        try:
            while self._queue:
                batch = self._next_batch()
                if len(batch) == 1:
                    batch[0].future.set_result(_ALONE)  # nothing to share: its caller sends it as usual
                elif batch:
                    await self._send_batch(batch)
                batch = []
        finally:
            # Left early (the task was cancelled): whatever it had not answered goes alone.
            for item in itertools.chain(batch, self._queue):
                if not item.future.done():
                    item.future.set_result(_ALONE)
            self._queue.clear()
            self._lanes_busy -= 1

    def _next_batch(self) -> list[_Queued]:
        """The appends that wait, in order, up to `BATCH_EVENTS`, `BATCH_BYTES` and `BATCH_APPENDS`, one per
        stream (the stream's row is locked by the batch's first append to it)."""
        queue = self._queue
        batch: list[_Queued] = []
        streams: set[str] = set()
        events = size = 0
        while queue:
            item = queue.popleft()
            if item.future.done():  # its caller was cancelled
                continue
            p = item.prepared
            # Another append to a stream already in the batch goes alone at once, as does one to a stream
            # whose append waits for a lock (it would wait for the same lock and hold the batch up): a
            # burst on one stream then costs one look at each of its appends, not one per batch.
            if p.stream_id in streams or p.stream_id in self._stuck:
                item.future.set_result(_ALONE)
                continue
            if batch and (
                events + len(p.event_ids) > BATCH_EVENTS or size + p.size > BATCH_BYTES or len(batch) == BATCH_APPENDS
            ):
                queue.appendleft(item)  # first in the next batch
                break
            batch.append(item)
            streams.add(p.stream_id)
            events += len(p.event_ids)
            size += p.size
        return batch

    async def _send_batch(self, batch: list[_Queued]) -> None:
        rows: list[Any] = []
        sent: list[_Queued] = []
        try:
            async with self._own_connection(counted=False) as conn:
                # In stream id order: two batches lock their streams in the same order. Without the
                # appends whose callers gave up while the connection came.
                sent = sorted((item for item in batch if not item.future.done()), key=lambda i: i.prepared.stream_id)
                if len(sent) < 2:
                    return
                rows = await self._fetch_batch(conn, sent)
        except asyncpg.exceptions.UndefinedFunctionError:
            self._batching = False  # a database not migrated to revision 0019
        except Exception as exc:
            log.debug("append batch of %d failed (%s): its appends go alone", len(sent), exc)
        finally:
            # After the connection went back: a caller woken now finds no connection of the batch in use.
            if len(sent) > 1:
                self._batch_counts["sent" if rows else "failed"] += 1
            for row in rows:
                status = row[1]
                answer: Any = tuple(row)[1:6]
                if status == sql.APPEND_BATCH_FAILED:  # it wrote nothing: it is sent alone, to meet its error
                    self._batch_counts["failed appends"] += 1
                    answer = _ALONE_LOCKED if row[6] == sql.LOCK_NOT_AVAILABLE else _ALONE
                elif status == sql.APPEND_BATCH_LATE:
                    self._batch_counts["late appends"] += 1
                    answer = _ALONE
                future = sent[row[0] - 1].future
                if not future.done():
                    future.set_result(answer)
            for item in batch:
                if not item.future.done():
                    item.future.set_result(_ALONE)

    async def _fetch_batch(self, conn: Connection, batch: list[_Queued]) -> list[Any]:
        streams: list[str] = []
        expected: list[int] = []
        ends: list[int] = []
        ids: list[UUID] = []
        types: list[str] = []
        data: list[str] = []
        metadata: list[str] = []
        for item in batch:
            p = item.prepared
            streams.append(p.stream_id)
            expected.append(p.expected)
            ids += p.event_ids
            types += p.types
            data += p.data
            metadata += p.metadata
            ends.append(len(ids))
        rows: list[Any] = await conn.fetch(sql.APPEND_BATCH, streams, expected, ends, ids, types, data, metadata)
        return rows

    @contextlib.asynccontextmanager
    async def unit_of_work(self) -> AsyncIterator[UnitOfWork]:
        """A transaction for appends to several streams plus the application's own writes."""
        async with self._working(), self.pool.acquire() as conn:
            uow = UnitOfWork(self, conn)
            try:
                async with conn.transaction():
                    yield uow
            except asyncpg.PostgresError as exc:
                if _refusal(exc):  # a rule checked at commit
                    raise AppendRefused(exc.args[0]) from None
                raise
        if uow.results:
            telemetry.committed(uow.results)
            self._schedule_notify()

    async def _seal(self, executor: Connection | asyncpg.Pool, p: _Prepared) -> _Prepared:
        """Encrypt the personal fields (creating their subjects' keys in their own transaction if need be)."""
        if p.personal is None or p.plain is not None:
            return p
        def check_size(i: int, sealed: int) -> None:  # the limit holds for what is stored: the sealed text
            size = sealed + len(p.metadata[i].encode())
            if size > self.max_event_size:
                raise EventTooLarge(p.types[i], size, self.max_event_size)

        sealed = await self.keyring.seal(executor, p.event_ids, p.data, p.personal, check_size)
        return dataclasses.replace(p, data=sealed, plain=p.data)

    async def _hold_subjects(self, conn: Connection, personal: list[dict[str, str] | None]) -> None:
        """Hold the subjects the events were sealed for until commit (see `sql.HOLD_SUBJECTS`)."""
        subjects = sorted({s for fields in personal if fields for s in fields.values()})
        await conn.execute(sql.HOLD_SUBJECTS, subjects)
        held = {r["subject"] for r in await conn.fetch(sql.LIVE_SUBJECTS, subjects)}
        if len(held) < len(subjects):  # forgotten since the events were sealed
            raise SubjectForgotten(next(s for s in subjects if s not in held))

    async def _append_prepared(
        self, uow: UnitOfWork, p: _Prepared, expected_version: ExpectedVersion, condition: Condition | None = None
    ) -> AppendResult:
        row = await self._write(uow.connection, p, condition)
        return await self._recorded(uow, p, expected_version, condition, row)

    async def _write(self, conn: Connection, p: _Prepared, condition: Condition | None) -> Any:
        """Send the append; its status row, or the typed error of a statement that failed."""
        try:
            if p.personal is not None:
                await self._hold_subjects(conn, p.personal)
            if condition is None and not p.tagged:
                row = await conn.fetchrow(sql.APPEND, p.stream_id, p.expected, p.event_ids, p.types, p.data, p.metadata)
            else:
                row = await conn.fetchrow(sql.APPEND_TAGGED, *_tagged_args(p, condition))
        except asyncpg.exceptions.DeadlockDetectedError:
            # Only units of work that append to several streams in different orders can deadlock (each
            # append takes its own locks in order): PostgreSQL aborts one of them, to be run again.
            raise AppendConditionFailed(
                condition.query if condition else None, condition.after if condition else START,
                "deadlock with a concurrent append: retry the unit of work",
            ) from None
        except asyncpg.exceptions.OutOfMemoryError as exc:
            # The lock table is full (conditional and tagged appends take advisory locks until commit): the
            # server's, so other transactions fail too while one holds too many. Transient for them.
            raise AppendConditionFailed(
                condition.query if condition else None, condition.after if condition else START,
                f"the server is out of lock space ({exc.args[0]}): retry, and split units of work that append "
                "many tagged events, or raise max_locks_per_transaction",
            ) from None
        except asyncpg.exceptions.FeatureNotSupportedError as exc:
            raise InvalidArgument(exc.args[0]) from None
        except asyncpg.exceptions.UniqueViolationError as exc:
            if exc.constraint_name == "events_event_id_key":
                raise _ConcurrentDuplicate(p.stream_id, p.event_ids) from None
            raise
        except _JSON_REFUSED as exc:  # pre-serialized data (orjson.Fragment) that is not valid JSON
            raise EventSerializationError(", ".join(dict.fromkeys(p.types)), exc.args[0]) from None
        except asyncpg.PostgresError as exc:
            if _refusal(exc):
                raise AppendRefused(exc.args[0], p.stream_id) from None
            state = getattr(exc, "sqlstate", None)
            if state == sql.STREAM_TOMBSTONED:
                raise StreamTombstoned(p.stream_id) from None
            if state == sql.STREAM_ARCHIVED:
                raise StreamArchived(p.stream_id) from None
            if isinstance(exc, _GAVE_UP):
                raise AppendTimedOut(p.stream_id, exc.args[0]) from None
            raise
        assert row is not None
        return row

    async def _recorded(
        self, uow: UnitOfWork | None, p: _Prepared, expected_version: ExpectedVersion, condition: Condition | None,
        row: Any,
    ) -> AppendResult:
        """The result of an append from its status row, or its typed error; runs the append hooks.

        Without `uow` (an append sent in a batch, whose transaction has ended), a status that needs a
        second look at the stream takes a pooled connection for it.
        """
        status, version, positions, log_xid, recorded_at = row
        if status in (sql.CONDITION_FAILED, sql.WRONG_VERSION):
            # A retry (after a lost connection) that waited for the locks of its own first attempt finds
            # that attempt's events there: they are what moved the stream, or what matches the condition.
            again = await self._duplicates(uow, p)
            if again is not None and again[0] == sql.IDEMPOTENT:
                status, version, positions, log_xid, recorded_at = again
        if status == sql.CONDITION_FAILED:
            assert condition is not None
            raise AppendConditionFailed(condition.query, condition.after, conflict=Checkpoint(log_xid, positions[0]))
        if status == sql.OVERTAKEN:
            raise AppendConditionFailed(
                condition.query if condition else None, condition.after if condition else START,
                "a conditional append overlapping this one committed while this transaction was open: "
                "retry the unit of work",
            )
        if status == sql.FUTURE_CHECKPOINT:
            assert condition is not None
            raise InvalidAppend(f"condition checkpoint {tuple(condition.after)} is from the future: no read gave it")
        if status == sql.WRONG_VERSION:
            raise WrongExpectedVersion(p.stream_id, expected_version, version)
        if status == sql.ID_CONFLICT:
            # Sent again from another span (a caller's retry after a lost connection), the events carry
            # another trace context in their metadata: the same append all the same, if nothing else differs.
            again = await self._duplicates(uow, p)
            if again is None or again[0] != sql.IDEMPOTENT:
                raise DuplicateEventId(p.stream_id, p.event_ids)
            status, version, positions, log_xid, recorded_at = again
        stream_id, version_of = p.stream_id, version - len(p.event_ids) + 1
        data = p.data if p.plain is None else p.plain  # hooks see what was appended, not its sealed form
        if len(positions) != len(p.event_ids):
            raise RuntimeError(f"append of {len(p.event_ids)} events reported {len(positions)} positions")
        # Rows in RecordedEvent's field order, zipped and built without a Python-level step per event.
        recorded = tuple(RecordedEvent.from_rows(zip(
            p.event_ids, p.types, data, p.metadata, itertools.repeat(stream_id), range(version_of, version + 1),
            positions, itertools.repeat(log_xid), itertools.repeat(recorded_at),
        )))
        result = AppendResult(
            stream_id=p.stream_id,
            next_expected_version=version,
            first_position=positions[0],
            last_position=positions[-1],
            log_xid=log_xid,
            events=recorded,
            duplicate=status == sql.IDEMPOTENT,
        )
        if status == sql.APPENDED and uow is not None:
            await self._appended(uow, result)
        return result

    async def _duplicates(self, uow: UnitOfWork | None, p: _Prepared) -> Any:
        args = (p.stream_id, p.expected, p.event_ids, p.types, p.data, p.metadata)
        if uow is not None:
            return await uow.connection.fetchrow(sql.DUPLICATES_BUT_TRACE, *args)
        async with self._own_connection(counted=False) as conn:
            return await conn.fetchrow(sql.DUPLICATES_BUT_TRACE, *args)

    async def _appended(self, uow: UnitOfWork, result: AppendResult) -> None:
        """Run the append hooks (inline projections) on events written in `uow`'s transaction."""
        for hook in self._hooks:
            await hook(uow, result)

    # -- notifications -----------------------------------------------------------------------------

    def _schedule_notify(self) -> None:
        """Wake subscribers after commit, coalescing bursts into one NOTIFY.

        NOTIFY inside the writer's transaction would take PostgreSQL's global notify lock across every
        commit and serialize writers; sent afterwards it costs one tiny statement per burst.
        """
        if not self._notify or self._stopping:
            return
        self._notify_pending = True
        if self._notify_task is None or self._notify_task.done():
            self._notify_task = asyncio.get_running_loop().create_task(self._send_notifications())

    async def _send_notifications(self) -> None:
        # Sends at once, then waits NOTIFY_INTERVAL so that the appends of a busy spell share one NOTIFY.
        while self._notify_pending:
            self._notify_pending = False
            for attempt in range(2):  # a notifier whose session ended unnoticed gets one fresh connection
                try:
                    await self._send_notify()
                    break
                except Exception as exc:  # then subscribers fall back to polling
                    log.debug("notify failed: %s", exc)
                    if self._notifier is not None:
                        self._notifier.terminate()
                        self._notifier = None
                    if attempt:
                        return
            await asyncio.sleep(NOTIFY_INTERVAL)

    async def _send_notify(self) -> None:
        if self.url is None:
            await self.pool.execute(sql.NOTIFY)
            return
        # A connection of its own: a pool saturated by writers would delay the wake-up.
        if self._notifier is None or self._notifier.is_closed():
            self._notifier = await asyncpg.connect(self.url, timeout=5)
        await self._notifier.execute(sql.NOTIFY)

    # -- reads -------------------------------------------------------------------------------------

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version, -1 when it has no events."""
        check_stream_id(stream_id)
        version = await self.retrying(lambda: self._fetchval(sql.STREAM_VERSION, stream_id))
        return -1 if version is None else int(version)

    @telemetry.counted_read("stream")
    async def read_stream(
        self,
        stream_id: str,
        from_version: int | None = None,
        *,
        direction: Direction = Direction.FORWARDS,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream from `from_version` (inclusive); backwards from the end by default."""
        check_stream_id(stream_id)
        count = MAX_BIGINT if limit is None else check_int("limit", limit, 0)
        if from_version is not None:
            check_int("from_version", from_version, None)
        if not isinstance(direction, Direction):
            try:
                direction = Direction(direction)  # its value, "forwards" or "backwards", will do
            except ValueError:
                raise InvalidArgument(f"direction must be a Direction, got {direction!r}") from None
        if direction is Direction.FORWARDS:
            start = 0 if from_version is None else from_version
            rows = await self.retrying(
                lambda: self._fetch_events(sql.READ_STREAM_FORWARDS, stream_id, start, count)
            )
        else:
            start = MAX_BIGINT if from_version is None or from_version < 0 else from_version
            rows = await self.retrying(
                lambda: self._fetch_events(sql.READ_STREAM_BACKWARDS, stream_id, start, count)
            )
        return await self.reveal(rows)

    async def read_stream_payloads(
        self, stream_id: str, from_version: int = 0, *, limit: int | None = None
    ) -> list[EventPayload] | list[RecordedEvent]:
        """`read_stream` forwards with only what an aggregate needs: the cheap read of a load.

        A stream holding personal data is read with `read_stream`, whose events have those fields opened.
        """
        check_stream_id(stream_id)
        check_int("from_version", from_version, None)
        count = MAX_BIGINT if limit is None else check_int("limit", limit, 0)
        payloads: list[EventPayload] = await self.retrying(
            lambda: self._fetch(sql.READ_STREAM_PAYLOADS, stream_id, from_version, count, record_class=EventPayload)
        )
        if any(has_personal_data(p.metadata) for p in payloads):
            return await self.read_stream(stream_id, from_version, limit=limit)
        return payloads

    async def read_stream_until(
        self, stream_id: str, until: datetime, from_version: int = 0
    ) -> list[RecordedEvent]:
        """Events of one stream recorded at or before `until` (temporal queries)."""
        check_stream_id(stream_id)
        if not isinstance(until, datetime):
            raise InvalidArgument(f"until must be a datetime, got {type(until).__name__}")
        check_int("from_version", from_version, None)
        rows = await self.retrying(
            lambda: self._fetch_events(sql.READ_STREAM_UNTIL_TIME, stream_id, from_version, until, MAX_BIGINT)
        )
        return await self.reveal(rows)

    @telemetry.counted_read("all")
    async def read_all(
        self,
        after: Checkpoint = START,
        *,
        limit: int = 1000,
        types: Sequence[str] | None = None,
        category: str | None = None,
    ) -> list[RecordedEvent]:
        """The global log after `after`, in commit-safe order; see `Checkpoint` for why it never skips."""
        check_int("limit", limit, 1)
        tx, pos = Checkpoint.of(after)
        if category is not None:
            check_text("category", category, MAX_STREAM_ID_LENGTH)
        types = check_types(types)  # read once: it may be an iterator
        if types is not None and not types:
            return []
        query: str
        args: tuple[object, ...]
        if category is not None and types is not None:
            query, args = sql.READ_ALL_CATEGORY_TYPES, (tx, pos, limit, category, list(types))
        elif category is not None:
            query, args = sql.READ_ALL_CATEGORY, (tx, pos, limit, category)
        elif types is not None and len(distinct := list(dict.fromkeys(types))) == 1:
            query, args = sql.READ_ALL_TYPE, (tx, pos, limit, distinct[0])
        elif types is not None:
            query, args = sql.READ_ALL_TYPES, (tx, pos, limit, list(types))
        else:
            query, args = sql.READ_ALL, (tx, pos, limit)
        rows = await self.retrying(lambda: self._fetch_events(query, *args))
        return await self.reveal(rows)

    async def reveal(
        self, records: list[RecordedEvent], executor: Connection | asyncpg.Pool | None = None
    ) -> list[RecordedEvent]:
        """`records` with personal fields opened, or `REDACTED` where their subject was forgotten.

        Every reader of the log calls it (the store's reads here; projections with their transaction's
        connection as `executor`); events without personal data cost one substring test.
        """
        return await self.keyring.reveal(self.pool if executor is None else executor, records)

    async def forget(self, subject: str) -> Erasure:
        """Delete the subject's data key: its personal fields read as `REDACTED` from then on, everywhere.

        In one transaction: the key goes, the snapshots of streams holding the subject's data go (they
        cache plaintext states), and a `SUBJECT_FORGOTTEN` event is recorded so projections can scrub
        their read models. Forgetting again only drops snapshots again (one a save racing the first
        call may have written); an unknown subject raises `UnknownSubject` and changes nothing.
        """
        check_subject(subject)
        async with self.unit_of_work() as uow:
            conn = uow.connection
            await conn.execute(sql.FORGET_LOCK, subject)  # after the appends sealing for the subject
            row = await conn.fetchrow(sql.LOCK_SUBJECT, subject)
            if row is None:
                raise UnknownSubject(subject)
            first = row["forgotten_at"] is None
            if first:
                await conn.execute(sql.FORGET_SUBJECT, subject)
            dropped = await conn.execute(sql.DROP_SUBJECT_SNAPSHOTS, subject)
            if first:
                await uow.append(erasure_stream(subject), [NewEvent(SUBJECT_FORGOTTEN, {"subject": subject})])
        return Erasure(subject, first, int(dropped.split()[-1]))

    async def read_query(self, query: Query, after: Checkpoint = START, *, limit: int = 1000) -> list[RecordedEvent]:
        """Events matching `query` after `after`, in the log's order and with `read_all`'s visibility.

        The checkpoint of the last event a decision read is the `after` of its append condition.
        """
        args = _query_args(query, after, limit)
        rows = await self.retrying(lambda: self._fetch_events(sql.CALL_READ_QUERY, *args))
        return await self.reveal(rows)

    async def read_with_condition(self, query: Query, *, page: int = 1000) -> tuple[list[RecordedEvent], Condition]:
        """Every committed event matching `query`, in log order, and the condition to append a decision with.

        Unlike `read_query` it does not wait for the log to show a commit: a long transaction elsewhere
        in the cluster holds the log's horizon back, and a decision made on what the log showed would
        fail its condition until the horizon passed. Events below the horizon of the first page's read
        are final; the condition names the horizon and the events read above it.
        """
        args = _query_args(query, START, page)
        events: list[RecordedEvent] = []
        horizon: int | None = None
        after = START
        while True:
            page_args = (after[0], after[1], *args[2:])
            rows = await self.retrying(partial(self._fetch, sql.CALL_READ_QUERY_COMMITTED, *page_args))
            if rows and horizon is None:
                horizon = int(rows[0]["horizon"])
            events.extend(RecordedEvent.from_rows(r[:9] for r in rows))
            if len(rows) < page:
                break
            after = events[-1].checkpoint
        events = await self.reveal(events)
        if horizon is None:  # nothing matched: anything matching now is news
            return events, Condition(query, START)
        seen = tuple(e.position for e in events if e.log_xid >= horizon)
        return events, Condition(query, Checkpoint(horizon, 0), seen)

    async def head(self) -> Checkpoint:
        """The checkpoint of the newest event a reader can see now."""
        row = await self.retrying(lambda: self._fetchrow(sql.HEAD))
        return START if row is None else Checkpoint(row[0], row[1])

    async def last_committed(self) -> Checkpoint:
        """The checkpoint of the newest committed event, visible to readers of the log yet or not.

        What to wait for after one's own writes: `head()` stops short of events that an older
        transaction, still running anywhere in the cluster, holds back.
        """
        row = await self.retrying(lambda: self._fetchrow(sql.LAST_COMMITTED))
        return START if row is None else Checkpoint(row[0], row[1])

    async def refresh_statistics(self, min_changes: int = STALE_AFTER) -> bool:
        """ANALYZE `events` if it has at least doubled (and grown by `min_changes` rows) since its last
        ANALYZE; return whether it did.

        Readers of event types (projections, decisions) page through `events_type_log_idx` in log order,
        a plan that holds only while the planner's statistics are about the table's size. After a bulk
        load, until autovacuum catches up, the planner instead sorts every event of the type for each
        page: a replay then slows down with the square of the log. Runners and rebuilds call this as
        they start, so it never fails them: one process analyzes at a time, outside any transaction (the
        log's visibility line never waits for it), waiting at most a second for a lock and skipping the
        table while a vacuum holds it; when it cannot analyze (a role that may not, a lock, a timeout),
        it logs a warning saying why and returns False.
        """
        check_int("min_changes", min_changes, 0)

        async def refresh() -> bool:
            async with self.pool.acquire() as conn:
                row = await conn.fetchrow(sql.STATISTICS_STALE, min_changes)
                if row is None or not row[0] or not await conn.fetchval(sql.ANALYZE_LOCK):
                    return False  # fresh enough, or another process is analyzing it
                said: list[str] = []

                def listen(_: object, message: asyncpg.PostgresLogMessage) -> None:
                    said.append(str(message))

                conn.add_log_listener(listen)
                try:
                    await conn.fetchval(sql.ANALYZE_TIMEOUT)
                    await conn.execute(sql.ANALYZE_EVENTS)
                    analyzed = await conn.fetchval(sql.LAST_ANALYZE)
                except (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.QueryCanceledError,
                        asyncpg.exceptions.InsufficientPrivilegeError) as exc:
                    said.append(str(exc))
                    analyzed = None
                finally:
                    conn.remove_log_listener(listen)
                    await conn.fetchval(sql.ANALYZE_UNLOCK)
                if analyzed is None or analyzed == row[1]:
                    log.warning("the statistics of table events are stale and it was not analyzed (%s): run "
                                "ANALYZE events as its owner before replaying projections", "; ".join(said) or "?")
                    return False
                log.info("analyzed table events: its statistics described less than half of it")
                return True

        return await self.retrying(refresh)

    async def held_back(self) -> bool:
        """Whether committed events wait below the log's visibility line (no NOTIFY comes when the
        older transaction holding them back ends without writing events)."""
        return bool(await self.retrying(lambda: self._fetchval(sql.HELD_BACK)))

    async def wait_until_visible(self, checkpoint: Checkpoint, timeout: float = 30.0) -> None:
        """Wait until `read_all` readers can see `checkpoint`.

        The log shows only transactions older than every transaction still running anywhere in the
        PostgreSQL cluster (transaction ids are cluster-wide), so a long transaction, even in another
        database, holds it back until it ends. Raises `TimeoutError` after `timeout` seconds.
        """
        checkpoint = Checkpoint.of(checkpoint)
        check_seconds("timeout", timeout)
        polls = Backoff(0.005, 0.1)
        async with asyncio.timeout(timeout):
            while not await self.retrying(lambda: self._fetchval(sql.CHECKPOINT_VISIBLE, checkpoint[0])):
                delay = polls.failed()  # not visible yet: look again, less and less often
                await asyncio.sleep(delay)

    async def count_after(self, after: Checkpoint) -> int:
        """How many visible events lie after `after` (a reader's lag)."""
        after = Checkpoint.of(after)
        return int(await self.retrying(lambda: self._fetchval(sql.COUNT_AFTER, after[0], after[1])))

    async def list_streams(self, category: str | None = None, limit: int = 100) -> list[tuple[str, int]]:
        if category is not None and (not isinstance(category, str) or not storable_text(category)):
            raise InvalidArgument(f"category must be a string without NUL, got {category!r}")  # may be empty
        check_int("limit", limit, 0)
        rows = await self.retrying(lambda: self._fetch(sql.LIST_STREAMS, category, limit))
        return [(r[0], r[1]) for r in rows]

    def subscribe(
        self,
        after: Checkpoint = START,
        *,
        types: Sequence[str] | None = None,
        category: str | None = None,
        batch_size: int = 500,
        poll_interval: float = 1.0,
    ) -> Subscription:
        """Catch up from `after`, then follow new events (LISTEN/NOTIFY, polling as a fallback)."""
        return Subscription(
            self, after, types=types, category=category, batch_size=batch_size, poll_interval=poll_interval
        )

    # -- snapshots ---------------------------------------------------------------------------------

    async def save_snapshot(
        self, stream_id: str, snapshot_type: str, schema_version: str, stream_version: int, data: str
    ) -> None:
        """Store the latest snapshot of a stream; an older one never replaces a newer one, and a stream that
        does not exist or is archived takes none."""
        check_stream_id(stream_id)
        await self.retrying(
            lambda: _save_snapshot(self.pool, stream_id, snapshot_type, schema_version, stream_version, data)
        )

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        check_stream_id(stream_id)
        row = await self.retrying(lambda: self._fetchrow(sql.LOAD_SNAPSHOT, stream_id))
        return None if row is None else Snapshot(*row)


async def _save_snapshot(
    executor: Connection | asyncpg.Pool,
    stream_id: str,
    snapshot_type: str,
    schema_version: str,
    stream_version: int,
    data: str,
) -> None:
    check_text("snapshot type", snapshot_type, _MAX_LABEL)
    if not isinstance(schema_version, str) or not storable_text(schema_version):
        raise InvalidArgument(f"schema_version must be a string without NUL, got {schema_version!r}")
    check_int("stream_version", stream_version, 0)
    if not isinstance(data, str):
        raise InvalidArgument(f"snapshot data must be JSON text (str), got {type(data).__name__}")
    try:
        await executor.execute(sql.SAVE_SNAPSHOT, stream_id, snapshot_type, schema_version, stream_version, data)
    except _JSON_REFUSED as exc:
        raise InvalidArgument(f"snapshot of {stream_id!r} is not JSON PostgreSQL can store: {exc}") from None


def _condition(value: object) -> Condition | None:
    """A condition as a caller passes it: a `Condition` or a (query, checkpoint) pair."""
    if value is None:
        return None
    if not isinstance(value, tuple) or len(value) not in (2, 3) or not isinstance(value[0], Query):
        raise InvalidAppend(f"a condition is a (Query, Checkpoint) pair, got {value!r}")
    seen = value[2] if len(value) == 3 else ()
    if not isinstance(seen, tuple) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= MAX_BIGINT for p in seen
    ):
        raise InvalidAppend(f"a condition's seen positions must be a tuple of log positions, got {seen!r}")
    return Condition(value[0], Checkpoint.of(value[1]), seen)


def _query_args(query: object, after: object, limit: object) -> tuple[object, ...]:
    if not isinstance(query, Query):
        raise InvalidArgument(f"query must be a Query, got {type(query).__name__}")
    tx, pos = Checkpoint.of(after)
    return (tx, pos, check_int("limit", limit, 1), *branches(query))


def _tagged_args(p: _Prepared, condition: Condition | None) -> tuple[object, ...]:
    keys, modes = lock_plan(condition.query if condition else None, p.types, p.tags)
    flat_tags = [tag for event_tags in p.tags for tag in event_tags]
    tag_events = [i for i, event_tags in enumerate(p.tags, 1) for _ in event_tags]
    if condition is None:
        after: tuple[object, ...] = (None, None, None, None, 0, 0, [])
    else:
        after = (*branches(condition.query), condition.after.log_xid, condition.after.position, list(condition.seen))
    return (
        p.stream_id, p.expected, p.event_ids, p.types, p.data, p.metadata, flat_tags, tag_events, keys, modes, *after
    )
