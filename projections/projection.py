"""Declaring a projection: its name, version, the read-model tables it owns and a handler per event type.

Handlers write plain SQL against their table names: every transaction that runs them first points the
connection's `search_path` at the schema holding the generation of tables being built, so the same
handler serves the live tables, a rebuild into new ones, and inline updates.
"""

from __future__ import annotations

import inspect
import operator
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateIndex, CreateTable

from eventstore import RecordedEvent
from projections.errors import InvalidProjection

Connection: TypeAlias = "asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any]"
"""The connection handlers get: inside the transaction that also records the projection's progress."""

EventHandler = Callable[[Any, RecordedEvent], Awaitable[None]]
"""`async def handler(connection, event)`."""

BatchHandler = Callable[[Any, list[RecordedEvent]], Awaitable[None]]
"""`async def handler(connection, events)`: consecutive events of its types, in log order."""

F = TypeVar("F", bound=Callable[..., Awaitable[None]])

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,39}")
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_MARK = "__projection_handles__"
_KEY_PATH = re.compile(r"^(data|metadata)(\.[^.\s]+)+$")
_EVENT_TYPE = operator.attrgetter("event_type")
MAX_PARTITIONS = 256


FRAMEWORK_TABLES = frozenset({
    "events", "streams", "snapshots", "event_tags", "condition_locks", "subject_keys", "events_archive",
    "projection_checkpoints", "projection_rebuilds", "projection_partitions",
    "outbox", "outbox_routes", "outbox_slots", "outbox_relays", "inbox",
    "alembic_version",
})
"""Table names of the framework itself, which a read model may not take (a test checks the list)."""

def handles(*event_types: str, batch: bool = False) -> Callable[[F], F]:
    """Mark a method of a `Projection` as the handler of `event_types`.

    With `batch=True` the method receives a list of consecutive events of those types instead of one
    event, so it can write them with one statement (`executemany`, `unnest` arrays or COPY).
    """
    if not event_types:
        raise InvalidProjection("@handles needs at least one event type")

    def mark(method: F) -> F:
        setattr(method, _MARK, (tuple(event_types), batch))
        return method

    return mark


@dataclass(frozen=True, slots=True)
class ReadModelTable:
    """A table a projection owns, with the DDL that creates it (run with the generation's search_path)."""

    name: str
    ddl: tuple[str, ...]


TableDeclaration = Mapping[str, "str | Sequence[str]"] | Sequence["sa.Table | ReadModelTable"]
"""`{"name": "CREATE TABLE name (...)"}`, or SQLAlchemy Core `Table`s (without a schema)."""


@dataclass(frozen=True, slots=True)
class _Handler:
    call: Callable[[Any, Any], Awaitable[None]]
    batch: bool


class HandlerFailed(Exception):
    """A handler raised; carries the first event it was given and how many it was given."""

    def __init__(self, event: RecordedEvent, count: int, error: BaseException) -> None:
        super().__init__(str(error))
        self.event = event
        self.count = count
        self.error = error


class _DeferredWrites:
    """The connection event handlers get inside a runner's batch: writes queue up, reads send them first.

    `execute` with arguments is queued (and returns an empty status); runs of the same statement are
    then sent with one `executemany`, a single round trip for a batch's worth of events. Every other
    use of the connection (a read, a savepoint, `executemany`, `execute` without arguments) sends the
    queue first, so a handler always reads what it wrote. A queued statement that fails is reported
    against the first event of its run: the runner then applies the batch event by event, which names
    the failing event exactly. After `prepare` or `cursor` nothing is queued any more (their statements
    run outside this wrapper).
    """

    __slots__ = ("_conn", "_direct", "_queue", "_savepoints", "event")

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: list[tuple[str, tuple[Any, ...], RecordedEvent | None]] = []
        self._savepoints = 0
        self._direct = False
        self.event: RecordedEvent | None = None

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if not args or timeout is not None or self._savepoints or self._direct:
            await self.flush()
            status: str = await self._conn.execute(query, *args, timeout=timeout)
            return status
        self._queue.append((query, args, self.event))
        return ""

    async def flush(self) -> None:
        """Send the queued statements, runs of the same one with one `executemany`."""
        queue, self._queue = self._queue, []
        i, n = 0, len(queue)
        while i < n:
            query, args, event = queue[i]
            j = i + 1
            while j < n and queue[j][0] == query:
                j += 1
            try:
                if j - i == 1:
                    await self._conn.execute(query, *args)
                else:
                    await self._conn.executemany(query, [entry[1] for entry in queue[i:j]])
            except Exception as exc:
                assert event is not None
                raise HandlerFailed(event, len({id(entry[2]) for entry in queue[i:j]}), exc) from exc
            i = j

    def transaction(self, **options: Any) -> _Savepoint:
        return _Savepoint(self, options)

    def cursor(self, *args: Any, **kwargs: Any) -> _Cursor:
        self._direct = True  # its later reads bypass this wrapper
        return _Cursor(self, self._conn.cursor(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._conn, name)
        # By the Connection class too: a pool's connection proxy wraps its methods in plain functions.
        underlying = getattr(asyncpg.Connection, name, None)
        if not (inspect.iscoroutinefunction(attribute) or inspect.iscoroutinefunction(underlying)):
            return attribute
        if name == "prepare":
            self._direct = True  # the prepared statement's reads bypass this wrapper

        async def flushed_first(*args: Any, **kwargs: Any) -> Any:
            await self.flush()
            return await attribute(*args, **kwargs)

        return flushed_first


class _Cursor:
    """`connection.cursor(...)` for a handler: awaited or iterated once the queue is sent."""

    def __init__(self, writes: _DeferredWrites, factory: Any) -> None:
        self._writes = writes
        self._factory = factory

    def __await__(self) -> Any:
        return self._open().__await__()

    async def _open(self) -> Any:
        await self._writes.flush()
        return await self._factory

    async def _rows(self) -> AsyncIterator[Any]:
        await self._writes.flush()
        async for row in self._factory:
            yield row

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._rows()


class _Savepoint:
    """`connection.transaction()` for a handler: the queue goes first, statements inside go directly."""

    def __init__(self, writes: _DeferredWrites, options: dict[str, Any]) -> None:
        self._writes = writes
        self._options = options
        self._transaction: Any = None

    async def __aenter__(self) -> Any:
        await self._writes.flush()
        self._transaction = self._writes._conn.transaction(**self._options)
        await self._transaction.__aenter__()
        self._writes._savepoints += 1
        return self._transaction

    async def __aexit__(self, *exc: Any) -> Any:
        self._writes._savepoints -= 1
        return await self._transaction.__aexit__(*exc)


class Projection:
    """A read model built from the global log. Subclass it and mark handlers with `@handles`, or pass
    `handlers=` / `batch_handlers=` mappings of plain `async def f(connection, event)` functions.

    `version` says which declaration built the stored tables: change it (or the table names) and the
    stored read model must be rebuilt before the projection runs again. `inline=True` projections are
    updated inside every append's transaction instead of by a runner. With `tags`, only events that carry
    all of them reach the handlers (a read model of one tenant, one course); change the version with them.

    `partitions=N` splits the work: each event belongs to one partition by a stable hash of its stream
    id (or of `partition_key`, a field such as `"data.customer_id"`), each partition has a checkpoint of
    its own and is run by one worker at a time, in any runner process, so N workers share the load while
    each stream's events (each key's) are still applied in order. Events of different partitions are
    applied in no particular order relative to each other: handlers must not depend on it. Changing N
    is a rebuild.
    """

    name: str = ""
    version: int = 1
    tables: TableDeclaration = ()
    inline: bool = False
    tags: Sequence[str] = ()
    partitions: int = 1
    partition_key: str | None = None
    defer_writes: bool = True
    """In a runner, queue event handlers' `execute` calls and send them in runs (see `_DeferredWrites`).

    Set it to False for handlers that look at the status `execute` returns.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        version: int | None = None,
        tables: TableDeclaration | None = None,
        inline: bool | None = None,
        tags: Sequence[str] | None = None,
        partitions: int | None = None,
        partition_key: str | None = None,
        handlers: Mapping[str, EventHandler] | None = None,
        batch_handlers: Mapping[str, BatchHandler] | None = None,
    ) -> None:
        if name is not None:
            self.name = name
        if version is not None:
            self.version = version
        if tables is not None:
            self.tables = tables
        if inline is not None:
            self.inline = inline
        if tags is not None:
            self.tags = tags
        if partitions is not None:
            self.partitions = partitions
        if partition_key is not None:
            self.partition_key = partition_key
        self._handlers: dict[str, _Handler] = {}
        # By method name, so a subclass's override (marked again or not) replaces the inherited handler.
        marks: dict[str, tuple[tuple[str, ...], bool]] = {}
        for klass in reversed(type(self).__mro__):
            for attribute, value in vars(klass).items():
                mark = getattr(value, _MARK, None)
                if mark is not None:
                    marks[attribute] = mark
        for attribute, (types, batch) in marks.items():
            self._add(types, getattr(self, attribute), batch, f"{type(self).__name__}.{attribute}")
        for event_type, handler in (handlers or {}).items():
            self._add((event_type,), handler, False, repr(handler))
        for event_type, batch_handler in (batch_handlers or {}).items():
            self._add((event_type,), batch_handler, True, repr(batch_handler))
        self._check()
        self.read_model: tuple[ReadModelTable, ...] = _read_model(self.name, self.tables)
        self.event_types: list[str] = sorted(self._handlers)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} v{self.version}>"

    def _add(self, types: Sequence[str], function: Any, batch: bool, where: str) -> None:
        if not inspect.iscoroutinefunction(function):
            raise InvalidProjection(f"projection {self.name!r}: handler {where} must be an `async def`")
        for event_type in types:
            if not isinstance(event_type, str) or not event_type:
                raise InvalidProjection(f"projection {self.name!r}: bad event type {event_type!r} in {where}")
            if event_type in self._handlers:
                raise InvalidProjection(f"projection {self.name!r}: two handlers for event type {event_type!r}")
            self._handlers[event_type] = _Handler(function, batch)

    def _check(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise InvalidProjection(
                f"projection name {self.name!r} must be 1-40 characters of a-z, 0-9 and _, not starting with a digit"
            )
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise InvalidProjection(f"projection {self.name!r}: version must be an int >= 1, got {self.version!r}")
        if not self._handlers:
            raise InvalidProjection(f"projection {self.name!r} handles no event types")
        if isinstance(self.tags, str) or not all(isinstance(t, str) and t for t in self.tags):
            raise InvalidProjection(f"projection {self.name!r}: tags must be a collection of non-empty strings")
        partitions = self.partitions
        if isinstance(partitions, bool) or not isinstance(partitions, int) or not 1 <= partitions <= MAX_PARTITIONS:
            raise InvalidProjection(
                f"projection {self.name!r}: partitions must be an int from 1 to {MAX_PARTITIONS}, got {partitions!r}"
            )
        if self.inline and partitions > 1:
            raise InvalidProjection(f"projection {self.name!r}: an inline projection cannot be partitioned")
        key = self.partition_key
        if key is not None and not (isinstance(key, str) and _KEY_PATH.fullmatch(key)):
            raise InvalidProjection(
                f"projection {self.name!r}: partition_key must name a field like 'data.customer_id', got {key!r}"
            )

    @property
    def key_path(self) -> tuple[str | None, list[str] | None]:
        """`partition_key` as (document, path) for `sql.READ_PARTITION`; (None, None) for the stream id."""
        if self.partition_key is None:
            return None, None
        document, *path = self.partition_key.split(".")
        return document, path

    def handles(self, event_type: str) -> bool:
        return event_type in self._handlers

    async def apply(self, connection: Connection, events: Sequence[RecordedEvent], *, defer: bool = False) -> None:
        """Run the handlers over `events` in order; events of other types (or without the tags) are skipped.

        Consecutive events that go to the same batch handler reach it in one call. With `defer` (a
        runner's batches, when the projection's `defer_writes` allows it) event handlers write through
        `_DeferredWrites`: their statements reach the server in runs, before anything reads and before
        `apply` returns.
        """
        handlers = self._handlers
        tags = frozenset(self.tags)
        # The handler of every event first, in one pass (the batch runs below only compare them).
        if tags:
            targets = [
                handler if handler is not None and tags.issubset(event.tags) else None
                for event, handler in ((e, handlers.get(e.event_type)) for e in events)
            ]
        else:
            targets = [handlers.get(event_type) for event_type in map(_EVENT_TYPE, events)]

        writes = _DeferredWrites(connection) if defer and self.defer_writes else None
        i, n = 0, len(events)
        while i < n:
            event = events[i]
            handler = targets[i]
            if handler is None:
                i += 1
                continue
            j = i + 1
            if handler.batch:
                while j < n and targets[j] is handler:
                    j += 1
            try:
                if handler.batch:
                    if writes is not None:
                        await writes.flush()
                    await handler.call(connection, list(events[i:j]))
                elif writes is not None:
                    writes.event = event
                    await handler.call(writes, event)
                else:
                    await handler.call(connection, event)
            except HandlerFailed:
                raise
            except Exception as exc:
                raise HandlerFailed(event, j - i, exc) from exc
            i = j
        if writes is not None:
            await writes.flush()


def _read_model(name: str, tables: TableDeclaration) -> tuple[ReadModelTable, ...]:
    result: list[ReadModelTable] = []
    if isinstance(tables, Mapping):
        for table_name, ddl in tables.items():
            statements = (ddl,) if isinstance(ddl, str) else tuple(ddl)
            if not statements or not all(isinstance(s, str) and s.strip() for s in statements):
                raise InvalidProjection(f"projection {name!r}: table {table_name!r} needs DDL text")
            result.append(ReadModelTable(table_name, statements))
    elif isinstance(tables, Sequence) and not isinstance(tables, str):
        for table in tables:
            if isinstance(table, ReadModelTable):
                result.append(table)
            elif isinstance(table, sa.Table):
                result.append(_from_sqlalchemy(name, table))
            else:
                raise InvalidProjection(
                    f"projection {name!r}: tables must be sqlalchemy Tables or a mapping of name to DDL, "
                    f"got {type(table).__name__}"
                )
    else:
        raise InvalidProjection(f"projection {name!r}: tables must be a mapping of name to DDL or a list of Tables")
    if not result:
        raise InvalidProjection(f"projection {name!r} declares no read-model tables")
    seen: set[str] = set()
    for table in result:
        if not isinstance(table.name, str) or not _TABLE.fullmatch(table.name):
            raise InvalidProjection(
                f"projection {name!r}: table name {table.name!r} must be a lower-case SQL identifier"
            )
        if table.name in FRAMEWORK_TABLES:
            raise InvalidProjection(f"projection {name!r}: table name {table.name!r} belongs to the framework")
        if table.name in seen:
            raise InvalidProjection(f"projection {name!r}: table {table.name!r} is declared twice")
        seen.add(table.name)
    return tuple(result)


def _from_sqlalchemy(name: str, table: sa.Table) -> ReadModelTable:
    if table.schema is not None:
        raise InvalidProjection(
            f"projection {name!r}: table {table.name!r} must not name a schema (each generation has its own)"
        )
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    statements = [str(CreateTable(table).compile(dialect=dialect))]
    statements += [str(CreateIndex(index).compile(dialect=dialect)) for index in table.indexes]
    return ReadModelTable(table.name, tuple(statements))
