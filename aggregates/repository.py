"""Loading and saving aggregates: optimistic concurrency, snapshots, temporal loads, command retries."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, Literal, overload
from uuid import UUID

import asyncpg
from pydantic import BaseModel, ValidationError

from aggregates import telemetry
from aggregates.aggregate import A, Aggregate, same_state
from aggregates.errors import AggregateNotFound, AggregateUsageError, EventRegistrationError, SnapshotError
from aggregates.events import DomainEvent, EventRegistry, as_jsonb
from eventstore import (
    CONNECTION_ERRORS,
    MAX_BIGINT,
    AppendResult,
    EventPayload,
    EventStore,
    EventStoreError,
    InvalidArgument,
    RecordedEvent,
    StreamArchived,
    StreamNotFound,
    StreamTombstoned,
    UnitOfWork,
    WrongExpectedVersion,
    expected_version,
    has_non_finite,
    lifecycle,
)

log = logging.getLogger(__name__)

Command = Callable[[A], object | Awaitable[object]]
"""A function that runs one command on a loaded aggregate (sync or async); its events are then saved."""

# JSON text that PostgreSQL's jsonb refuses: the escaped NUL character.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_SNAPSHOT_WRITE_ERRORS: tuple[type[BaseException], ...] = (
    EventStoreError,
    asyncpg.PostgresError,
    *CONNECTION_ERRORS,
)


def _snapshot_of(state: BaseModel) -> tuple[str, None] | tuple[None, str]:
    """The JSON of a state as a snapshot, or why it cannot be a faithful one.

    Faithful means it reads back equal: a snapshot that loads differently from a replay of the same
    events (excluded or private fields, a subclass in a field of its base class, a set in an untyped
    field, a dict not in jsonb's key order) would have commands decide on other state depending on
    whether a snapshot existed.
    """
    try:
        data = state.model_dump_json()
    except Exception as exc:  # bytes that are not UTF-8, objects with no JSON form
        return None, f"its state has no JSON form ({exc})"
    if _JSON_NUL.search(data):
        return None, "PostgreSQL cannot store the NUL character"
    if "null" in data and has_non_finite(state.model_dump()):  # pydantic writes NaN as null
        return None, "NaN and infinity are not JSON"
    try:
        same = same_state(type(state).model_validate_json(as_jsonb(data)), state)
    except Exception:
        same = False
    if not same:
        return None, (
            "its state does not read back equal from its JSON (dict key order included: jsonb sorts keys),"
            " so a snapshot would load differently"
        )
    return data, None


class Repository(Generic[A]):
    """Loads aggregates of one class from their streams and saves their pending events.

    A save appends with the aggregate's version as the expected version, so two writers that loaded the
    same version cannot both succeed: the second gets `WrongExpectedVersion` and writes nothing.
    """

    def __init__(self, store: EventStore, aggregate_type: type[A], *, registry: EventRegistry | None = None) -> None:
        if not (isinstance(aggregate_type, type) and issubclass(aggregate_type, Aggregate)):
            raise InvalidArgument(f"a repository needs an Aggregate subclass, got {aggregate_type!r}")
        if registry is not None and not isinstance(registry, EventRegistry):
            raise InvalidArgument(f"registry must be an EventRegistry, got {type(registry).__name__}")
        if aggregate_type.category is None or aggregate_type.state_type is None:
            raise EventRegistrationError(f"{aggregate_type.__qualname__} declares no category")
        self.store = store
        self.aggregate_type = aggregate_type
        self.registry = registry if registry is not None else EventRegistry()
        self.registry.register(*aggregate_type.event_types())

    def stream_id(self, aggregate_id: str) -> str:
        return self.aggregate_type.stream_id_for(aggregate_id)

    # -- loading -----------------------------------------------------------------------------------

    @telemetry.load
    async def get(self, aggregate_id: str, *, version: int | None = None, as_of: datetime | None = None) -> A:
        """The aggregate now, or as it was at stream `version` or at time `as_of` (temporal load).

        Uses the latest snapshot when one matches the aggregate's state schema and is not past the
        requested version; then reads only the events after it.
        """
        cls = self.aggregate_type
        stream_id = cls.stream_id_for(aggregate_id)
        if version is not None and as_of is not None:
            raise InvalidArgument("pass either version or as_of, not both")
        if as_of is not None:
            return await self._get_as_of(aggregate_id, stream_id, as_of)
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_BIGINT
        ):
            raise InvalidArgument(f"version must be an int from 0 to {MAX_BIGINT}, got {version!r}")
        aggregate = cls(aggregate_id)
        start = 0
        if cls.snapshot_every is not None:
            start = await self._restore_snapshot(aggregate, stream_id, version) + 1
        records = await self._read_from(stream_id, start, version)
        if start > 0 and not records and await self.store.stream_version(stream_id) < start - 1:
            # Saved for a save whose unit of work then rolled back: replay, or the load would skip events.
            log.warning("ignoring snapshot of %s at version %d: past the stream's end", stream_id, start - 1)
            aggregate, start = cls(aggregate_id), 0
            records = await self._read_from(stream_id, start, version)
        last = records[-1].stream_version if records else start - 1
        if last < 0 or (version is not None and last < version):
            raise AggregateNotFound(cls.__qualname__, aggregate_id, stream_id, version=version)
        aggregate._replay(self.registry.decode_each(records), last)
        return aggregate

    async def _read_from(
        self, stream_id: str, start: int, version: int | None
    ) -> list[EventPayload] | list[RecordedEvent]:
        if version is None:
            return await self.store.read_stream_payloads(stream_id, start)
        if version >= start:
            return await self.store.read_stream_payloads(stream_id, start, limit=version - start + 1)
        return []

    async def _get_as_of(self, aggregate_id: str, stream_id: str, as_of: datetime) -> A:
        if not isinstance(as_of, datetime) or as_of.tzinfo is None:
            raise InvalidArgument(f"as_of must be a timezone-aware datetime, got {as_of!r}")
        try:  # the driver sends it in UTC: near datetime.min or .max, a time that has none
            as_of.astimezone(UTC)
        except OverflowError:
            raise InvalidArgument(f"as_of is out of range in UTC: {as_of!r}") from None
        records = await self.store.read_stream_until(stream_id, as_of)
        # recorded_at is the writing transaction's start time, so a later version can carry an earlier
        # time than its predecessor; the state as of `as_of` is the unbroken prefix, never a gapped set.
        count = 0
        for record in records:
            if record.stream_version != count:
                break
            count += 1
        if count == 0:
            raise AggregateNotFound(self.aggregate_type.__qualname__, aggregate_id, stream_id, as_of=as_of)
        aggregate = self.aggregate_type(aggregate_id)
        aggregate._replay(self.registry.decode_each(records[:count]), count - 1)
        return aggregate

    @telemetry.snapshot
    async def _restore_snapshot(self, aggregate: A, stream_id: str, version: int | None) -> int:
        """Put the matching snapshot's state into `aggregate`; its stream version, or -1 if none fits."""
        snapshot = await self.store.load_snapshot(stream_id)
        cls = self.aggregate_type
        if (
            snapshot is None
            or snapshot.snapshot_type != cls.__name__
            or snapshot.schema_version != cls.snapshot_tag()
            or (version is not None and snapshot.stream_version > version)
        ):
            return -1
        assert cls.state_type is not None
        try:
            aggregate.state = cls.state_type.model_validate_json(snapshot.data)
        except (ValidationError, TypeError) as exc:  # pydantic passes a validator's TypeError through
            log.warning(
                "ignoring unreadable snapshot of %s at version %d: %s",
                stream_id,
                snapshot.stream_version,
                exc,
            )
            return -1
        return snapshot.stream_version

    @overload
    async def history(self, aggregate_id: str, *, raw_unknown: Literal[False] = False) -> list[DomainEvent]: ...

    @overload
    async def history(self, aggregate_id: str, *, raw_unknown: bool) -> list[DomainEvent | RecordedEvent]: ...

    async def history(
        self, aggregate_id: str, *, raw_unknown: bool = False
    ) -> list[DomainEvent] | list[DomainEvent | RecordedEvent]:
        """Every event of the aggregate, decoded; with `raw_unknown`, unregistered types stay raw."""
        records = await self.store.read_stream(self.stream_id(aggregate_id), 0)
        if raw_unknown:
            return [self.registry.decode(r, raw_unknown=True) for r in records]
        return self.registry.decode_all(records)

    # -- saving ------------------------------------------------------------------------------------

    @telemetry.save
    async def save(
        self,
        aggregate: A,
        *,
        uow: UnitOfWork | None = None,
        metadata: Mapping[str, Any] | None = None,
        correlation_id: UUID | str | None = None,
        causation_id: UUID | str | None = None,
    ) -> AppendResult | None:
        """Append the pending events, expecting the stream at `aggregate.version`; None if none pending.

        With `uow`, the append (and a due snapshot) joins that transaction, so an application can save
        several aggregates and its own rows atomically. The aggregate counts as saved as soon as the
        append returns: discard it if the unit of work then rolls back. A new aggregate on an archived or
        tombstoned stream raises `StreamArchived` or `StreamTombstoned`, not `WrongExpectedVersion`.
        """
        if not isinstance(aggregate, self.aggregate_type):
            raise AggregateUsageError(
                f"this repository saves {self.aggregate_type.__qualname__}, got {type(aggregate).__name__}"
            )
        if uow is not None and not isinstance(uow, UnitOfWork):
            raise InvalidArgument(f"uow must be a UnitOfWork, got {type(uow).__name__}")
        pending = aggregate._pending
        if not pending:
            return None
        encode = self.registry.encode
        events = [
            encode(e, metadata=metadata, correlation_id=correlation_id, causation_id=causation_id) for e in pending
        ]
        before = aggregate.version
        after = before + len(events)
        snapshot = self._snapshot_if_due(aggregate, before, after)
        stream_id = aggregate.stream_id
        try:
            if uow is None:
                result = await self.store.append(stream_id, events, expected_version(before))
            else:
                result = await uow.append(stream_id, events, expected_version(before))
        except WrongExpectedVersion:
            if before < 0:
                await self._refuse_retired(stream_id)
            raise
        aggregate._mark_saved(result.next_expected_version)
        if snapshot is not None:
            await self._write_snapshot(stream_id, result.next_expected_version, snapshot, uow)
        return result

    async def _refuse_retired(self, stream_id: str) -> None:
        """Raise `StreamArchived` or `StreamTombstoned` for a stream that loads as missing but is retired.

        Its events are gone from the log, so the aggregate loads as new, and the append expecting no
        stream meets the version it kept: a retry would load it as new again, and fail the same way.
        """
        try:
            status = await lifecycle.status(self.store, stream_id)
        except StreamNotFound:
            return
        if status.tombstoned_at is not None:
            raise StreamTombstoned(stream_id)
        if status.archived_at is not None:
            raise StreamArchived(stream_id)

    def _snapshot_if_due(self, aggregate: A, before: int, after: int) -> str | None:
        """The state as JSON when this save crosses a multiple of `snapshot_every`, serialized up front."""
        every = self.aggregate_type.snapshot_every
        if every is None or (after + 1) // every == (before + 1) // every:
            return None
        data, reason = _snapshot_of(aggregate.state)
        if reason is not None:
            log.warning("not snapshotting %s: %s", aggregate.stream_id, reason)
        return data

    async def _write_snapshot(self, stream_id: str, version: int, data: str, uow: UnitOfWork | None) -> None:
        """Snapshots are a cache: failing to write one never fails a save whose events are stored."""
        cls = self.aggregate_type
        try:
            if uow is None:
                await self.store.save_snapshot(stream_id, cls.__name__, cls.snapshot_tag(), version, data)
            else:
                await uow.save_snapshot(stream_id, cls.__name__, cls.snapshot_tag(), version, data)
        except _SNAPSHOT_WRITE_ERRORS as exc:
            log.warning("snapshot of %s at version %d not saved: %s", stream_id, version, exc)

    async def take_snapshot(self, aggregate: A) -> None:
        """Snapshot a saved aggregate now (e.g. after a state schema change), not at the next interval."""
        cls = self.aggregate_type
        if not isinstance(aggregate, cls):
            raise AggregateUsageError(f"this repository snapshots {cls.__qualname__}, got {type(aggregate).__name__}")
        if cls.snapshot_every is None:
            raise SnapshotError(f"{cls.__qualname__} does not use snapshots: declare snapshot_every=N")
        if aggregate._pending or aggregate.version < 0:
            raise SnapshotError(f"{aggregate.stream_id}: save the aggregate before snapshotting it")
        data, reason = _snapshot_of(aggregate.state)
        if data is None:
            raise SnapshotError(f"{aggregate.stream_id}: {reason}")
        if await self.store.stream_version(aggregate.stream_id) < aggregate.version:  # its save rolled back
            raise SnapshotError(
                f"{aggregate.stream_id}: version {aggregate.version} is past the stream's end; reload the aggregate"
            )
        await self.store.save_snapshot(aggregate.stream_id, cls.__name__, cls.snapshot_tag(), aggregate.version, data)

    # -- commands ----------------------------------------------------------------------------------

    async def execute(
        self,
        aggregate_id: str,
        command: Command[A],
        *,
        retries: int = 3,
        create: bool = False,
        metadata: Mapping[str, Any] | None = None,
        correlation_id: UUID | str | None = None,
        causation_id: UUID | str | None = None,
    ) -> A:
        """Load, run `command`, save; on a concurrent write reload and run it again, at most `retries` times.

        The command must decide from the aggregate alone, since it may run more than once. With
        `create`, a missing aggregate starts new instead of raising `AggregateNotFound`. After the last
        retry the `WrongExpectedVersion` propagates; errors raised by the command propagate at once.
        """
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgument(f"retries must be an int >= 0, got {retries!r}")
        if not callable(command):
            raise InvalidArgument(f"command must be callable, got {type(command).__name__}")
        attempt = 0
        while True:
            try:
                aggregate = await self.get(aggregate_id)
            except AggregateNotFound:
                if not create:
                    raise
                aggregate = self.aggregate_type(aggregate_id)
            outcome = command(aggregate)
            if inspect.isawaitable(outcome):
                await outcome
            try:
                await self.save(aggregate, metadata=metadata, correlation_id=correlation_id, causation_id=causation_id)
            except WrongExpectedVersion as exc:
                if attempt >= retries:
                    raise
                attempt += 1
                log.debug("%s: concurrent write (%s); retry %d of %d", aggregate.stream_id, exc, attempt, retries)
                continue
            return aggregate
