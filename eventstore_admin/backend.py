"""The one module of the console that calls the library: the event store, projections and the outbox.

Everything else in the package works with the console's own types (`eventstore_admin.model`), so when
the library's API moves, this module is the only one to adapt. The console's own SQL (browsing streams,
slot leases) lives in `eventstore_admin.sql` and runs only from here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import datetime
from typing import TypeVar

import asyncpg

import outbox
from eventstore import (
    CONNECTION_ERRORS,
    Checkpoint,
    DatabaseUnavailable,
    Direction,
    EventStore,
    EventStoreError,
    InvalidArgument,
    KeyProvider,
    RecordedEvent,
    SchemaNotMigrated,
    storable_text,
)
from eventstore.schema import MAX_EVENT_TYPE_LENGTH
from eventstore.sql import MAX_STREAM_ID_LENGTH
from eventstore_admin import sql
from eventstore_admin.errors import Conflict, ConsoleError, NotFound, Unavailable
from eventstore_admin.model import (
    DeadLetterView,
    EventView,
    FailedEvent,
    LogPosition,
    OutboxView,
    ProjectionView,
    RebuildPhase,
    RebuildProgressView,
    RebuildRecord,
    RelayView,
    SlotView,
    StreamInfo,
    StreamPage,
    StreamSummary,
    TopicView,
)
from projections import (
    Projection,
    ProjectionAdmin,
    ProjectionFailed,
    ProjectionsNotMigrated,
    ProjectionStatus,
    RebuildInProgress,
    RebuildProgress,
    UnknownProjection,
)

T = TypeVar("T")

DeclaredProjection = Projection
"""What `--app` names: the projections the console may rebuild and reset (it runs their handlers)."""

MAX_SHOWN_JSON = 100_000
"""Characters of an event's pretty JSON shown in a list; the event's own page shows all of it."""

PREFIX_WALK = 2000
"""Newest streams a prefix search looks through before it reads the prefix's whole range instead."""


class Backend:
    """The store, the declared projections and the outbox of one database, as the console uses them."""

    def __init__(
        self,
        database_url: str,
        projections: Sequence[DeclaredProjection] = (),
        *,
        query_timeout: float = 10.0,
        keys: KeyProvider | None = None,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        """`redact` cleans the errors the database holds (a projection's, a dead letter's): runners and
        relays write them, and theirs may quote the URL, password and all, that the console uses too."""
        self._redact = redact or _unchanged
        self._store = EventStore(
            database_url, max_connections=8, retry_for=2.0, connect_timeout=5.0, notify=False, keys=keys
        )
        self._declared = list(projections)
        self._projections = ProjectionAdmin(self._store, self._declared)
        self._timeout = f"{int(query_timeout * 1000)}ms"

    async def start(self) -> None:
        with _translated():
            await self._store.start()

    async def stop(self) -> None:
        await self._store.stop()

    async def __aenter__(self) -> Backend:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- the console's own queries ---------------------------------------------------------------

    async def _query(self, statement: str, *args: object) -> list[asyncpg.Record]:
        """One of `sql`'s statements, bounded in time and planned for its own arguments."""

        async def once() -> list[asyncpg.Record]:
            async with self._store.pool.acquire() as conn, conn.transaction(readonly=True):
                await conn.execute(sql.BOUNDED, self._timeout)
                rows: list[asyncpg.Record] = await conn.fetch(statement, *args)
                return rows

        with _translated():
            return await self._store.retrying(once)

    async def now(self) -> datetime:
        """The database's clock: every age the console shows is measured against the times it recorded."""
        with _translated():
            value: datetime = await self._store.retrying(lambda: self._store.pool.fetchval(sql.NOW))
        return value

    # -- streams ----------------------------------------------------------------------------------

    async def categories(self, limit: int = 200) -> list[str]:
        return [r["category"] for r in await self._query(sql.CATEGORIES, limit)]

    async def search_streams(
        self,
        *,
        category: str | None = None,
        prefix: str | None = None,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> StreamPage:
        """A page of streams, newest first; `before` / `after` are cursors from a previous page."""
        category = _text("category", category)
        prefix = _prefix(prefix)
        newer = after is not None
        cursor = after if newer else before
        rows = await self._streams(category, prefix, cursor, newer, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        if newer:
            rows.reverse()
        streams = [StreamSummary(r["stream_id"], r["version"], r["recorded_at"], r["position"]) for r in rows]
        if not streams:
            return StreamPage([], None, None)
        # Older streams exist if this page was cut short, or if it was reached by going back (newer);
        # newer ones if it was reached by going forward (older), or by going back and was cut short.
        older = streams[-1].first_position if more or newer else None
        newest = streams[0].first_position if (cursor is not None and not newer) or (newer and more) else None
        return StreamPage(streams, older, newest)

    async def _streams(
        self, category: str | None, prefix: str | None, cursor: int | None, newer: bool, limit: int
    ) -> list[asyncpg.Record]:
        if prefix is None:
            statement = sql.STREAMS_NEWER if newer else sql.STREAMS_OLDER
            return await self._query(statement, category, cursor, limit)
        walk = sql.PREFIX_WALK_NEWER if newer else sql.PREFIX_WALK_OLDER
        rows = await self._query(walk, category, prefix, cursor, limit, PREFIX_WALK)
        if len(rows) == limit or (rows and rows[0]["walked"] < PREFIX_WALK):
            return rows  # a full page, or every stream walked
        ranged = sql.PREFIX_RANGE_NEWER if newer else sql.PREFIX_RANGE_OLDER
        return await self._query(ranged, category, prefix, successor(prefix), cursor, limit)

    async def stream(self, stream_id: str) -> StreamInfo:
        rows = await self._query(sql.STREAM_ENDS, _required_text("stream id", stream_id, MAX_STREAM_ID_LENGTH))
        if not rows:
            raise NotFound(f"no stream {stream_id!r}")
        row = rows[0]
        return StreamInfo(stream_id, row["version"], row["created_at"], row["updated_at"])

    async def stream_events(self, stream_id: str, from_version: int = 0, limit: int = 50) -> list[EventView]:
        with _translated():
            events = await self._store.read_stream(
                stream_id, max(from_version, 0), direction=Direction.FORWARDS, limit=limit
            )
        return [_event(e, MAX_SHOWN_JSON) for e in events]

    async def event_at(self, position: int) -> EventView:
        rows = await self._query(sql.EVENT_AT, position)
        if not rows:
            raise NotFound(f"no event at position {position}")
        return _event(RecordedEvent.from_rows(rows)[0], None)

    # -- the global log -------------------------------------------------------------------------

    async def head(self) -> LogPosition:
        with _translated():
            head = await self._store.head()
        return LogPosition(head.log_xid, head.position)

    @contextlib.asynccontextmanager
    async def follow(
        self, after: LogPosition | None, *, category: str | None = None, types: Sequence[str] | None = None
    ) -> AsyncIterator[AsyncIterator[list[EventView]]]:
        """Batches of the log's events after `after` (the head when None), as they become visible.

        The store's subscription reads in the log's gap-safe order, so a reader that reconnects with the
        last position it saw misses nothing and sees nothing twice.
        """
        category, checked = log_filters(category, types)
        with _translated():
            start = await self._store.head() if after is None else Checkpoint(after.log_xid, after.position)
            subscription = self._store.subscribe(
                start, category=category, types=checked, batch_size=200, poll_interval=1.0
            )

        async def batches() -> AsyncIterator[list[EventView]]:
            with _translated():  # a lost connection is the console's Unavailable, not an unexpected error
                async for batch in subscription.batches():
                    yield [_event(e, None, pretty=False) for e in batch]

        async with subscription:
            yield batches()

    # -- projections ------------------------------------------------------------------------------

    def declared(self, name: str) -> bool:
        return any(p.name == name for p in self._declared)

    async def projections(self) -> list[ProjectionView]:
        """Every projection recorded in the database or declared here, with its lag in events and seconds."""
        with _translated():
            statuses = await self._projections.status()
            now = await self.now()
            return [await self._projection(s, now) for s in statuses]

    async def _projection(self, s: ProjectionStatus, now: datetime) -> ProjectionView:
        lag_seconds: float | None = None
        if s.checkpoint is not None and s.lag is not None:
            lag_seconds = 0.0
            if s.lag > 0:
                first = await self._store.read_all(s.checkpoint, limit=1)
                if first:
                    lag_seconds = max((now - first[0].recorded_at).total_seconds(), 0.0)
        failed = None
        if s.failed_event_id is not None:
            failed = FailedEvent(str(s.failed_event_id), s.failed_event_type, s.failed_position, s.failed_at)
        rebuild = None
        if s.rebuild is not None:
            rebuild = RebuildRecord(
                s.rebuild.generation, s.rebuild.events_done, s.rebuild.active, self._cleaned(s.rebuild.last_error)
            )
        return ProjectionView(
            name=s.name, state=s.state, mode=s.mode, declared=s.declared, version=s.version,
            declared_version=s.declared_version, generation=s.generation,
            checkpoint=None if s.checkpoint is None else f"{s.checkpoint.log_xid}/{s.checkpoint.position}",
            lag_events=s.lag, lag_seconds=lag_seconds, runner=s.runner, last_error=self._cleaned(s.last_error),
            failed=failed, needs_rebuild=s.needs_rebuild, rebuild=rebuild,
        )

    async def rebuild(self, name: str, progress: Callable[[RebuildProgressView], None]) -> RebuildProgressView:
        """Rebuild a declared projection while it keeps serving; `progress` hears how far it has got."""

        def report(p: RebuildProgress) -> None:
            progress(_progress(p))

        with _translated():
            done = await self._projections.rebuild(name, progress=report, progress_interval=0.2)
        return _progress(done)

    async def reset(self, name: str) -> None:
        with _translated():
            await self._projections.reset(name)

    async def resume(self, name: str) -> bool:
        with _translated():
            return await self._projections.resume(name)

    # -- outbox -----------------------------------------------------------------------------------

    async def outbox(self, dead_limit: int = 100) -> OutboxView:
        with _translated():
            current = await self._store.retrying(lambda: outbox.status(self._store, dead_limit=dead_limit))
        now = await self.now()
        slots = [SlotView(r["slot"], r["owner"]) for r in await self._query(sql.SLOTS)]
        by_relay: dict[str, list[int]] = {}
        for slot in slots:
            if slot.owner is not None:
                by_relay.setdefault(slot.owner, []).append(slot.slot)
        return OutboxView(
            topics=[
                TopicView(
                    t.topic, t.pending, t.published, t.dead,
                    None if t.oldest_pending is None else max((now - t.oldest_pending).total_seconds(), 0.0),
                )
                for t in current.topics
            ],
            relays=[
                RelayView(r.relay_id, r.started_at, r.expires_at, by_relay.get(r.relay_id, [])) for r in current.relays
            ],
            dead=[
                DeadLetterView(
                    d.id, d.topic, d.key, str(d.event_id), d.event_type, d.stream_id, d.stream_version, d.attempts,
                    self._cleaned(d.last_error), d.dead_at,
                )
                for d in current.dead
            ],
            slots=slots,
        )

    def _cleaned(self, error: str | None) -> str | None:
        return None if error is None else self._redact(error)

    async def retry_dead(self, ids: Sequence[int] | None = None) -> list[int]:
        """Put dead letters (these, or all) back in line; returns the ids that were dead."""
        with _translated():
            return await outbox.retry_dead(self._store, ids=list(ids) if ids is not None else None)


# -- conversions -----------------------------------------------------------------------------------


def _event(e: RecordedEvent, limit: int | None, *, pretty: bool = True) -> EventView:
    """The console's view of an event; the live log keeps the stored JSON text (one line, no parsing)."""
    return EventView(
        position=e.position, log_xid=e.log_xid, stream_id=e.stream_id, version=e.stream_version,
        event_type=e.event_type, event_id=str(e.event_id), recorded_at=e.recorded_at,
        data=pretty_json(e.data, limit) if pretty else e.data,
        metadata=pretty_json(e.metadata, limit) if pretty else e.metadata,
    )


def pretty_json(text: str, limit: int | None = None) -> str:
    """Indented JSON for reading; the stored text itself if it does not parse (it always should)."""
    try:
        shown = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        shown = text
    if limit is not None and len(shown) > limit:
        return shown[:limit] + f"\n… ({len(shown) - limit:,} more characters: open the event)"
    return shown


_PHASES: dict[str, RebuildPhase] = {"building": "building", "swapping": "swapping", "done": "done"}


def _progress(p: RebuildProgress) -> RebuildProgressView:
    phase = _PHASES.get(p.phase, "building")
    return RebuildProgressView(p.name, phase, p.done, max(p.total, p.done), p.rate, p.eta, p.elapsed)


def successor(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix` (None: there is none).

    In code point order, which is UTF-8 byte order, the order of `~<~`.
    """
    stripped = prefix.rstrip("\U0010ffff")
    if not stripped:
        return None
    following = ord(stripped[-1]) + 1
    if 0xD800 <= following <= 0xDFFF:  # surrogates are not characters PostgreSQL stores
        following = 0xE000
    return stripped[:-1] + chr(following)


def log_filters(category: str | None, types: Sequence[str] | None) -> tuple[str | None, list[str] | None]:
    """The live log's filters, checked as the store checks them (and as the streams page does).

    The app checks them before it answers: once the live log has answered 200, a bad filter could only
    end it with a failure message.
    """
    checked = [_required_text("event type", t, MAX_EVENT_TYPE_LENGTH) for t in types or ()]
    return _text("category", category), checked or None


def _text(what: str, value: str | None) -> str | None:
    """A category from a form: blank means none; what PostgreSQL cannot store is refused, not sent."""
    if value is None or not value.strip():
        return None
    return _required_text(what, value.strip(), MAX_STREAM_ID_LENGTH)


def _prefix(value: str | None) -> str | None:
    """A stream id prefix exactly as typed: ids may start or end with spaces. Only an empty box means none."""
    if not value:
        return None
    return _required_text("prefix", value, MAX_STREAM_ID_LENGTH)


def _required_text(what: str, value: str, limit: int) -> str:
    if len(value) > limit or not storable_text(value):
        raise ConsoleError(f"{what} must be at most {limit} characters, without NUL or lone surrogates")
    return value


def _unchanged(text: str) -> str:
    return text


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """The library's and the driver's errors as the console's, with the status each should answer."""
    try:
        yield
    except ConsoleError:
        raise
    except UnknownProjection as exc:
        raise NotFound(str(exc)) from exc
    except RebuildInProgress as exc:
        raise Conflict(str(exc)) from exc
    except ProjectionFailed as exc:
        raise Conflict(str(exc)) from exc
    except (ProjectionsNotMigrated, SchemaNotMigrated) as exc:
        raise Unavailable(str(exc)) from exc
    except InvalidArgument as exc:
        raise ConsoleError(str(exc)) from exc
    except DatabaseUnavailable as exc:
        raise Unavailable(str(exc)) from exc
    except EventStoreError as exc:
        raise ConsoleError(str(exc)) from exc
    except asyncpg.exceptions.QueryCanceledError as exc:
        raise Unavailable("the database took too long to answer; narrow the search") from exc
    except asyncpg.exceptions.UndefinedTableError as exc:
        raise Unavailable(f"the database lacks a table ({exc}): run `eventstore migrate`") from exc
    except CONNECTION_ERRORS as exc:
        raise Unavailable(f"lost the connection to PostgreSQL: {exc}") from exc

