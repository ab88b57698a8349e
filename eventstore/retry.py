"""One retry loop, and one definition of the delays between attempts, for everything that may lose PostgreSQL.

A server restart, a failover or a terminated session looks the same to every component: the
connection breaks, then for a while new ones are refused. Each component retries an operation through
`with_retries`, and a long-running loop (a projection runner, the outbox relay) waits between its
attempts with a `Backoff`, rather than with delays of its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg

from eventstore.errors import DatabaseUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    # asyncpg's protocol can be left mid-operation when the server kills the session.
    asyncpg.exceptions.InternalClientError,
)
"""Errors after which the operation may be retried on a fresh connection."""

FIRST_DELAY = 0.05
MAX_DELAY = 1.0
HELD_BACK_LIMIT = 1.0
"""Seconds at most between two looks at a log that holds committed events back (`Backoff.held_back`)."""


class Backoff:
    """The delays between attempts at something that keeps failing: `first`, then doubling up to `limit`.

    A streak of failures ends with `reset()`, once an attempt succeeds, or by itself when an attempt
    fails after running longer than `fresh_after` seconds: it had been working (a runner's session, a
    rebuild making progress) before it failed, so the next wait starts at `first` again.
    """

    def __init__(
        self, first: float = FIRST_DELAY, limit: float = MAX_DELAY, *, fresh_after: float | None = None
    ) -> None:
        self.first = first
        self.limit = limit
        self.fresh_after = fresh_after
        self._next = first
        self._since: float | None = None

    @classmethod
    def held_back(cls, poll_interval: float) -> Backoff:
        """Looks at the log while committed events wait below its visibility line: from 20 ms up to a
        second (or the poll interval if shorter), since the older transaction holding them back sends no
        NOTIFY when it ends. One cheap query a second, so that a long hold delays them by a second at
        most once it ends, not by as long again."""
        return cls(min(0.02, poll_interval), min(HELD_BACK_LIMIT, poll_interval))

    def failed(self, ran_for: float = 0.0) -> float:
        """Count an attempt that failed after running `ran_for` seconds; return how long to wait now."""
        now = time.monotonic()
        if self._since is None or (self.fresh_after is not None and ran_for > self.fresh_after):
            self._since, self._next = now - ran_for, self.first
        delay = self._next
        self._next = min(delay * 2, self.limit)
        return delay

    @property
    def failing_for(self) -> float:
        """Seconds since the first failed attempt of this streak started; 0 while nothing fails."""
        return 0.0 if self._since is None else time.monotonic() - self._since

    def reset(self) -> None:
        """An attempt succeeded: the next failure starts a new streak."""
        self._since = None
        self._next = self.first


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    patience: float,
    what: str,
    errors: tuple[type[BaseException], ...] = CONNECTION_ERRORS,
    give_up: Callable[[], bool] | None = None,
    fresh_after: float | None = None,
) -> T:
    """Run `operation` until it succeeds; after one of `errors`, back off and run it again.

    Only for operations that are safe to repeat (reads, idempotent writes, work whose progress is in
    the database). Raises `DatabaseUnavailable` once it has been failing for `patience` seconds, or the
    last error at once when `give_up()` says so (the component is closing). With `fresh_after`, for
    long operations that keep their progress (a rebuild), an attempt that ran longer than that before
    it failed starts the patience afresh.
    """
    backoff = Backoff(fresh_after=fresh_after)
    while True:
        started = time.monotonic()
        try:
            return await operation()
        except errors as exc:
            if give_up is not None and give_up():
                raise
            delay = backoff.failed(time.monotonic() - started)
            if backoff.failing_for + delay > patience:
                raise DatabaseUnavailable(f"{what}: PostgreSQL unavailable: {exc}") from exc
            log.warning("%s: connection lost (%s); retrying in %.2fs", what, exc, delay)
            await asyncio.sleep(delay)
