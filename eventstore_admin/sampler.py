"""Lag over the last minutes: sampled in the console's process, since the database keeps no history."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from eventstore_admin.backend import Backend
from eventstore_admin.errors import ConsoleError
from eventstore_admin.model import ProjectionView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LagSample:
    at: float
    """Unix time of the sample."""
    events: dict[str, int | None]
    seconds: dict[str, float | None]


class LagSampler:
    """Reads every projection's status every `interval` seconds and keeps `window` seconds of samples.

    The latest statuses also answer the projections page's refreshes, so any number of open pages
    costs the database one status read per interval.
    """

    def __init__(self, backend: Backend, interval: float = 2.0, window: float = 600.0) -> None:
        self._backend = backend
        self.interval = interval
        self.samples: deque[LagSample] = deque(maxlen=max(int(window / interval), 2))
        self.latest: list[ProjectionView] = []
        self.error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lag sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        """Sample now (after an operation changed a projection) rather than at the next interval."""
        self._wakeup.set()

    async def sample(self) -> list[ProjectionView]:
        views = await self._backend.projections()
        self.latest = views
        self.error = None
        self.samples.append(
            LagSample(
                time.time(),
                {v.name: v.lag_events for v in views},
                {v.name: None if v.lag_seconds is None else round(v.lag_seconds, 3) for v in views},
            )
        )
        return views

    async def _run(self) -> None:
        while True:
            try:
                await self.sample()
            except ConsoleError as exc:
                self.error = str(exc)
            except Exception as exc:  # keep sampling: the next interval may succeed
                log.exception("lag sample failed")
                self.error = f"{type(exc).__name__}: {exc}"
            self._wakeup.clear()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set (a poke during stop), and the sampler would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wakeup.wait()

    def series(self) -> dict[str, Any]:
        """uPlot's shape: one list of times, and per projection one list of values aligned with it."""
        names = sorted({name for s in self.samples for name in s.events})
        return {
            "times": [round(s.at, 3) for s in self.samples],
            "events": {n: [s.events.get(n) for s in self.samples] for n in names},
            "seconds": {n: [s.seconds.get(n) for s in self.samples] for n in names},
        }
