"""Operating declared projections against a store: status, rebuild while serving, reset, resume."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from eventstore import CONNECTION_ERRORS, START, Checkpoint, DatabaseUnavailable, EventStore, InvalidArgument
from projections import sql
from projections.errors import (
    InvalidProjection,
    ProjectionError,
    ProjectionFailed,
    ProjectionsNotMigrated,
    RebuildInProgress,
    UnknownProjection,
    describe,
)
from projections.generations import (
    StoredCheckpoint,
    apply_committed,
    connect,
    create_generation,
    disconnect,
    ensure,
    guard,
    lease_key,
    mismatch,
    mode_of,
    publish,
    read_batch,
    schema_for,
    session_paths,
    use_generation,
)
from projections.inline import InlineProjections
from projections.projection import Connection, HandlerFailed, Projection
from projections.runner import ProjectionRunner

log = logging.getLogger(__name__)

T = TypeVar("T")


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


@dataclass(frozen=True, slots=True)
class RebuildStatus:
    generation: int
    version: int
    checkpoint: Checkpoint
    events_done: int
    last_error: str | None
    active: bool
    started_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """Where a projection stands. `state` is one of: running, stopped, failed, needs rebuild, inline,
    not started. `lag` is the number of events in the log after its checkpoint."""

    name: str
    state: str
    mode: str
    declared: bool
    version: int | None
    declared_version: int | None
    generation: int | None
    tables: list[str]
    checkpoint: Checkpoint | None
    lag: int | None
    status: str | None
    active: bool
    runner: str | None
    last_error: str | None
    failed_event_id: UUID | None
    failed_event_type: str | None
    failed_position: int | None
    failed_at: datetime | None
    updated_at: datetime | None
    needs_rebuild: str | None
    rebuild: RebuildStatus | None


class _Tracker:
    """Turns rebuild progress into `RebuildProgress` calls, at most every `interval` seconds."""

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


class Projections:
    """The declared projections of an application, bound to a store.

    The runner and the inline hook keep them current; this is where an operator asks how they stand,
    rebuilds one from the start while it keeps serving, resets one, or resumes one that failed.
    """

    def __init__(self, store: EventStore, projections: Iterable[Projection]) -> None:
        self.store = store
        self.projections = list(projections)
        for projection in self.projections:
            if not isinstance(projection, Projection):
                raise InvalidProjection(f"expected Projection instances, got {type(projection).__name__}")
        names = [p.name for p in self.projections]
        if len(set(names)) != len(names):
            raise InvalidProjection(f"projection names must be unique, got {names}")
        self._by_name = {p.name: p for p in self.projections}

    def get(self, name: str) -> Projection:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownProjection(name, list(self._by_name)) from None

    def runner(self, names: Iterable[str] | None = None, **options: Any) -> ProjectionRunner:
        """A runner for the asynchronous projections (or those of `names`)."""
        chosen = [self.get(n) for n in names] if names is not None else self.projections
        return ProjectionRunner(self.store, [p for p in chosen if not p.inline], **options)

    def inline(self) -> InlineProjections:
        return InlineProjections(self.store, [p for p in self.projections if p.inline])

    # -- status ------------------------------------------------------------------------------------

    async def status(self) -> list[ProjectionStatus]:
        """Every projection declared here or recorded in the database, by name."""
        pool = self.store.pool
        rows = await _migrated(pool.fetch(sql.STATUS))
        held = {r["key"] for r in await pool.fetch(sql.HELD_LOCKS)}
        result: list[ProjectionStatus] = []
        for row in rows:
            result.append(await self._status_of(row, held))
        recorded = {r["name"] for r in rows}
        for projection in self.projections:
            if projection.name not in recorded:
                result.append(_not_started(projection))
        return sorted(result, key=lambda s: s.name)

    async def _status_of(self, row: Any, held: set[int]) -> ProjectionStatus:
        name = row["name"]
        projection = self._by_name.get(name)
        checkpoint = Checkpoint(row["log_xid"], row["position"])
        active = lease_key("run", name) in held
        needs = None if projection is None else mismatch(projection, row["mode"], row["version"], row["tables"])
        inline = row["mode"] == "inline"
        lag = 0 if inline else await self.store.count_after(checkpoint)
        if row["status"] == "failed":
            state = "failed"
        elif needs is not None:
            state = "needs rebuild"
        elif inline:
            state = "inline"
        else:
            state = "running" if active else "stopped"
        rebuild = None
        if row["rebuild_generation"] is not None:
            rebuild = RebuildStatus(
                generation=row["rebuild_generation"],
                version=row["rebuild_version"],
                checkpoint=Checkpoint(row["rebuild_log_xid"], row["rebuild_position"]),
                events_done=row["rebuild_events_done"],
                last_error=row["rebuild_last_error"],
                active=lease_key("rebuild", name) in held,
                started_at=row["rebuild_started_at"],
                updated_at=row["rebuild_updated_at"],
            )
        return ProjectionStatus(
            name=name, state=state, mode=row["mode"], declared=projection is not None, version=row["version"],
            declared_version=None if projection is None else projection.version,
            generation=row["generation"], tables=list(row["tables"]), checkpoint=checkpoint, lag=lag,
            status=row["status"], active=active, runner=row["runner"] if active else None,
            last_error=row["last_error"], failed_event_id=row["failed_event_id"],
            failed_event_type=row["failed_event_type"], failed_position=row["failed_position"],
            failed_at=row["failed_at"], updated_at=row["updated_at"], needs_rebuild=needs, rebuild=rebuild,
        )

    # -- resume ------------------------------------------------------------------------------------

    async def resume(self, name: str) -> bool:
        """Let a failed projection continue from the failed event (after fixing its handler).

        Returns False if it had not failed. Works by name alone, so an operator needs no declarations.
        """
        if await _migrated(self.store.pool.fetchval(sql.RESUME, name)) is not None:
            return True
        if await self.store.pool.fetchrow(sql.SELECT_CHECKPOINT, name) is None:
            known = [r["name"] for r in await self.store.pool.fetch(sql.STATUS)]
            raise UnknownProjection(name, known)
        return False

    async def drop(self, name: str) -> None:
        """Remove a projection the application no longer declares: its tables, views, checkpoint and guard.

        Works by name alone. Stop its runners first (a running one would create it again); an inline
        projection's guard goes with it, so its events can be appended again by any process.
        """

        async def drop() -> None:
            conn = await connect(self.store, f"drop {name}")
            try:
                if not await conn.fetchval(sql.TRY_LOCK, lease_key("rebuild", name)):
                    raise RebuildInProgress(name)
                _, view_schema = await session_paths(conn)
                async with conn.transaction():
                    await guard(conn, name, None)
                    await conn.execute(sql.HOLD_GENERATION, lease_key("inline", name))
                    row = await conn.fetchrow(sql.LOCK_CHECKPOINT, name)
                    if row is None:
                        known = [r["name"] for r in await conn.fetch(sql.STATUS)]
                        raise UnknownProjection(name, known)
                    state = StoredCheckpoint.of(row)
                    rebuild = await conn.fetchrow(sql.LOCK_REBUILD, name)
                    for table in state.tables:
                        await conn.execute(sql.drop_view(view_schema, table))
                    for generation in (state.generation, None if rebuild is None else rebuild["generation"]):
                        if generation is not None:
                            await conn.execute(sql.drop_schema(schema_for(name, generation)))
                    await conn.execute(sql.DELETE_CHECKPOINT, name)
            finally:
                await disconnect(self.store, conn)

        await self._with_reconnects(drop)

    # -- reset -------------------------------------------------------------------------------------

    async def reset(self, name: str) -> None:
        """Empty the projection's tables and start it again from the beginning of the log.

        The runner then replays into the (new, empty) tables in place; readers see them empty until it
        catches up. An inline projection is refilled right here, in the same transaction, which holds
        back appends of the events it handles until it is done. Use `rebuild` to keep serving instead.
        """
        projection = self.get(name)
        await self._with_reconnects(lambda: self._reset(projection))

    @contextlib.asynccontextmanager
    async def _exclusive(self, projection: Projection, purpose: str) -> AsyncIterator[tuple[Connection, str, str]]:
        """A connection of its own holding the projection's rebuild lock: rebuilds and resets exclude each other."""
        conn = await connect(self.store, f"{purpose} {projection.name}")
        try:
            if not await conn.fetchval(sql.TRY_LOCK, lease_key("rebuild", projection.name)):
                raise RebuildInProgress(projection.name)
            search_path, view_schema = await session_paths(conn)
            await _ensure(conn, projection, search_path, view_schema)
            yield conn, search_path, view_schema
        finally:
            await disconnect(self.store, conn)

    async def _reset(self, projection: Projection) -> None:
        name = projection.name
        async with self._exclusive(projection, "reset") as (conn, search_path, view_schema):
            tables = [t.name for t in projection.read_model]
            async with conn.transaction():
                await guard(conn, name, projection)
                await conn.execute(sql.HOLD_GENERATION, lease_key("inline", name))
                state = StoredCheckpoint.of(await conn.fetchrow(sql.LOCK_CHECKPOINT, name))
                abandoned = await conn.fetchrow(sql.LOCK_REBUILD, name)
                if abandoned is not None:
                    await conn.execute(sql.drop_schema(schema_for(name, abandoned["generation"])))
                    await conn.execute(sql.DELETE_REBUILD, name)
                generation = state.generation + 1
                await create_generation(conn, projection, generation, search_path)
                end = START
                if projection.inline:
                    await use_generation(conn, name, generation, search_path)
                    try:
                        end, _ = await apply_committed(conn, projection, START, 1000)
                    except HandlerFailed as failure:
                        raise ProjectionFailed.at(name, failure.event, failure.error) from failure.error
                    await conn.execute(sql.RESTORE_SEARCH_PATH, search_path)
                await publish(conn, view_schema, name, generation, tables, state.tables)
                await conn.execute(sql.drop_schema(schema_for(name, state.generation)))
                await conn.execute(
                    sql.SWAP, name, generation, projection.version, mode_of(projection), tables, end[0], end[1]
                )

    # -- rebuild -----------------------------------------------------------------------------------

    async def rebuild(
        self,
        name: str,
        *,
        progress: ProgressCallback | None = None,
        batch_size: int = 1000,
        restart: bool = False,
        progress_interval: float = 0.25,
    ) -> RebuildProgress:
        """Build the projection from the start of the log into new tables, then swap them in.

        The current tables keep serving, and the runner keeps them current, until the new ones have
        caught up; the swap then happens in one transaction that also moves the checkpoint, so readers
        go from the old read model to the new one with nothing lost or applied twice. An interrupted
        rebuild resumes where it stopped (`restart=True` starts it over). Raises `RebuildInProgress`
        if another process is rebuilding it, `ProjectionFailed` if a handler fails.
        """
        projection = self.get(name)
        if batch_size <= 0:
            raise InvalidArgument("batch_size must be positive")
        tracker = _Tracker(name, progress, progress_interval)
        fresh = [restart]

        async def attempt() -> RebuildProgress:
            restart_now, fresh[0] = fresh[0], False
            return await self._rebuild(projection, tracker, batch_size, restart_now)

        return await self._with_reconnects(attempt)

    async def _rebuild(
        self, projection: Projection, tracker: _Tracker, batch_size: int, restart: bool
    ) -> RebuildProgress:
        name = projection.name
        async with self._exclusive(projection, "rebuild") as (conn, search_path, view_schema):
            generation, checkpoint, done = await self._begin(conn, projection, search_path, restart)
            tracker.update(done, force=True)
            tracker.counted(await conn.fetchval(sql.COUNT_LOG, checkpoint[0], checkpoint[1], projection.event_types))
            swap_failures = 0
            while True:
                checkpoint, done = await self._build(
                    conn, projection, generation, checkpoint, done, search_path, batch_size, tracker
                )
                tracker.update(done, "swapping", force=True)
                try:
                    done = await self._swap(
                        conn, projection, generation, checkpoint, done, search_path, view_schema, batch_size
                    )
                except HandlerFailed as failure:
                    if isinstance(failure.error, CONNECTION_ERRORS) and conn.is_closed():
                        raise failure.error from None
                    swap_failures += 1
                    if swap_failures >= 2:
                        await conn.execute(sql.FAIL_REBUILD, name, describe(failure.error))
                        raise ProjectionFailed.at(name, failure.event, failure.error) from failure.error
                    continue  # the build loop pins down the failing event
                tracker.done = done
                log.info("projection %s: rebuilt generation %s with %s events", name, generation, done)
                return tracker.finish()

    async def _begin(
        self, conn: Connection, projection: Projection, search_path: str, restart: bool
    ) -> tuple[int, Checkpoint, int]:
        """Start a rebuild's generation of tables, or pick up the one an interrupted rebuild left."""
        name = projection.name
        tables = [t.name for t in projection.read_model]
        async with conn.transaction():
            state = StoredCheckpoint.of(await conn.fetchrow(sql.SELECT_CHECKPOINT, name))
            row = await conn.fetchrow(sql.LOCK_REBUILD, name)
            if row is not None and (
                restart
                or row["version"] != projection.version
                or sorted(row["tables"]) != sorted(tables)
                or row["generation"] != state.generation + 1
            ):
                await conn.execute(sql.drop_schema(schema_for(name, row["generation"])))
                await conn.execute(sql.DELETE_REBUILD, name)
                row = None
            if row is not None:
                log.info("projection %s: resuming the rebuild of generation %s", name, row["generation"])
                return row["generation"], Checkpoint(row["log_xid"], row["position"]), row["events_done"]
            generation = state.generation + 1
            await create_generation(conn, projection, generation, search_path)
            await conn.execute(sql.INSERT_REBUILD, name, generation, projection.version, tables)
            return generation, START, 0

    async def _build(
        self,
        conn: Connection,
        projection: Projection,
        generation: int,
        checkpoint: Checkpoint,
        done: int,
        search_path: str,
        batch_size: int,
        tracker: _Tracker,
    ) -> tuple[Checkpoint, int]:
        """Fill the new generation batch by batch until a batch comes back short (nearly caught up)."""
        name = projection.name
        careful = 0  # after a failed batch, one event per transaction to find the failing event
        while True:
            limit = 1 if careful else batch_size
            try:
                async with conn.transaction():
                    await use_generation(conn, name, generation, search_path)
                    events, end = await read_batch(conn, projection, checkpoint, limit)
                    await projection.apply(conn, events)
                    if end != checkpoint:
                        await conn.execute(sql.ADVANCE_REBUILD, name, end[0], end[1], len(events))
            except HandlerFailed as failure:
                if isinstance(failure.error, CONNECTION_ERRORS) and conn.is_closed():
                    raise failure.error from None
                if limit > 1:
                    careful = limit
                    continue
                await conn.execute(sql.FAIL_REBUILD, name, describe(failure.error))
                raise ProjectionFailed.at(name, failure.event, failure.error) from failure.error
            checkpoint = end
            done += len(events)
            if time.perf_counter() - tracker.last_count > 10:
                tracker.counted(await conn.fetchval(sql.COUNT_LOG, end[0], end[1], projection.event_types))
            tracker.update(done)
            if careful:
                careful = max(0, careful - len(events)) if events else 0
            if len(events) < limit and not careful:
                return checkpoint, done

    async def _swap(
        self,
        conn: Connection,
        projection: Projection,
        generation: int,
        checkpoint: Checkpoint,
        done: int,
        search_path: str,
        view_schema: str,
        batch_size: int,
    ) -> int:
        """Apply the last few events and make the new generation the live one, in one transaction.

        Locking the checkpoint row waits for the runner's batch in flight and holds off the next one; for
        an inline projection, the generation lock waits for every append whose hook has written into the
        old generation and holds off the next ones, so the last few events can be read from the log
        even behind transactions still running: the appends that have not run their hook yet will write
        into the new generation.
        """
        name = projection.name
        tables = [t.name for t in projection.read_model]
        async with conn.transaction():
            await guard(conn, name, projection)
            await conn.execute(sql.HOLD_GENERATION, lease_key("inline", name))
            state = StoredCheckpoint.of(await conn.fetchrow(sql.LOCK_CHECKPOINT, name))
            row = await conn.fetchrow(sql.LOCK_REBUILD, name)
            if row is None or row["generation"] != generation:
                raise ProjectionError(f"the rebuild of projection {name!r} was abandoned (reset meanwhile?)")
            await use_generation(conn, name, generation, search_path)
            if projection.inline:
                checkpoint, count = await apply_committed(conn, projection, checkpoint, batch_size)
                done += count
            else:
                while True:
                    events, checkpoint = await read_batch(conn, projection, checkpoint, batch_size)
                    await projection.apply(conn, events)
                    done += len(events)
                    if len(events) < batch_size:
                        break
            await conn.execute(sql.RESTORE_SEARCH_PATH, search_path)
            await publish(conn, view_schema, name, generation, tables, state.tables)
            await conn.execute(sql.drop_schema(schema_for(name, state.generation)))
            await conn.execute(
                sql.SWAP, name, generation, projection.version, mode_of(projection), tables,
                checkpoint[0], checkpoint[1],
            )
            await conn.execute(sql.DELETE_REBUILD, name)
        return done

    # -- connections -------------------------------------------------------------------------------

    async def _with_reconnects(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Retry an operation whose connection was lost; its progress is in the database, so it resumes."""
        loop = asyncio.get_running_loop()
        patience = max(self.store.retry_for, 1.0)
        streak_started: float | None = None
        delay = 0.05
        while True:
            started = loop.time()
            try:
                return await operation()
            except CONNECTION_ERRORS as exc:
                now = loop.time()
                if streak_started is None or now - started > 1.0:  # it had been working: a new streak
                    streak_started, delay = started, 0.05
                if now - streak_started + delay > patience:
                    raise DatabaseUnavailable(f"PostgreSQL unavailable: {exc}") from exc
                log.warning("connection lost (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


async def _migrated(query: Awaitable[T]) -> T:
    try:
        return await query
    except asyncpg.exceptions.UndefinedTableError:
        raise ProjectionsNotMigrated() from None


async def _ensure(conn: Connection, projection: Projection, search_path: str, view_schema: str) -> None:
    try:
        await ensure(conn, projection, search_path, view_schema)
    except HandlerFailed as failure:
        raise ProjectionFailed.at(projection.name, failure.event, failure.error) from failure.error


def _not_started(projection: Projection) -> ProjectionStatus:
    return ProjectionStatus(
        name=projection.name, state="not started", mode=mode_of(projection), declared=True, version=None,
        declared_version=projection.version, generation=None, tables=[t.name for t in projection.read_model],
        checkpoint=None, lag=None, status=None, active=False, runner=None, last_error=None,
        failed_event_id=None, failed_event_type=None, failed_position=None, failed_at=None, updated_at=None,
        needs_rebuild=None, rebuild=None,
    )
