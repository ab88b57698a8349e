"""Serving the console with uvicorn, as `eventstore admin` does."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn

from eventstore_admin.app import create_app
from eventstore_admin.settings import AdminSettings


class _Server(uvicorn.Server):
    """Stops on SIGINT / SIGTERM and returns, so the command exits like the others.

    (uvicorn's own handling raises the signal again after shutting down, ending the process by it.)
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop)
        try:
            yield
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    def _stop(self) -> None:
        if self.should_exit:
            self.force_exit = True  # a second Ctrl-C: do not wait for open connections
        self.should_exit = True


async def serve(settings: AdminSettings) -> None:
    """Serve the console on the settings' address until SIGINT or SIGTERM."""
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=3, server_header=False,
    )
    await _Server(config).serve()
