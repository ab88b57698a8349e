"""Stream lifecycle: archive and restore, tombstone, hard-delete, and retention per category.

The events table stays append-only for every writer. Archiving, restoring and deleting go through one
database function, `eventstore_maintenance` (SECURITY DEFINER), the only way past the append-only
triggers; each deletion is recorded as a `STREAM_DELETED` event in `$deleted-<stream id>`, which
projections handle like any other event (`@handles(STREAM_DELETED)`) to drop the stream's rows.

- archive: the stream's events move to `events_archive`; no read of the log (stream reads, `read_all`,
  projections, rebuilds, the relay) sees them, and appends are refused (`StreamArchived`) until
  `restore` moves them back with their positions and log order.
- tombstone: the stream keeps its events but can never be written again (`StreamTombstoned`).
- delete: the events (live or archived) and the snapshot go for good; the stream is tombstoned, so its
  id is never reused and a late writer cannot resurrect it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from eventstore import sql
from eventstore.errors import (
    AppendRefused,
    InvalidArgument,
    RetentionRefused,
    StreamNotFound,
    StreamTombstoned,
)
from eventstore.model import UNSTORABLE, AppendResult, fetch_events, storable_text
from eventstore.store import Connection, EventStore, UnitOfWork, check_stream_id, record_stream

STREAM_DELETED = sql.STREAM_DELETED

_BATCH = 500  # streams per maintenance call (one transaction each): bounded locks and WAL per step


def deleted_stream(stream_id: str) -> str:
    """The stream recording the hard deletion of `stream_id` (`sql.DELETED_PREFIX`, the function's rule)."""
    return record_stream(sql.DELETED_PREFIX[:-1], stream_id)


@dataclass(frozen=True, slots=True)
class StreamStatus:
    stream_id: str
    version: int
    archived_at: datetime | None
    tombstoned_at: datetime | None


async def status(store: EventStore, stream_id: str) -> StreamStatus:
    """The stream's version and lifecycle state; `StreamNotFound` if it never had an event."""
    check_stream_id(stream_id)
    rows = await store.retrying(lambda: store.pool.fetch(sql.STREAM_STATES, [stream_id]))
    if not rows:
        raise StreamNotFound(stream_id)
    row = rows[0]
    return StreamStatus(row["stream_id"], row["version"], row["archived_at"], row["tombstoned_at"])


Recheck = Callable[[Connection, list[str]], Awaitable[list[str]]]
"""Given the streams locked, those still to be maintained (retention asks again whether they expired)."""


async def _maintain(
    store: EventStore, action: str, stream_ids: Sequence[str], reason: str, recheck: Recheck | None = None
) -> dict[str, int]:
    async def call() -> dict[str, int]:
        ids = list(stream_ids)
        async with store.pool.acquire() as conn, conn.transaction():
            if recheck is not None:
                await conn.execute(sql.LOCK_STREAMS, ids)
                ids = await recheck(conn, ids)
            rows = await conn.fetch(sql.MAINTENANCE, action, ids, reason)
            if action == "restore":
                await conn.execute(sql.RESTORE_STREAM_TAGS, ids)
            if action == "delete" and rows:
                await _recorded(store, conn, [deleted_stream(r["o_stream_id"]) for r in rows])
        return {r["o_stream_id"]: r["o_events"] for r in rows}

    try:
        return await store.retrying(call)
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_event_id_key":  # an id of the archive was appended again meanwhile
            raise InvalidArgument(
                f"cannot restore {', '.join(stream_ids)}: an event appended since the archive reuses one of its "
                "event ids"
            ) from None
        raise
    except asyncpg.InsufficientPrivilegeError as exc:
        raise InvalidArgument(
            f"eventstore_maintenance cannot bypass the append-only triggers ({exc}): its owner must be a "
            "superuser or hold SET on session_replication_role"
        ) from None
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) == sql.APPEND_REFUSED:  # the deletion's record, by an inline guard
            raise AppendRefused(exc.args[0]) from None
        raise


def _not_own_records(stream_id: str) -> str:
    if stream_id.startswith("$"):
        raise InvalidArgument(f"{stream_id!r} is a stream of the store's own records: it is kept as it is")
    return stream_id


async def _recorded(store: EventStore, conn: Connection, records: list[str]) -> None:
    """The deletion records the function appended go through the store's append hooks, as any append's
    events do: an inline projection handling `STREAM_DELETED` drops the stream's rows in the same
    transaction (and its guard, which refuses events whose transaction did not run it, lets them in)."""
    if not store.has_append_hooks:
        return
    uow = UnitOfWork(store, conn)
    for event in await fetch_events(conn, sql.DELETION_RECORDS, records):
        result = AppendResult(
            event.stream_id, event.stream_version, event.position, event.position, event.log_xid, (event,)
        )
        await store._appended(uow, result)


async def archive(store: EventStore, stream_id: str) -> int:
    """Move the stream out of the log; return how many events moved (0 if it was archived already)."""
    state = await status(store, stream_id)
    _not_own_records(stream_id)
    if state.tombstoned_at is not None:
        raise StreamTombstoned(stream_id)
    if state.archived_at is not None:
        return 0
    return (await _maintain(store, "archive", [stream_id], "")).get(stream_id, 0)


async def restore(store: EventStore, stream_id: str) -> int:
    """Move an archived stream back into the log; return how many events came back (0: not archived)."""
    state = await status(store, stream_id)
    if state.archived_at is None:
        return 0
    return (await _maintain(store, "restore", [stream_id], "")).get(stream_id, 0)


async def tombstone(store: EventStore, stream_id: str) -> None:
    """Close the stream for good: its events stay readable, appends to it are refused from now on."""
    await status(store, stream_id)
    _not_own_records(stream_id)
    await store.retrying(lambda: store.pool.fetchval(sql.TOMBSTONE, stream_id))


async def delete(store: EventStore, stream_ids: Sequence[str], reason: str) -> dict[str, int]:
    """Hard-delete streams (events, archived events, snapshot), recording each as a `STREAM_DELETED` event.

    Returns the number of events removed per stream. Unknown stream ids raise `StreamNotFound` before
    anything is deleted. Outbox messages of the deleted events that were still pending can no longer be
    published; `outbox.prune_orphans` removes them.
    """
    if isinstance(stream_ids, str) or not isinstance(stream_ids, Iterable):
        raise InvalidArgument(f"delete takes a sequence of stream ids, got {stream_ids!r}")
    ids = sorted({_not_own_records(check_stream_id(s)) for s in stream_ids})
    if not ids:
        raise InvalidArgument("no streams to delete")
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidArgument("a deletion needs a reason (it is recorded with it)")
    if not storable_text(reason):
        raise InvalidArgument(f"a deletion's reason must not contain {UNSTORABLE}")
    rows = await store.retrying(lambda: store.pool.fetch(sql.STREAM_STATES, ids))
    missing = sorted(set(ids) - {r["stream_id"] for r in rows})
    if missing:
        raise StreamNotFound(missing[0])
    return await _delete(store, ids, reason)


async def _delete(store: EventStore, ids: list[str], reason: str, recheck: Recheck | None = None) -> dict[str, int]:
    removed: dict[str, int] = {}
    for start in range(0, len(ids), _BATCH):
        removed.update(await _maintain(store, "delete", ids[start : start + _BATCH], reason, recheck))
    return removed


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long streams of one category live: at most `max_age` since their last event, and only the
    `max_count` most recently written. Whole streams go (events of an aggregate are never truncated).
    """

    category: str
    max_age: timedelta | None = None
    max_count: int | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.category, str) or not self.category or "-" in self.category
            or not storable_text(self.category) or len(self.category) > sql.MAX_STREAM_ID_LENGTH
        ):
            raise InvalidArgument(
                f"a retention policy names one category (no '-', {UNSTORABLE} or more than "
                f"{sql.MAX_STREAM_ID_LENGTH} characters), got {self.category!r}"
            )
        if self.category.startswith("$"):
            raise InvalidArgument(f"category {self.category!r} holds the store's own records: no retention")
        if self.max_age is None and self.max_count is None:
            raise InvalidArgument("a retention policy needs max_age, max_count or both")
        if self.max_age is not None and (not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0)):
            raise InvalidArgument(f"max_age must be a positive timedelta, got {self.max_age!r}")
        if self.max_count is not None and (
            isinstance(self.max_count, bool) or not isinstance(self.max_count, int) or self.max_count < 1
        ):
            raise InvalidArgument(f"max_count must be an int >= 1, got {self.max_count!r}")


@dataclass(frozen=True, slots=True)
class Retention:
    """What a retention run found (and, unless it was a dry run, deleted)."""

    policy: RetentionPolicy
    streams: int
    expired: list[str] = field(default_factory=list)
    deleted_events: int = 0
    dry_run: bool = False


async def retain(
    store: EventStore, policy: RetentionPolicy, *, dry_run: bool = False, allow_all: bool = False
) -> Retention:
    """Delete the streams of `policy.category` that the policy no longer keeps.

    A policy that would delete every stream of its category raises `RetentionRefused` and deletes
    nothing, unless `allow_all` says that is meant.
    """
    if not isinstance(policy, RetentionPolicy):
        raise InvalidArgument(f"retain takes a RetentionPolicy, got {type(policy).__name__}")
    rows = await store.retrying(lambda: store.pool.fetch(sql.CATEGORY_STREAMS, policy.category))
    expired = _expired(policy, rows)
    if rows and len(expired) == len(rows) and not allow_all:
        raise RetentionRefused(policy.category, len(rows))
    if dry_run or not expired:
        return Retention(policy, len(rows), expired, 0, dry_run)

    listed = {row["stream_id"]: row["last_at"] for row in rows}

    async def still_expired(conn: Connection, locked: list[str]) -> list[str]:
        # Written to since the listing (before the lock), a stream is kept: it is young again. One not
        # written to is still expired: its age has only grown, its rank only fallen.
        last = {r["stream_id"]: r["last_at"] for r in await conn.fetch(sql.STREAMS_LAST_WRITTEN, locked)}
        return [s for s in locked if s in last and last[s] <= listed[s]]

    removed = await _delete(store, expired, f"retention: {_describe(policy)}", still_expired)
    return Retention(policy, len(rows), list(removed), sum(removed.values()), False)


def _expired(policy: RetentionPolicy, rows: Sequence[asyncpg.Record]) -> list[str]:
    """The streams the policy no longer keeps, of the category's streams newest first (`CATEGORY_STREAMS`)."""
    expired: list[str] = []
    for rank, row in enumerate(rows):
        too_old = policy.max_age is not None and row["age"] > policy.max_age
        too_many = policy.max_count is not None and rank >= policy.max_count
        if too_old or too_many:
            expired.append(row["stream_id"])
    return expired


def _describe(policy: RetentionPolicy) -> str:
    parts = []
    if policy.max_age is not None:
        parts.append(f"max_age={policy.max_age}")
    if policy.max_count is not None:
        parts.append(f"max_count={policy.max_count}")
    return f"category {policy.category} " + " ".join(parts)


__all__ = [
    "STREAM_DELETED",
    "Retention",
    "RetentionPolicy",
    "StreamStatus",
    "archive",
    "delete",
    "deleted_stream",
    "restore",
    "retain",
    "status",
    "tombstone",
]
