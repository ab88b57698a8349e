"""Rebuilding a projection while it serves: a new generation of its tables, filled from the log, swapped in.

The current tables keep serving, and the runner keeps them current, until the new ones have caught up;
the swap then happens in one transaction that also moves the checkpoint, so readers go from the old
read model to the new one with nothing lost or applied twice. Progress is recorded with every batch
(`projection_rebuilds`), so an interrupted rebuild resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from eventstore import START, Checkpoint, EventStore, Keyring, RecordedEvent
from projections import sql
from projections.errors import ProjectionError, ProjectionFailed, describe
from projections.generations import (
    BatchLimit,
    ReadAhead,
    StoredCheckpoint,
    apply_committed,
    connect,
    create_generation,
    disconnect,
    go_live,
    hold_for_swap,
    partition_name,
    raise_if_disconnected,
    read_batch,
    read_partition,
    schema_for,
    use_generation,
)
from projections.projection import Connection, HandlerFailed, Projection

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RebuildProgress:
    """How far a rebuild has got; `total` is an estimate (the log may grow while it runs)."""

    name: str
    phase: str  # "building", "swapping" or "done"
    done: int
    total: int
    elapsed: float
    rate: float  # events per second in this run

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, None before there is a rate."""
        if self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate


ProgressCallback = Callable[[RebuildProgress], None]


class ProgressTracker:
    """Turns rebuild progress into `RebuildProgress` calls, at most every `interval` seconds.

    It outlives the attempts of one rebuild (a lost connection starts another), so the rate spans them.
    """

    def __init__(self, name: str, callback: ProgressCallback | None, interval: float) -> None:
        self.name = name
        self.callback = callback
        self.interval = interval
        self.started = time.perf_counter()
        self.first_done: int | None = None
        self.done = 0
        self.remaining_at = (0, 0)  # (done, remaining) when the log was last counted
        self.last_report = 0.0
        self.last_count = 0.0

    def snapshot(self, phase: str) -> RebuildProgress:
        elapsed = time.perf_counter() - self.started
        first = self.first_done if self.first_done is not None else self.done
        rate = (self.done - first) / elapsed if elapsed > 0 else 0.0
        counted_done, remaining = self.remaining_at
        total = max(self.done, counted_done + remaining)
        return RebuildProgress(self.name, phase, self.done, total, elapsed, rate)

    def counted(self, remaining: int) -> None:
        self.remaining_at = (self.done, remaining)
        self.last_count = time.perf_counter()

    def update(self, done: int, phase: str = "building", force: bool = False) -> None:
        if self.first_done is None:
            self.first_done = done
        self.done = done
        now = time.perf_counter()
        if self.callback is not None and (force or now - self.last_report >= self.interval):
            self.last_report = now
            self.callback(self.snapshot(phase))

    def finish(self) -> RebuildProgress:
        self.remaining_at = (self.done, 0)
        final = self.snapshot("done")
        if self.callback is not None:
            self.callback(final)
        return final


class Rebuild:
    """One attempt at rebuilding a projection, on a connection of its own that holds its rebuild lock.

    `search_path` is the connection's own, `view_schema` where the views readers query live.
    """

    def __init__(
        self,
        connection: Connection,
        projection: Projection,
        search_path: str,
        view_schema: str,
        batch_size: int,
        tracker: ProgressTracker,
        keyring: Keyring,
        store: EventStore | None = None,
    ) -> None:
        self.store = store
        """Where the partitions of a partitioned projection get connections of their own to build in parallel."""
        self.connection = connection
        self.projection = projection
        self.search_path = search_path
        self.view_schema = view_schema
        self.batch_size = batch_size
        self.tracker = tracker
        self.keyring = keyring
        self.generation = 0
        self.checkpoint = START
        self.done = 0
        """Events applied to the new generation, also by earlier attempts."""
        self._built = 0  # by the partitions building in parallel, so far

    async def run(self, restart: bool) -> RebuildProgress:
        """Build, then swap; a swap that fails builds again, to pin down the failing event."""
        name = self.projection.name
        await self._begin(restart)
        self.tracker.update(self.done, force=True)
        self.tracker.counted(await self._count_left())
        swap_failures = 0
        while True:
            await self._build()
            self.tracker.update(self.done, "swapping", force=True)
            try:
                await self._swap()
            except HandlerFailed as failure:
                raise_if_disconnected(failure, self.connection)
                swap_failures += 1
                if swap_failures >= 2:
                    await self._fail(failure)
                continue  # the build loop pins down the failing event
            self.tracker.done = self.done
            log.info("projection %s: rebuilt generation %s with %s events", name, self.generation, self.done)
            return self.tracker.finish()

    async def _begin(self, restart: bool) -> None:
        """Start a rebuild's generation of tables, or pick up the one an interrupted rebuild left."""
        conn, projection, name = self.connection, self.projection, self.projection.name
        tables = [t.name for t in projection.read_model]
        async with conn.transaction():
            state = StoredCheckpoint.of(await conn.fetchrow(sql.SELECT_CHECKPOINT, name))
            row = await conn.fetchrow(sql.LOCK_REBUILD, name)
            if row is not None and (
                restart
                or (self._parallel and (row["log_xid"], row["position"]) == tuple(START))  # see _build_partitions
                or row["version"] != projection.version
                or sorted(row["tables"]) != sorted(tables)
                or row["generation"] != state.generation + 1
            ):
                await conn.execute(sql.drop_schema(schema_for(name, row["generation"])))
                await conn.execute(sql.DELETE_REBUILD, name)
                row = None
            if row is not None:
                log.info("projection %s: resuming the rebuild of generation %s", name, row["generation"])
                self.generation = row["generation"]
                self.checkpoint = Checkpoint(row["log_xid"], row["position"])
                self.done = row["events_done"]
                return
            self.generation = state.generation + 1
            await create_generation(conn, projection, self.generation, self.search_path)
            await conn.execute(sql.INSERT_REBUILD, name, self.generation, projection.version, tables)
            self.checkpoint, self.done = START, 0

    @property
    def _parallel(self) -> bool:
        return self.projection.partitions > 1 and self.store is not None and self.store.url is not None

    async def _build_partitions(self) -> None:
        """Fill the new generation up to the log's head now, every partition at once on a connection of its own.

        Partitions hold disjoint streams (keys), so each applies its events in log order and the
        result is what one pass over the log would give. Their progress is recorded once all are at
        the head: an attempt interrupted before then starts the generation over (`_begin`), since
        only a whole pass says which events the tables hold. `_build` goes on from the head.
        """
        head = await self.connection.fetchrow(sql.LOG_HEAD)
        if head is None:
            return
        target = Checkpoint(head["log_xid"], head["position"])
        self._built = 0
        try:
            async with asyncio.TaskGroup() as group:
                for partition in range(self.projection.partitions):
                    group.create_task(self._build_partition(partition, target))
        except ExceptionGroup as errors:
            # One error for the caller, as from the single pass: a handler's failure is recorded, anything
            # else (a lost connection, which `_retrying` runs the rebuild again after) is raised as it is.
            first = _first(errors)
            if isinstance(first, HandlerFailed):
                await self._fail(first)
            raise first from None
        await self.connection.execute(sql.ADVANCE_REBUILD, self.projection.name, target[0], target[1], self._built)
        self.checkpoint = target
        self.done += self._built
        self.tracker.update(self.done)

    async def _build_partition(self, partition: int, target: Checkpoint) -> None:
        assert self.store is not None
        projection, name = self.projection, self.projection.name
        conn = await connect(self.store, f"rebuild {partition_name(name, partition)}")
        after = START
        batches = BatchLimit(self.batch_size)  # a batch that fails is retried one event at a time, as in `_build`
        try:
            while True:
                limit = batches.next
                try:
                    async with conn.transaction():
                        await use_generation(conn, name, self.generation, self.search_path)
                        events, _ = await read_partition(conn, projection, partition, after, limit, self.keyring)
                        mine: list[RecordedEvent] = [e for e in events if e.checkpoint <= target]
                        await projection.apply(conn, mine)
                except HandlerFailed as failure:
                    raise_if_disconnected(failure, conn)
                    if batches.failed():
                        continue
                    raise
                self._built += len(mine)
                self.tracker.update(self.done + self._built)
                batches.applied(len(mine))
                if len(mine) < limit and not batches.searching:
                    return
                if mine:
                    after = mine[-1].checkpoint
        finally:
            await disconnect(self.store, conn)

    async def _build(self) -> None:
        """Fill the new generation batch by batch until a batch comes back short (nearly caught up)."""
        conn, projection, name = self.connection, self.projection, self.projection.name
        if self._parallel and self.checkpoint == START:
            await self._build_partitions()
        batches = BatchLimit(self.batch_size)
        ahead = ReadAhead(self.store, projection)
        try:
            while True:
                limit = batches.next
                try:
                    async with conn.transaction():
                        await use_generation(conn, name, self.generation, self.search_path)
                        events, end = await ahead.read(conn, self.checkpoint, limit, self.keyring)
                        await projection.apply(conn, events, defer=True)
                        if end != self.checkpoint:
                            await conn.execute(sql.ADVANCE_REBUILD, name, end[0], end[1], len(events))
                except HandlerFailed as failure:
                    raise_if_disconnected(failure, conn)
                    if batches.failed():
                        continue
                    await self._fail(failure)
                self.checkpoint = end
                self.done += len(events)
                if time.perf_counter() - self.tracker.last_count > 10:
                    self.tracker.counted(await self._count_left())
                self.tracker.update(self.done)
                batches.applied(len(events))
                if len(events) < limit and not batches.searching:
                    return
        finally:
            ahead.cancel()

    async def _swap(self) -> None:
        """Apply the last few events and make the new generation the live one, in one transaction.

        Under the locks of `hold_for_swap` no runner batch is in flight, and for an inline projection no
        append is between writing its events and running its hook, so the last few events can be read
        from the log even behind transactions still running: the appends that have not run their hook
        yet will write into the new generation.
        """
        conn, projection, name = self.connection, self.projection, self.projection.name
        async with conn.transaction():
            state, row = await hold_for_swap(conn, projection)
            if row is None or row["generation"] != self.generation:
                raise ProjectionError(f"the rebuild of projection {name!r} was abandoned (reset meanwhile?)")
            await use_generation(conn, name, self.generation, self.search_path)
            checkpoint, done = self.checkpoint, self.done
            if projection.inline:
                checkpoint, count = await apply_committed(conn, projection, checkpoint, self.batch_size, self.keyring)
                done += count
            else:
                while True:
                    events, checkpoint = await read_batch(conn, projection, checkpoint, self.batch_size, self.keyring)
                    await projection.apply(conn, events)
                    done += len(events)
                    if len(events) < self.batch_size:
                        break
            await conn.execute(sql.RESTORE_SEARCH_PATH, self.search_path)
            await go_live(conn, projection, self.generation, self.view_schema, state, checkpoint)
            await conn.execute(sql.DELETE_REBUILD, name)
        self.done = done  # only once the swap has committed

    async def _count_left(self) -> int:
        checkpoint = self.checkpoint
        return int(await self.connection.fetchval(
            sql.COUNT_LOG, checkpoint[0], checkpoint[1], self.projection.event_types
        ))

    async def _fail(self, failure: HandlerFailed) -> NoReturn:
        name = self.projection.name
        await self.connection.execute(sql.FAIL_REBUILD, name, describe(failure.error))
        raise ProjectionFailed.at(name, failure.event, failure.error) from failure.error


def _first(errors: BaseExceptionGroup[Exception]) -> Exception:
    """The error of a group to raise alone: a handler's failure if there is one, else the first error."""
    leaves: list[Exception] = []
    pending: list[BaseException] = [errors]
    while pending:
        error = pending.pop(0)
        if isinstance(error, BaseExceptionGroup):
            pending[:0] = error.exceptions
        elif isinstance(error, Exception):
            leaves.append(error)
    failed = [e for e in leaves if isinstance(e, HandlerFailed)]
    return (failed or leaves)[0]
