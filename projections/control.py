"""Operating declared projections against a store: status, rebuild while serving, reset, resume, drop."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from eventstore import START, Checkpoint, EventStore, InvalidArgument, Keyring, check_int, check_seconds, with_retries
from projections import sql
from projections.errors import (
    ProjectionFailed,
    ProjectionsNotMigrated,
    RebuildInProgress,
    UnknownProjection,
)
from projections.generations import (
    StoredCheckpoint,
    apply_committed,
    check_name,
    connect,
    create_generation,
    disconnect,
    distinct,
    ensure,
    go_live,
    guard,
    hold_for_swap,
    lease_key,
    lease_names,
    mismatch,
    mode_of,
    schema_for,
    session_paths,
    use_generation,
)
from projections.inline import InlineProjections
from projections.projection import Connection, HandlerFailed, Projection
from projections.rebuild import ProgressCallback, ProgressTracker, Rebuild, RebuildProgress
from projections.runner import ProjectionRunner

log = logging.getLogger(__name__)

T = TypeVar("T")


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


class ProjectionAdmin:
    """The operator's handle on the declared projections of an application, bound to a store.

    The runner and the inline hook keep them current (`runner()`, `inline()` build those); this is
    where an operator asks how they stand, rebuilds one from the start while it keeps serving, resets
    one, resumes one that failed, or drops one no longer declared.
    """

    def __init__(self, store: EventStore, projections: Iterable[Projection]) -> None:
        self.store = store
        self.projections = distinct(projections)
        self._by_name = {p.name: p for p in self.projections}

    def get(self, name: str) -> Projection:
        try:
            return self._by_name[check_name(name)]
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
        leases = lease_names(name, row["partitions"])
        active = any(lease_key("run", key) in held for key in leases)
        runner = row["runner"] if active else None
        if row["partitions"] > 1:  # its partitions' owners, each recorded with the partition it runs
            owners = zip(leases, row["partition_runners"] or (), strict=False)
            runner = ", ".join(sorted({r for key, r in owners if r is not None and lease_key("run", key) in held}))
            runner = runner or None
        needs = None if projection is None else mismatch(
            projection, row["mode"], row["version"], row["tables"], row["partitions"], row["partition_key"]
        )
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
            status=row["status"], active=active, runner=runner,
            last_error=row["last_error"], failed_event_id=row["failed_event_id"],
            failed_event_type=row["failed_event_type"], failed_position=row["failed_position"],
            failed_at=row["failed_at"], updated_at=row["updated_at"], needs_rebuild=needs, rebuild=rebuild,
        )

    # -- resume ------------------------------------------------------------------------------------

    async def resume(self, name: str) -> bool:
        """Let a failed projection continue from the failed event (after fixing its handler).

        Returns False if it had not failed. Works by name alone, so an operator needs no declarations.
        """
        check_name(name)
        if await _migrated(self.store.pool.fetchval(sql.RESUME, name)) is not None:
            await self.store.pool.execute(sql.WAKE_RUNNERS)
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
        check_name(name)

        async def drop() -> None:
            async with self._exclusive(name, "drop") as (conn, _, view_schema), conn.transaction():
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

        await self._retrying(f"drop {name}", drop)

    # -- reset -------------------------------------------------------------------------------------

    async def reset(self, name: str) -> None:
        """Empty the projection's tables and start it again from the beginning of the log.

        The runner then replays into the (new, empty) tables in place; readers see them empty until it
        catches up. An inline projection is refilled right here, in the same transaction, which holds
        back appends of the events it handles until it is done. Use `rebuild` to keep serving instead.
        """
        projection = self.get(name)
        await self._retrying(f"reset {name}", lambda: self._reset(projection))

    async def _reset(self, projection: Projection) -> None:
        name = projection.name
        async with self._exclusive(name, "reset") as (conn, search_path, view_schema):
            await _ensure(conn, projection, search_path, view_schema, self.store.keyring)
            async with conn.transaction():
                state, abandoned = await hold_for_swap(conn, projection)
                if abandoned is not None:
                    await conn.execute(sql.drop_schema(schema_for(name, abandoned["generation"])))
                    await conn.execute(sql.DELETE_REBUILD, name)
                generation = state.generation + 1
                await create_generation(conn, projection, generation, search_path)
                end = START
                if projection.inline:
                    await use_generation(conn, name, generation, search_path)
                    try:
                        end, _ = await apply_committed(conn, projection, START, 1000, self.store.keyring)
                    except HandlerFailed as failure:
                        raise ProjectionFailed.at(name, failure.event, failure.error) from failure.error
                    await conn.execute(sql.RESTORE_SEARCH_PATH, search_path)
                await go_live(conn, projection, generation, view_schema, state, end)

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
        check_int("batch_size", batch_size, 1)
        check_seconds("progress_interval", progress_interval, zero=True)  # 0: report every batch
        if progress is not None and not callable(progress):
            raise InvalidArgument(f"progress must be a callable taking a RebuildProgress, got {progress!r}")
        tracker = ProgressTracker(name, progress, progress_interval)
        fresh = [restart]
        await self.store.refresh_statistics()  # the rebuild pages through the whole log by type

        async def attempt() -> RebuildProgress:
            restart_now, fresh[0] = fresh[0], False
            async with self._exclusive(name, "rebuild") as (conn, search_path, view_schema):
                await _ensure(conn, projection, search_path, view_schema, self.store.keyring)
                rebuild = Rebuild(
                    conn, projection, search_path, view_schema, batch_size, tracker, self.store.keyring, self.store
                )
                return await rebuild.run(restart_now)

        return await self._retrying(f"rebuild {name}", attempt)

    # -- connections -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self, name: str, purpose: str) -> AsyncIterator[tuple[Connection, str, str]]:
        """A connection of its own holding the projection's rebuild lock, with its search_path and view schema.

        Rebuilds, resets and drops of one projection exclude each other.
        """
        conn = await connect(self.store, f"{purpose} {name}")
        try:
            if not await conn.fetchval(sql.TRY_LOCK, lease_key("rebuild", name)):
                raise RebuildInProgress(name)
            search_path, view_schema = await session_paths(conn)
            yield conn, search_path, view_schema
        finally:
            await disconnect(self.store, conn)

    async def _retrying(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run an operation again after a lost connection: its progress is in the database, so it resumes.

        An attempt that had been working for a second before it failed starts the patience afresh, so a
        long rebuild survives any number of outages that are each shorter than the store's `retry_for`.
        """
        return await with_retries(operation, patience=max(self.store.retry_for, 1.0), what=what, fresh_after=1.0)


async def _migrated(query: Awaitable[T]) -> T:
    try:
        return await query
    except asyncpg.exceptions.UndefinedTableError:
        raise ProjectionsNotMigrated() from None


async def _ensure(
    conn: Connection, projection: Projection, search_path: str, view_schema: str, keyring: Keyring
) -> None:
    try:
        await ensure(conn, projection, search_path, view_schema, keyring)
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
