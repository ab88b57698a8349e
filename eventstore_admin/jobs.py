"""Rebuilds the console runs in its own process, with their progress for the page that started them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from eventstore_admin.backend import Backend
from eventstore_admin.errors import Conflict, ConsoleError
from eventstore_admin.model import RebuildProgressView

log = logging.getLogger(__name__)


class RebuildJobs:
    """One background rebuild per projection at most; the last progress of each stays to be read.

    A rebuild outlives the request that started it (it may take minutes), so it runs as a task of the
    server; the page polls its progress. Another process rebuilding the same projection is refused by
    the library's lock, and the refusal shows as the job's error.
    """

    def __init__(self, backend: Backend, redact: Callable[[str], str] = str) -> None:
        """`redact` cleans a failed rebuild's error once, as it is kept: whatever reads the progress shows it."""
        self._backend = backend
        self._redact = redact
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, RebuildProgressView] = {}

    def start(self, name: str) -> RebuildProgressView:
        if not self._backend.declared(name):
            raise ConsoleError(f"projection {name!r} is not declared here: start the console with --app")
        task = self._tasks.get(name)
        if task is not None and not task.done():
            raise Conflict(f"projection {name!r} is being rebuilt already")
        self._progress[name] = RebuildProgressView(name, "starting", 0, 0, 0.0, None, 0.0)
        self._tasks[name] = asyncio.get_running_loop().create_task(self._run(name), name=f"rebuild {name}")
        return self._progress[name]

    def progress(self, name: str) -> RebuildProgressView | None:
        return self._progress.get(name)

    def running(self) -> list[RebuildProgressView]:
        return [p for name, p in self._progress.items() if name in self._tasks and not self._tasks[name].done()]

    async def _run(self, name: str) -> None:
        started = time.perf_counter()

        def update(progress: RebuildProgressView) -> None:
            self._progress[name] = progress

        try:
            self._progress[name] = await self._backend.rebuild(name, update)
        except Exception as exc:
            if not isinstance(exc, ConsoleError):
                log.exception("rebuild of %s failed", name)
            last = self._progress.get(name)
            self._progress[name] = RebuildProgressView(
                name, "failed", last.done if last else 0, last.total if last else 0, 0.0, None,
                time.perf_counter() - started, error=self._redact(str(exc)),
            )

    async def stop(self) -> None:
        """Cancel rebuilds still running; each resumes where it stopped the next time it is started."""
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
