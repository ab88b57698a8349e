"""The runner of asynchronous projections (Marten's async daemon): batches from a checkpoint, one owner each.

Several runner processes may run the same projections. Each projection is owned by whichever runner
holds its session-level advisory lock; the lock lives on the connection that also does the projection's
work, so a runner that dies (even by SIGKILL) loses the lock and its open transaction together, and
another runner takes over within `lease_interval` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import math
import time
from collections.abc import Iterable

from eventstore import (
    CONNECTION_ERRORS,
    NOTIFY_CHANNEL,
    Backoff,
    Checkpoint,
    DatabaseUnavailable,
    EventStore,
    InvalidArgument,
    check_int,
    check_seconds,
)
from projections import sql, telemetry
from projections.errors import (
    InvalidProjection,
    ProjectionError,
    ProjectionFailed,
    ProjectionNeedsRebuild,
    describe,
)
from projections.generations import (
    BatchLimit,
    ReadAhead,
    StoredCheckpoint,
    connect,
    disconnect,
    distinct,
    ensure,
    lease_key,
    mismatch,
    partition_name,
    raise_if_disconnected,
    read_partition,
    runner_identity,
    schema_for,
    session_paths,
    use_generation,
)
from projections.projection import Connection, HandlerFailed, Projection

log = logging.getLogger(__name__)

_RETRYABLE: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, DatabaseUnavailable)


class _Outcome(enum.Enum):
    MORE = "more"  # a full batch: there may be more right away
    IDLE = "idle"  # caught up: wait for a notification
    HELD = "held"  # caught up with what the log shows, but committed events are held back: look again soon
    FAILED = "failed"  # stopped at a failed event until resumed or rebuilt
    MISMATCH = "mismatch"  # the stored tables belong to another declaration: leave it to another runner
    YIELD = "yield"  # more than a fair share of a projection's partitions: hand this one to another runner


class ProjectionRunner:
    """Keeps asynchronous projections current. Use as `async with ProjectionRunner(store, [...]) as runner:`.

    Each batch is one transaction on the owner's connection: lock the checkpoint row, read the next
    events (or take those read ahead on a pooled connection while the batch before was applied, when
    they start at the locked checkpoint), run the handlers, move the checkpoint. A kill at any point
    rolls the whole batch back, so every event takes effect exactly once. A failing handler stops only
    its projection, with the event and error recorded in its status.

    Keep batches short (`batch_size` times the handlers' time per event): while a batch transaction
    is open it holds back what every reader of the global log can see, cluster-wide.
    """

    def __init__(
        self,
        store: EventStore,
        projections: Iterable[Projection],
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        lease_interval: float = 1.0,
        label: str | None = None,
    ) -> None:
        check_int("batch_size", batch_size, 1)
        check_seconds("poll_interval", poll_interval)
        check_seconds("lease_interval", lease_interval)
        self.store = store
        self.projections = distinct(projections)
        for projection in self.projections:
            if projection.inline:
                raise InvalidProjection(
                    f"projection {projection.name!r} is inline: attach it with InlineProjections, not a runner"
                )
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease_interval = lease_interval
        self.identity = runner_identity(label)
        self._workers = [w for p in self.projections for w in _workers_of(self, p)]
        presences = {id(w.presence): w.presence for w in self._workers if isinstance(w, _PartitionWorker)}
        self._presences = list(presences.values())
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._started = False
        """From `start` until `stop` has finished: a second `start` meanwhile is refused."""
        self._epoch = 0
        """Counts starts and stops: a start that a stop overtook (while it prepared) starts nothing."""
        self._stopped = asyncio.Event()
        self._stopped.set()
        """Clear while a `stop` is under way: a `start` meanwhile waits for it."""

    async def start(self) -> None:
        """Create missing checkpoint rows and tables, then start competing for every projection.

        A store with a URL gives the runner connections of its own; one built on a pool must leave the
        pool a connection besides all those the runner may hold (`InvalidArgument` otherwise): a
        runner that took them all would stall every append. A runner started already (and not stopped
        since) is refused with `ProjectionError`; one being stopped is started once the stop is done.
        """
        await self._stopped.wait()
        if self._started:
            raise ProjectionError("the projection runner is already started: stop it before starting it again")
        if self.store.url is None:
            needed, size = _connections_needed(self.projections), self.store.pool.get_max_size()
            if needed >= size:
                raise InvalidArgument(
                    f"the runner may hold {needed} connections and the store's pool has {size}: "
                    "give the pool more, or give the store a database URL"
                )

        async def prepare() -> None:
            async with self.store.pool.acquire() as conn:
                search_path, view_schema = await session_paths(conn)
                for projection in self.projections:
                    await ensure(conn, projection, search_path, view_schema, self.store.keyring)

        self._started, self._stopping = True, False
        self._epoch += 1
        epoch = self._epoch
        try:
            # Creating rows and tables is idempotent: a session killed meanwhile just means doing it again.
            await self.store.retrying(prepare)
            await self.store.refresh_statistics()  # after a bulk load, before paging through it by type
        except BaseException:
            if epoch == self._epoch:
                self._started = False
            raise
        if epoch != self._epoch:
            return  # stopped meanwhile
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(w.run(), name=f"projection {w.projection.name}") for w in self._workers]
        telemetry.watch(self)

    async def stop(self, grace: float = 10.0) -> None:
        """Finish the batches in flight (cancel those still running after `grace` seconds), record the
        projections as stopped and release them; returns once every task the runner started has ended."""
        check_seconds("grace", grace, zero=True)
        if not self._stopped.is_set():  # another stop is under way: it stops everything
            await self._stopped.wait()
            return
        self._stopping = True
        self._epoch += 1
        self._stopped.clear()
        try:
            await self._stop(grace)
        finally:
            self._stopped.set()

    async def _stop(self, grace: float) -> None:
        for worker in self._workers:
            worker.wakeup.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for presence in self._presences:
            await presence.close()
        telemetry.unwatch(self)
        self._started = False

    async def __aenter__(self) -> ProjectionRunner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def owned(self) -> list[str]:
        """Names of the projections this runner holds the lease of now."""
        return [w.label for w in self._workers if w.owned]

    async def wait_caught_up(self, until: Checkpoint | None = None, interval: float = 0.02) -> None:
        """Wait until every projection has processed the log up to `until` (default: every event committed
        now, whether an older transaction still running holds it below the log's visibility line or not).

        Whichever runner owns them. Pass an append's `result.checkpoint` to wait for just that append.
        Raises `ProjectionFailed` if one of them has failed (the others keep running) and
        `ProjectionNeedsRebuild` if the stored tables of one belong to another declaration. Bound the
        wait with `asyncio.timeout`.
        """
        check_seconds("interval", interval)
        head = await self.store.last_committed() if until is None else Checkpoint.of(until)
        names = [p.name for p in self.projections]
        declared = {p.name: p for p in self.projections}
        while True:
            rows = await self.store.pool.fetch(sql.CHECKPOINTS, names)
            for row in rows:
                reason = mismatch(
                    declared[row["name"]], row["mode"], row["version"], row["tables"], row["partitions"],
                    row["partition_key"],
                )
                if reason is not None:
                    raise ProjectionNeedsRebuild(row["name"], reason)
            failed = [r for r in rows if r["status"] == "failed"]
            if failed:
                failure = await self.store.pool.fetchrow(sql.SELECT_CHECKPOINT, failed[0]["name"])
                raise _failure(StoredCheckpoint.of(failure))
            done = [r for r in rows if Checkpoint(r["log_xid"], r["position"]) >= head]
            if len(done) == len(names):
                return
            await asyncio.sleep(interval)


def _failure(state: StoredCheckpoint) -> ProjectionFailed:
    return ProjectionFailed(
        state.name,
        state.last_error or "failed",
        event_id=state.failed_event_id,
        event_type=state.failed_event_type,
        position=state.failed_position,
        log_xid=state.failed_log_xid,
    )


class _Worker:
    """One projection inside one runner: compete for its lease, then process it while holding it."""

    def __init__(self, runner: ProjectionRunner, projection: Projection) -> None:
        self.runner = runner
        self.projection = projection
        self.label = projection.name
        self.key = lease_key("run", projection.name)
        self.owned = False
        self.wakeup = asyncio.Event()
        self._search_path = ""
        self._generation = 0
        self._mismatch: str | None = None
        self._ahead = ReadAhead(runner.store, projection)

    def _notified(self, *_: object) -> None:
        self.wakeup.set()

    async def _pause(self, seconds: float) -> None:
        if self.runner._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wakeup.wait(), seconds)

    async def run(self) -> None:
        sessions = Backoff(limit=2.0, fresh_after=2.0)  # a session that ran for a while had been working
        while not self.runner._stopping:
            started = time.monotonic()
            try:
                await self._session()
            except _RETRYABLE as exc:
                log.warning("projection %s: connection lost (%s); reconnecting", self.projection.name, exc)
            except ProjectionError as exc:
                log.error("projection %s: %s", self.projection.name, exc)
            except Exception:
                log.exception("projection %s: unexpected error; restarting its session", self.projection.name)
            finally:
                self.owned = False
            if self.runner._stopping:
                return
            delay = sessions.failed(time.monotonic() - started)
            self.wakeup.clear()
            await self._pause(delay)

    async def _session(self) -> None:
        """A standby keeps its connection: it takes over within `lease_interval` of the owner's death."""
        conn = await connect(self.runner.store, f"projection {self.label}")
        try:
            await self._prepare(conn)
            while not self.runner._stopping:
                await self._try_to_own(conn)
                self.wakeup.clear()
                await self._pause(self.runner.lease_interval)
        finally:
            await disconnect(self.runner.store, conn)

    async def _prepare(self, conn: Connection) -> None:
        self._search_path, view_schema = await session_paths(conn)
        await ensure(conn, self.projection, self._search_path, view_schema, self.runner.store.keyring)

    async def _try_to_own(self, conn: Connection) -> None:
        """Take the lease if it is free, and run the projection for as long as it is held."""
        if not await conn.fetchval(sql.TRY_LOCK, self.key):
            return
        self.owned = True
        try:
            await self._own(conn)
        finally:
            self.owned = False
            if not conn.is_closed():
                await conn.fetchval(sql.UNLOCK, self.key)

    async def _own(self, conn: Connection) -> None:
        name = self.projection.name
        log.info("projection %s: owned by %s", name, self.runner.identity)
        await conn.add_listener(NOTIFY_CHANNEL, self._notified)
        batches = BatchLimit(self.runner.batch_size)
        held = Backoff.held_back(self.runner.poll_interval)
        try:
            while not self.runner._stopping:
                self.wakeup.clear()
                try:
                    outcome, count = await self._step(conn, batches.next)
                except HandlerFailed as failure:
                    if not batches.failed():
                        await self._fail(conn, failure)
                    continue
                batches.applied(count)
                if outcome in (_Outcome.MISMATCH, _Outcome.YIELD):
                    return
                if outcome is _Outcome.HELD:
                    await self._pause(held.failed())
                    continue
                held.reset()
                if outcome is not _Outcome.MORE:
                    await self._pause(self.runner.poll_interval)
        finally:
            self._ahead.cancel()
            if not conn.is_closed():
                with contextlib.suppress(Exception):
                    await conn.remove_listener(NOTIFY_CHANNEL, self._notified)
                with contextlib.suppress(Exception):
                    await self._release(conn)

    async def _release(self, conn: Connection) -> None:
        """Record the projection as no longer run by this runner."""
        await conn.execute(sql.RELEASE, self.projection.name, self.runner.identity)

    @telemetry.batch
    async def _step(self, conn: Connection, limit: int) -> tuple[_Outcome, int]:
        projection = self.projection
        expected = self._generation or 1
        async with conn.transaction():
            row = await conn.fetchrow(
                sql.LOCK_BATCH, projection.name, schema_for(projection.name, expected), self._search_path
            )
            if row is None:
                raise ProjectionError(f"projection {projection.name!r} has no checkpoint row")
            state = StoredCheckpoint.of(row)
            if state.status == "failed":
                return _Outcome.FAILED, 0
            mismatch = state.mismatch(projection)
            if mismatch is not None:
                if mismatch != self._mismatch:
                    log.warning("projection %s needs a rebuild (%s); leaving it", projection.name, mismatch)
                self._mismatch = mismatch
                return _Outcome.MISMATCH, 0
            self._mismatch = None
            self._generation = state.generation
            if state.generation != expected:
                await use_generation(conn, projection.name, state.generation, self._search_path)
            head = None if row["head_log_xid"] is None else Checkpoint(row["head_log_xid"], row["head_position"])
            keyring = self.runner.store.keyring
            events, end = await self._ahead.read(conn, state.checkpoint, limit, keyring, head)
            try:
                await projection.apply(conn, events, defer=True)
            except HandlerFailed as failure:
                raise_if_disconnected(failure, conn)
                raise
            if end != state.checkpoint:
                await conn.execute(sql.ADVANCE, projection.name, end[0], end[1], self.runner.identity)
            elif state.status != "running" or state.runner != self.runner.identity:
                await conn.execute(sql.CLAIM, projection.name, self.runner.identity)
            if len(events) == limit:
                return _Outcome.MORE, len(events)
        return (_Outcome.HELD if row["held"] else _Outcome.IDLE), len(events)

    @telemetry.failure
    async def _fail(self, conn: Connection, failure: HandlerFailed) -> None:
        event = failure.event
        log.error(
            "projection %s failed at event %s %s (position %s)",
            self.projection.name, event.event_type, event.event_id, event.position,
            exc_info=failure.error,
        )
        await conn.execute(
            sql.FAIL, self.projection.name, self._generation, describe(failure.error),
            event.event_id, event.event_type, event.log_xid, event.position,
        )


def _workers_of(runner: ProjectionRunner, projection: Projection) -> list[_Worker]:
    if projection.partitions == 1:
        return [_Worker(runner, projection)]
    presence = _Presence(runner, projection)
    return [_PartitionWorker(runner, projection, p, presence) for p in range(projection.partitions)]


def _connections_needed(projections: Iterable[Projection]) -> int:
    """The most connections a runner of `projections` holds: one per projection, one per partition it
    may run (all of them while it runs alone) and one per partitioned projection to be counted by."""
    return sum(1 if p.partitions == 1 else p.partitions + 1 for p in projections)


def _name_tag(name: str) -> str:
    """A projection's name in 16 characters: a session name is cut at 63 bytes, and this part must stay whole."""
    return hashlib.blake2b(name.encode(), digest_size=8).hexdigest()


class _PartitionWorker(_Worker):
    """One partition of a partitioned projection: leased, checkpointed and run like a projection of its own.

    Its batches lock its own checkpoint row and share the projection's row, so the partitions run side
    by side while a swap (a rebuild going live, a reset) waits for their batches in flight. Runners
    share the partitions fairly: each runner's `_Presence` session is named after it, so a runner sees
    how many runners compete for the projection, takes no more than ceil(partitions / runners) of them,
    and hands back what it holds beyond that (checked every `lease_interval`). A worker connects only
    to take its partition and keeps the connection only while it runs it.
    """

    def __init__(self, runner: ProjectionRunner, projection: Projection, partition: int, presence: _Presence) -> None:
        super().__init__(runner, projection)
        self.partition = partition
        self.label = partition_name(projection.name, partition)
        self.key = lease_key("run", self.label)
        self.presence = presence
        self._next_share_check = 0.0

    async def _session(self) -> None:
        while not self.runner._stopping:
            if await self.presence.may_take(self):
                conn = await connect(self.runner.store, f"projection {self.label}")
                try:
                    await self._prepare(conn)
                    await self._try_to_own(conn)
                finally:
                    await disconnect(self.runner.store, conn)
            self.wakeup.clear()
            await self._pause(self.runner.lease_interval)

    def _siblings(self) -> list[_PartitionWorker]:
        """This runner's workers of the same projection, this one included."""
        return [w for w in self.runner._workers if isinstance(w, _PartitionWorker) and w.projection is self.projection]

    def _held_by_runner(self) -> int:
        return sum(1 for w in self._siblings() if w.owned)

    async def _fair_share(self, conn: Connection) -> int:
        return _fair_share(self.projection, await conn.fetchval(sql.PARTITION_RUNNERS, self.presence.tag))

    async def _release(self, conn: Connection) -> None:
        await conn.execute(sql.RELEASE_PARTITION, self.projection.name, self.partition, self.runner.identity)

    async def _step(self, conn: Connection, limit: int) -> tuple[_Outcome, int]:
        now = time.monotonic()
        if now >= self._next_share_check:
            self._next_share_check = now + self.runner.lease_interval
            if self._held_by_runner() > await self._fair_share(conn):
                log.info("projection %s: handed to another runner (fair share)", self.label)
                return _Outcome.YIELD, 0
        projection = self.projection
        async with conn.transaction():
            shared = await conn.fetchrow(sql.SHARE_CHECKPOINT, projection.name)
            if shared is None:
                raise ProjectionError(f"projection {projection.name!r} has no checkpoint row")
            state = StoredCheckpoint.of(shared)
            if state.status == "failed":
                return _Outcome.FAILED, 0
            row = await conn.fetchrow(sql.LOCK_PARTITION, projection.name, self.partition)
            reason = state.mismatch(projection)
            if reason is not None or row is None:
                reason = reason or f"partition {self.partition} has no checkpoint row"
                if reason != self._mismatch:
                    log.warning("projection %s needs a rebuild (%s); leaving it", self.label, reason)
                self._mismatch = reason
                return _Outcome.MISMATCH, 0
            self._mismatch = None
            self._generation = state.generation
            await use_generation(conn, projection.name, state.generation, self._search_path)
            after = Checkpoint(row["log_xid"], row["position"])
            keyring = self.runner.store.keyring
            events, end = await read_partition(conn, projection, self.partition, after, limit, keyring)
            try:
                await projection.apply(conn, events, defer=True)
            except HandlerFailed as failure:
                raise_if_disconnected(failure, conn)
                raise
            if end != after or row["runner"] != self.runner.identity:
                await conn.execute(
                    sql.ADVANCE_PARTITION, projection.name, self.partition, end[0], end[1], self.runner.identity
                )
            if len(events) == limit:
                return _Outcome.MORE, len(events)
        return (_Outcome.HELD if row["held"] else _Outcome.IDLE), len(events)


def _fair_share(projection: Projection, runners: int | None) -> int:
    return math.ceil(projection.partitions / max(runners or 1, 1))


class _Presence:
    """A runner's one standing session for a partitioned projection, however many partitions it runs.

    Other runners count it (by its name) to work out their fair share, and the workers ask through it
    whether their partition is free before they connect to take it: a runner holds a connection per
    partition it runs, not per partition.
    """

    def __init__(self, runner: ProjectionRunner, projection: Projection) -> None:
        self.runner = runner
        self.projection = projection
        self.tag = _name_tag(projection.name)
        runner_tag = hashlib.blake2b(f"{runner.identity}:{id(runner)}".encode(), digest_size=4).hexdigest()
        self._names = {
            counted: f"{prefix}{runner_tag} {self.tag} {projection.name}"
            for counted, prefix in ((True, sql.PARTITION_RUNNER_PREFIX), (False, sql.PARTITION_MISMATCHED_PREFIX))
        }
        self._counted = True
        """Whether the session goes by the counted name (see `sql.PARTITION_MISMATCHED_PREFIX`)."""
        self._conn: Connection | None = None
        self._lock = asyncio.Lock()

    async def may_take(self, worker: _PartitionWorker) -> bool:
        """Whether `worker` should connect to try for its partition: it is free and within the fair share."""
        # A runner that cannot run the live declaration takes no share: one of its workers found out, and
        # the others share its declaration (a worker whose partition another runner holds never would).
        counted = not any(w._mismatch is not None for w in worker._siblings())
        async with self._lock:
            try:
                conn = await self._connection()
                if counted != self._counted:
                    await conn.execute(sql.NAME_PARTITION_SESSION, self._names[counted])
                    self._counted = counted
                if await conn.fetchval(sql.LEASE_HELD, worker.key):
                    return False
                runners = await conn.fetchval(sql.PARTITION_RUNNERS, self.tag)
            except _RETRYABLE:
                await self._close()
                raise
        return worker._held_by_runner() < _fair_share(self.projection, runners)

    async def _connection(self) -> Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        await self._close()
        conn = await connect(self.runner.store, f"partitions {self.projection.name}")
        try:
            await conn.execute(sql.NAME_PARTITION_SESSION, self._names[self._counted])
        except BaseException:
            await disconnect(self.runner.store, conn)
            raise
        self._conn = conn
        return conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await disconnect(self.runner.store, conn)

    async def close(self) -> None:
        """End the session (the runner stops): other runners no longer count this one."""
        async with self._lock:
            await self._close()
