"""One retry loop for every operation that may lose its connection to PostgreSQL.

A server restart, a failover or a terminated session looks the same to every component: the
connection breaks, then for a while new ones are refused. Each component retries through this one
loop, with one backoff, rather than a loop of its own.
"""

from __future__ import annotations

import asyncio
import logging
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


async def with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    patience: float,
    what: str,
    errors: tuple[type[BaseException], ...] = CONNECTION_ERRORS,
    give_up: Callable[[], bool] | None = None,
) -> T:
    """Run `operation` until it succeeds; after one of `errors`, back off and run it again.

    Only for operations that are safe to repeat (reads, idempotent writes, work whose progress is in
    the database). Raises `DatabaseUnavailable` once `patience` seconds have passed, or the last error
    at once when `give_up()` says so (the component is closing).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = FIRST_DELAY
    while True:
        try:
            return await operation()
        except errors as exc:
            if give_up is not None and give_up():
                raise
            if loop.time() + delay > deadline:
                raise DatabaseUnavailable(f"{what}: PostgreSQL unavailable: {exc}") from exc
            log.warning("%s: connection lost (%s); retrying in %.2fs", what, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
