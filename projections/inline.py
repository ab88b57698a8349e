"""Inline projections: updated by an append hook inside the append's own transaction.

The read model then commits or rolls back with the events, so a reader never sees one without the other.
The price: a failing handler fails the append, and only a process that attaches the projection may
append the events it handles. The database enforces that: each inline projection has a guard on the
events table that refuses (`AppendRefused`, nothing written) an event of its types whose transaction did
not run its hook, so a script that forgot to attach it cannot leave the read model silently behind.
"""

from __future__ import annotations

from collections.abc import Iterable

from eventstore import AppendResult, EventStore, UnitOfWork
from projections import sql
from projections.errors import InvalidProjection, ProjectionError, ProjectionFailed, ProjectionNeedsRebuild
from projections.generations import (
    distinct,
    ensure,
    lease_key,
    mismatch,
    raise_if_disconnected,
    session_paths,
    use_generation,
)
from projections.projection import HandlerFailed, Projection


class InlineProjections:
    """Attach inline projections to a store: `async with InlineProjections(store, [...]):`.

    Each append that writes events an inline projection handles takes a shared lock on that projection's
    generation (an advisory lock, held until it commits) before running its handlers; a rebuild's swap
    takes it exclusively, so no append is half-way through writing into the generation being retired
    when the views move.
    """

    def __init__(self, store: EventStore, projections: Iterable[Projection]) -> None:
        self.store = store
        self.projections = distinct(projections)
        for projection in self.projections:
            if not projection.inline:
                raise InvalidProjection(
                    f"projection {projection.name!r} is not inline: run it with a ProjectionRunner"
                )
        self._attached = False
        self._active = False

    async def start(self) -> None:
        """Create missing tables (filling new ones from the log), check the declarations, attach the hook."""
        async with self.store.pool.acquire() as conn:
            search_path, view_schema = await session_paths(conn)
            for projection in self.projections:
                try:
                    state = await ensure(conn, projection, search_path, view_schema, self.store.keyring)
                except HandlerFailed as failure:
                    raise ProjectionFailed.at(projection.name, failure.event, failure.error) from failure.error
                reason = state.mismatch(projection)
                if reason is not None:
                    raise ProjectionNeedsRebuild(projection.name, reason)
        if not self._attached:
            self.store.add_append_hook(self._hook)
            self._attached = True
        self._active = True

    async def stop(self) -> None:
        """Detach: later appends no longer update these read models (rebuild them before relying on them)."""
        self._active = False

    async def __aenter__(self) -> InlineProjections:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _hook(self, uow: UnitOfWork, result: AppendResult) -> None:
        if not self._active:
            return
        relevant = [p for p in self.projections if any(p.handles(e.event_type) for e in result.events)]
        if not relevant:
            return
        conn = uow.connection
        await conn.execute(sql.SHARE_GENERATION, [lease_key("inline", p.name) for p in relevant])
        names = [p.name for p in relevant]
        rows = {r["name"]: r for r in await conn.fetch(sql.INLINE_STATE, names, ",".join(names))}
        missing = [p.name for p in relevant if p.name not in rows]
        if missing:
            raise ProjectionError(f"inline projections {missing} have no checkpoint row: start InlineProjections")
        search_path = str(next(iter(rows.values()))["search_path"])
        for projection in relevant:
            row = rows[projection.name]
            reason = mismatch(
                projection, row["mode"], row["version"], row["tables"], row["partitions"], row["partition_key"]
            )
            if reason is not None:
                raise ProjectionNeedsRebuild(projection.name, reason)
            await use_generation(conn, projection.name, row["generation"], search_path)
            try:
                await projection.apply(conn, result.events)
            except HandlerFailed as failure:
                raise_if_disconnected(failure, conn)
                raise ProjectionFailed.at(projection.name, failure.event, failure.error) from failure.error
        await conn.execute(sql.RESTORE_SEARCH_PATH, search_path)

