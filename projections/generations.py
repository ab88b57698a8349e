"""Generations of a projection's tables, its stored checkpoint, and reading the log in batches.

Each generation of a projection's tables lives in a schema of its own (`projection_<name>_g<n>`);
readers see the active generation through views of the table names beside the event store's tables.
A rebuild fills generation n+1 while n keeps serving, then repoints the views in one transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from eventstore import (
    CONNECTION_ERRORS,
    START,
    Checkpoint,
    EventStore,
    InvalidArgument,
    Keyring,
    RecordedEvent,
    fetch_events,
    storable_text,
)
from projections import sql
from projections.errors import InvalidProjection, ProjectionError, ProjectionsNotMigrated
from projections.projection import Connection, HandlerFailed, Projection

log = logging.getLogger(__name__)


def schema_for(name: str, generation: int) -> str:
    return f"projection_{name}_g{generation}"


def lease_key(kind: str, name: str) -> int:
    """A 64-bit advisory lock key per (kind, projection); a hash, so it cannot clash with other users."""
    digest = hashlib.blake2b(f"eventstore.projections.{kind}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lease_names(name: str, partitions: int) -> list[str]:
    """What runners lease for a projection (`lease_key("run", ...)`): the projection, or each partition."""
    return [name] if partitions <= 1 else [partition_name(name, p) for p in range(partitions)]


def partition_name(name: str, partition: int) -> str:
    return f"{name}#{partition}"


def runner_identity(label: str | None = None) -> str:
    base = f"{socket.gethostname()}:{os.getpid()}"
    return base if label is None else f"{base}:{label}"


def distinct(projections: Iterable[Projection]) -> list[Projection]:
    """The projections as a list; `InvalidProjection` if one is not a `Projection` or two share a name
    (they would share tables)."""
    if isinstance(projections, str | bytes) or not isinstance(projections, Iterable):
        raise InvalidProjection(f"expected a collection of Projection instances, got {type(projections).__name__}")
    chosen = list(projections)
    for projection in chosen:
        if not isinstance(projection, Projection):
            raise InvalidProjection(f"expected Projection instances, got {type(projection).__name__}")
    names = [p.name for p in chosen]
    if len(set(names)) != len(names):
        raise InvalidProjection(f"projection names must be unique, got {names}")
    return chosen


def mode_of(projection: Projection) -> str:
    return "inline" if projection.inline else "async"


@dataclass(frozen=True, slots=True)
class StoredCheckpoint:
    """A row of `projection_checkpoints`."""

    name: str
    mode: str
    version: int
    generation: int
    tables: list[str]
    checkpoint: Checkpoint
    status: str
    runner: str | None
    last_error: str | None
    failed_event_id: UUID | None
    failed_event_type: str | None
    failed_log_xid: int | None
    failed_position: int | None
    failed_at: datetime | None
    updated_at: datetime
    partitions: int
    partition_key: str | None

    @classmethod
    def of(cls, row: Any) -> StoredCheckpoint:
        return cls(
            name=row["name"], mode=row["mode"], version=row["version"], generation=row["generation"],
            tables=list(row["tables"]), checkpoint=Checkpoint(row["log_xid"], row["position"]),
            status=row["status"], runner=row["runner"], last_error=row["last_error"],
            failed_event_id=row["failed_event_id"], failed_event_type=row["failed_event_type"],
            failed_log_xid=row["failed_log_xid"], failed_position=row["failed_position"],
            failed_at=row["failed_at"], updated_at=row["updated_at"], partitions=row["partitions"],
            partition_key=row["partition_key"],
        )

    def mismatch(self, projection: Projection) -> str | None:
        return mismatch(projection, self.mode, self.version, self.tables, self.partitions, self.partition_key)


def mismatch(
    projection: Projection, mode: str, version: int, tables: Sequence[str], partitions: int, partition_key: str | None
) -> str | None:
    """Why tables stored with (mode, version, tables, partitions, partition_key) cannot be kept current by
    `projection`.

    A partition's checkpoint only says which events it has applied under the key it was made with: under
    another key the same partition holds other events, so a new key, like a new count, is a rebuild.
    """
    if partitions != projection.partitions:
        return f"tables were built in {partitions} partition(s), declared {projection.partitions}"
    if partitions > 1 and partition_key != projection.partition_key:
        return (
            f"partitions were made by partition key {_key_name(partition_key)}, "
            f"declared {_key_name(projection.partition_key)}"
        )
    if mode != mode_of(projection):
        return f"stored as {mode}, declared {mode_of(projection)}"
    if version != projection.version:
        return f"tables were built by version {version}, declared version is {projection.version}"
    declared = sorted(t.name for t in projection.read_model)
    if sorted(tables) != declared:
        return f"stored tables {sorted(tables)} differ from declared {declared}"
    return None


def _key_name(partition_key: str | None) -> str:
    return "the stream id" if partition_key is None else repr(partition_key)


async def connect(store: EventStore, purpose: str) -> Connection:
    """A connection of its own, outside the pool: it holds a session-level advisory lock for its life."""
    if store.url is None:
        conn: Connection = await store.pool.acquire()
        return conn
    return await asyncpg.connect(store.url, server_settings={"application_name": f"eventstore {purpose}"[:63]})


async def disconnect(store: EventStore, conn: Connection) -> None:
    if isinstance(conn, asyncpg.Connection):
        if not conn.is_closed():
            try:
                await conn.close(timeout=2)
            except Exception:
                conn.terminate()
    else:
        try:
            await store.pool.release(conn)
        except Exception:
            conn.terminate()


async def session_paths(conn: Connection) -> tuple[str, str]:
    """The connection's own search_path and the schema where the views of projection tables go."""
    path = await conn.fetchval(sql.SEARCH_PATH)
    try:
        views = await conn.fetchval(sql.VIEW_SCHEMA)
    except asyncpg.exceptions.UndefinedTableError:
        raise ProjectionsNotMigrated() from None
    return str(path), str(views)


async def use_generation(conn: Connection, name: str, generation: int, search_path: str) -> None:
    await conn.execute(sql.USE_GENERATION, schema_for(name, generation), search_path)


async def create_generation(conn: Connection, projection: Projection, generation: int, search_path: str) -> None:
    """Create the schema of one generation and run the projection's DDL in it (inside the caller's transaction)."""
    schema = schema_for(projection.name, generation)
    await conn.execute(sql.drop_schema(schema))
    await conn.execute(sql.create_schema(schema))
    await conn.execute(sql.USE_GENERATION, schema, search_path)
    for table in projection.read_model:
        for statement in table.ddl:
            try:
                async with conn.transaction():
                    await conn.execute(statement)
            except asyncpg.PostgresError as exc:
                raise InvalidProjection(
                    f"projection {projection.name!r}: DDL of table {table.name!r} failed: {exc}"
                ) from None
        if not await conn.fetchval(sql.TABLE_IN_SCHEMA, schema, table.name):
            raise InvalidProjection(
                f"projection {projection.name!r}: the DDL of table {table.name!r} did not create a table "
                f"named {table.name!r} (it must not name a schema)"
            )
    await conn.execute(sql.RESTORE_SEARCH_PATH, search_path)


async def publish(
    conn: Connection, view_schema: str, name: str, generation: int, tables: Sequence[str], previous: Sequence[str]
) -> None:
    """Point the views of the table names at `generation` (inside the caller's transaction)."""
    schema = schema_for(name, generation)
    for table in tables:
        kind = await conn.fetchval(sql.RELATION_KIND, view_schema, table)
        if kind is not None and not (kind == "v" and table in previous):
            raise InvalidProjection(
                f"projection {name!r}: {view_schema}.{table} already exists and is not this projection's view"
            )
        try:
            async with conn.transaction():
                await conn.execute(sql.replace_view(view_schema, table, schema))
        except asyncpg.exceptions.InvalidTableDefinitionError:
            # The columns changed: a view can only be replaced by one that extends it.
            try:
                async with conn.transaction():
                    await conn.execute(sql.drop_view(view_schema, table))
                    await conn.execute(sql.replace_view(view_schema, table, schema))
            except asyncpg.exceptions.DependentObjectsStillExistError as exc:
                raise ProjectionError(
                    f"projection {name!r}: cannot replace view {view_schema}.{table} with new columns: {exc}"
                ) from None
    for table in previous:
        if table not in tables:
            await conn.execute(sql.drop_view(view_schema, table))


async def hold_for_swap(conn: Connection, projection: Projection) -> tuple[StoredCheckpoint, Any]:
    """First in a transaction that makes another generation of `projection` live; returns its checkpoint
    and rebuild rows (None without a rebuild), locked.

    The guard comes first (see `guard`); the generation lock then waits for every append whose hook
    writes into the live generation and holds off the next ones; the checkpoint row lock waits for the
    runner's batch in flight and holds off the next one.
    """
    name = projection.name
    await guard(conn, name, projection)
    await conn.execute(sql.HOLD_GENERATION, lease_key("inline", name))
    state = StoredCheckpoint.of(await conn.fetchrow(sql.LOCK_CHECKPOINT, name))
    return state, await conn.fetchrow(sql.LOCK_REBUILD, name)


async def go_live(
    conn: Connection,
    projection: Projection,
    generation: int,
    view_schema: str,
    previous: StoredCheckpoint,
    checkpoint: Checkpoint,
) -> None:
    """Make `generation`, built up to `checkpoint`, the live one, and drop the one it replaces.

    Inside the caller's transaction, after `hold_for_swap` (which returned `previous`).
    """
    name = projection.name
    tables = [t.name for t in projection.read_model]
    await publish(conn, view_schema, name, generation, tables, previous.tables)
    await conn.execute(sql.drop_schema(schema_for(name, previous.generation)))
    await conn.execute(
        sql.SWAP, name, generation, projection.version, mode_of(projection), tables, checkpoint[0], checkpoint[1],
        projection.partitions, projection.partition_key,
    )
    await conn.execute(sql.DELETE_PARTITIONS, name)
    await conn.execute(sql.INSERT_PARTITIONS, name, projection.partitions, checkpoint[0], checkpoint[1])


async def guard(conn: Connection, name: str, projection: Projection | None) -> None:
    """Make the events table refuse what `projection` handles unless its hook runs (None: drop the guard).

    Call it first in the transaction that makes a generation of `name` live, before HOLD_GENERATION:
    changing a trigger locks the events table until commit, which waits for the appends in flight and
    holds off new ones, so none can slip past both the old guard and the new one. Unchanged, it costs
    one catalog lookup and locks nothing.
    """
    schema = str(await conn.fetchval(sql.EVENTS_SCHEMA))
    current = await conn.fetchval(sql.GUARD_ARGUMENTS, sql.guard_name(name), schema)
    wanted = None
    if projection is not None and projection.inline:
        wanted = b"".join(a.encode() + b"\x00" for a in (name, *projection.event_types))
    if current == wanted:
        return
    if current is not None:
        await conn.execute(sql.drop_guard(schema, name))
    if projection is not None and projection.inline:
        await conn.execute(sql.create_guard(schema, name, projection.event_types))


async def ensure(
    conn: Connection, projection: Projection, search_path: str, view_schema: str, keyring: Keyring
) -> StoredCheckpoint:
    """Create the projection's checkpoint row and first generation of tables if they do not exist yet.

    An inline projection is filled from the whole log here, in the same transaction, after its guard is
    in place: from then on every append of the events it handles runs its hook or is refused.
    """
    tables = [t.name for t in projection.read_model]
    async with conn.transaction():
        if projection.inline:
            stored = await conn.fetchrow(sql.SELECT_CHECKPOINT, projection.name)
            if stored is None or StoredCheckpoint.of(stored).mismatch(projection) is None:
                await guard(conn, projection.name, projection)
        await conn.execute(sql.HOLD_GENERATION, lease_key("inline", projection.name))
        created = await conn.fetchval(
            sql.INSERT_CHECKPOINT, projection.name, mode_of(projection), projection.version, tables,
            projection.partitions, projection.partition_key,
        )
        if created is not None:
            await create_generation(conn, projection, 1, search_path)
            await publish(conn, view_schema, projection.name, 1, tables, [])
            await conn.execute(sql.INSERT_PARTITIONS, projection.name, projection.partitions, *START)
            if projection.inline:
                await use_generation(conn, projection.name, 1, search_path)
                end, _ = await apply_committed(conn, projection, START, 1000, keyring)
                await conn.execute(sql.RESTORE_SEARCH_PATH, search_path)
                await conn.execute(
                    sql.SWAP, projection.name, 1, projection.version, "inline", tables, end[0], end[1], 1, None
                )
        row = await conn.fetchrow(sql.SELECT_CHECKPOINT, projection.name)
    return StoredCheckpoint.of(row)


class BatchLimit:
    """How many events the next batch of a projection takes: `size`, or one while a failure is looked for.

    A batch whose handler fails does not say which event it failed at, so the events it held are then
    applied one per transaction: those before the failing event commit, and the failing event fails
    alone, where it can be recorded. A batch that comes back empty ends the search: the events it was
    about are no longer ahead (a rebuild or a reset moved the checkpoint past them).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._left = 0  # events still to take one at a time

    @property
    def next(self) -> int:
        return 1 if self._left else self.size

    @property
    def searching(self) -> bool:
        return self._left > 0

    def failed(self) -> bool:
        """A batch of `next` events failed. True: try them one at a time. False: that one event failed."""
        if self.next == 1:
            return False
        self._left = self.size
        return True

    def applied(self, count: int) -> None:
        """A batch of `count` events committed."""
        self._left = max(0, self._left - count) if count else 0


def raise_if_disconnected(failure: HandlerFailed, conn: Connection) -> None:
    """A handler that failed because the connection was lost did not fail: raise the connection error."""
    if isinstance(failure.error, CONNECTION_ERRORS) and conn.is_closed():
        raise failure.error from None


def check_name(value: object) -> str:
    """A projection name given by an operator (looked up by name alone)."""
    if not isinstance(value, str) or not value or not storable_text(value):
        raise InvalidArgument(f"a projection name is a non-empty string without NUL or lone surrogates, got {value!r}")
    return value


async def read_batch(
    conn: Connection, projection: Projection, after: Checkpoint, limit: int, keyring: Keyring,
    head: Checkpoint | None = None,
) -> tuple[list[RecordedEvent], Checkpoint]:
    """The next events the projection handles, and the checkpoint to record once they are applied.

    When fewer than `limit` come back, every handled event up to the head (read before them: pass
    `head` if the caller read it already, as `sql.LOCK_BATCH` does) has been seen, so the checkpoint
    moves to the head: lag then counts only what is really left to do.
    """
    if head is None:
        row = await conn.fetchrow(sql.LOG_HEAD)
        head = None if row is None else Checkpoint(row["log_xid"], row["position"])
    query, types = _read_log(projection)
    events = await keyring.reveal(conn, await fetch_events(conn, query, after[0], after[1], limit, types))
    if len(events) == limit:
        return events, events[-1].checkpoint
    end = events[-1].checkpoint if events else Checkpoint(*after)
    if head is not None:
        end = max(end, head)
    return events, end


def _read_log(projection: Projection) -> tuple[str, str | list[str]]:
    """The query of the projection's next events, and its types' parameter (`$4`)."""
    types = projection.event_types
    return (sql.READ_LOG_OF_TYPE, types[0]) if len(types) == 1 else (sql.READ_LOG, types)


class ReadAhead:
    """The next batch of a projection that is catching up, read on a pooled connection while the runner
    applies the current one: the server reads while the handlers run, instead of one after the other.

    A batch takes it only if it starts where the read-ahead started (same checkpoint, same size). It is
    then exactly what the batch would have read itself: an event that becomes visible later has a log
    transaction id at or above the visibility line the read-ahead saw, so it sorts after every event
    the read-ahead returned. One still waiting for a pooled connection is dropped, never waited for (a
    store without a URL runs the runners on pooled connections too, and a full pool must not stall them).
    """

    def __init__(self, store: EventStore | None, projection: Projection) -> None:
        self._store = store
        """None: nothing is read ahead."""
        self._projection = projection
        self._task: asyncio.Task[tuple[list[RecordedEvent], Checkpoint]] | None = None
        self._key: tuple[Checkpoint, int] | None = None
        self._reading = False

    def start(self, after: Checkpoint, limit: int) -> None:
        self.cancel()
        if self._store is None:
            return
        self._key, self._reading = (Checkpoint(*after), limit), False
        self._task = asyncio.get_running_loop().create_task(self._read(Checkpoint(*after), limit))
        self._task.add_done_callback(_retrieve)

    async def _read(self, after: Checkpoint, limit: int) -> tuple[list[RecordedEvent], Checkpoint]:
        store = self._store
        assert store is not None
        async with store.connection() as conn:
            self._reading = True
            return await read_batch(conn, self._projection, after, limit, store.keyring)

    async def read(
        self, conn: Connection, after: Checkpoint, limit: int, keyring: Keyring, head: Checkpoint | None = None
    ) -> tuple[list[RecordedEvent], Checkpoint]:
        """`read_batch` on `conn`, or the batch read ahead if it is the same; when the batch is full, the
        one after it is read ahead at once, while the caller applies this one.

        A read-ahead that came back short is dropped when the log's head (`head`, read by this batch) has
        moved past it: the events committed since woke the runner while it applied the batch before,
        and that wake-up is spent, so this batch must see them or they wait for the poll interval.
        """
        taken = await self.take(after, limit)
        if taken is not None and len(taken[0]) < limit and head is not None and head > taken[1]:
            taken = None
        if taken is None:
            taken = await read_batch(conn, self._projection, after, limit, keyring, head)
        if len(taken[0]) == limit:
            self.start(taken[1], limit)
        return taken

    async def take(self, after: Checkpoint, limit: int) -> tuple[list[RecordedEvent], Checkpoint] | None:
        """The batch after `after` of `limit` events if it was read ahead (None: read it yourself)."""
        task, key, self._task, self._key = self._task, self._key, None, None
        if task is None:
            return None
        if key != (after, limit) or not (task.done() or self._reading):
            task.cancel()
            return None
        try:
            return await task
        except Exception as exc:  # the batch reads for itself, and meets the error if it lasts
            log.debug("projection %s: read-ahead failed (%s)", self._projection.name, exc)
            return None

    def cancel(self) -> None:
        task, self._task, self._key = self._task, None, None
        if task is not None:
            task.cancel()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # a read-ahead nobody took: its error was not an error of any batch


async def read_partition(
    conn: Connection, projection: Projection, partition: int, after: Checkpoint, limit: int, keyring: Keyring
) -> tuple[list[RecordedEvent], Checkpoint]:
    """`read_batch` for one partition of a partitioned projection."""
    head = await conn.fetchrow(sql.LOG_HEAD)
    document, path = projection.key_path
    rows = await fetch_events(
        conn, sql.READ_PARTITION, after[0], after[1], limit, projection.event_types, projection.partitions, partition,
        document, path,
    )
    events = await keyring.reveal(conn, rows)
    if len(events) == limit:
        return events, events[-1].checkpoint
    end = events[-1].checkpoint if events else Checkpoint(*after)
    if head is not None:
        end = max(end, Checkpoint(head["log_xid"], head["position"]))
    return events, end


async def apply_committed(
    conn: Connection, projection: Projection, after: Checkpoint, limit: int, keyring: Keyring
) -> tuple[Checkpoint, int]:
    """Apply every committed event after `after`, also those behind running transactions (inline only).

    Returns the checkpoint of the last event applied and how many were applied.
    """
    end = Checkpoint(*after)
    count = 0
    while True:
        events = await keyring.reveal(
            conn, await fetch_events(conn, sql.READ_COMMITTED, end[0], end[1], limit, projection.event_types)
        )
        if not events:
            return end, count
        await projection.apply(conn, events)
        end = events[-1].checkpoint
        count += len(events)
        if len(events) < limit:
            return end, count
