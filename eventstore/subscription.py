"""Catch-up subscription to the global log: read from a checkpoint, then wait for new events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import asyncpg

from eventstore import sql
from eventstore.errors import DatabaseUnavailable, InvalidArgument
from eventstore.model import Checkpoint, RecordedEvent, check_seconds, check_text, check_types
from eventstore.retry import Backoff
from eventstore.sql import MAX_STREAM_ID_LENGTH

if TYPE_CHECKING:
    from eventstore.store import EventStore

log = logging.getLogger(__name__)

LISTEN_RETRY = 5.0
"""Seconds at most between two attempts to listen again after the listener connection was lost; until
then the subscription polls at that pace, not at its poll interval."""


class Subscription:
    """Yields every event after its checkpoint exactly once, in the log's commit-safe order.

    It sleeps between reads: a NOTIFY from a writer wakes it at once; `poll_interval` bounds the wait
    when notifications are lost (listener connection dropped, writer crashed before notifying). While
    committed events wait below the log's visibility line, it looks again sooner, backing off: the
    older transaction that holds them back sends no NOTIFY when it ends without writing events.
    """

    def __init__(
        self,
        store: EventStore,
        after: Checkpoint,
        *,
        types: Sequence[str] | None = None,
        category: str | None = None,
        batch_size: int = 500,
        poll_interval: float = 1.0,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidArgument(f"batch_size must be a positive int, got {batch_size!r}")
        check_seconds("poll_interval", poll_interval)
        if category is not None:
            check_text("category", category, MAX_STREAM_ID_LENGTH)
        self._store = store
        self.checkpoint = Checkpoint.of(after)
        self._types = check_types(types)
        self._category = category
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._wakeup = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._next_listen_attempt = 0.0
        self._closed = False

    async def __aenter__(self) -> Subscription:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        self._wakeup.set()
        await self._unlisten()

    def _on_notify(self, *_: object) -> None:
        self._wakeup.set()

    async def _listen(self) -> None:
        """LISTEN on a connection of its own: pooled connections get reset and reclaimed under us."""
        if self._store.url is None:
            return  # built from a bare pool: poll only
        try:
            conn = await asyncpg.connect(self._store.url, timeout=5)
        except Exception as exc:
            log.warning("subscription cannot listen (%s); polling every %ss", exc, self._poll_interval)
            return
        try:
            await conn.add_listener(sql.NOTIFY_CHANNEL, self._on_notify)
            conn.add_termination_listener(self._on_notify)  # a lost listener wakes the reader to listen again
        except Exception as exc:
            log.warning("subscription cannot listen (%s); polling every %ss", exc, self._poll_interval)
            conn.terminate()
            return
        if self._closed:  # closed while it connected: close() found no listener to close
            conn.terminate()
            return
        # Events may have been written while nobody listened: read once more before sleeping.
        self._wakeup.set()
        self._listener = conn
        # A later loss listens again at once (a tenth of a second after this one at the earliest, should
        # the server end every listener as it starts); only failed attempts wait `LISTEN_RETRY`.
        self._next_listen_attempt = asyncio.get_running_loop().time() + 0.1

    async def _unlisten(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), 2)
        except Exception:
            conn.terminate()

    async def _ensure_listening(self) -> None:
        conn = self._listener
        if conn is not None and not conn.is_closed():
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_listen_attempt:
            return
        self._next_listen_attempt = loop.time() + min(max(self._poll_interval, 1.0), LISTEN_RETRY)
        await self._unlisten()
        await self._listen()

    async def batches(self) -> AsyncIterator[list[RecordedEvent]]:
        """Batches of up to `batch_size` events; the checkpoint moves past each batch as it is handed out.

        Once caught up, it asks whether the log holds events back before each read, not after: events
        that an older transaction releases after that question (it sends no NOTIFY) were held back when
        asked, so it looks again soon; asked after the read, a release in between would go unseen until
        the poll interval. A read that follows a full batch asks nothing and, if it comes back short,
        is followed by one that does.
        """
        held = Backoff.held_back(self._poll_interval)
        failures = Backoff(min(0.05, self._poll_interval), self._poll_interval)
        caught_up = False
        while not self._closed:
            self._wakeup.clear()
            try:
                held_back = caught_up and await self._store.held_back()
                events = await self._store.read_all(
                    self.checkpoint, limit=self._batch_size, types=self._types, category=self._category
                )
            except (DatabaseUnavailable, asyncpg.exceptions.InterfaceError) as exc:
                log.warning("subscription read failed (%s); retrying", exc)
                await self._wait(failures.failed())
                continue
            failures.reset()
            if events:
                self.checkpoint = events[-1].checkpoint
                yield events
            if len(events) == self._batch_size:
                caught_up = False
                continue
            if not caught_up:
                caught_up = True  # read once more, asking first
                continue
            if held_back:
                pause = held.failed()
            else:
                held.reset()
                pause = self._poll_interval
            await self._ensure_listening()
            listening = self._listener is not None and not self._listener.is_closed()
            if self._store.url is not None and not listening:  # its listener was lost: look again soon
                pause = min(pause, max(self._next_listen_attempt - asyncio.get_running_loop().time(), 0.05))
            await self._wait(pause)

    async def _wait(self, seconds: float) -> None:
        """Until a NOTIFY, `close()` or `seconds`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), seconds)

    async def __aiter__(self) -> AsyncIterator[RecordedEvent]:
        async for batch in self.batches():
            for event in batch:
                yield event
