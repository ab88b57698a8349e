"""Apply the Alembic migrations of every component, from Python or the CLI.

It lives here, above the components, because only the migration environment may see them all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import re
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import exc as sa_exc

from eventstore.errors import DatabaseUnavailable, MigrationFailed


def _sqlalchemy_url(url: str) -> str:
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql+asyncpg://", url)


def _script_location() -> str:
    # The migrations ship as the package `eventstore_migrations` (the repository's migrations/ folder),
    # never as a top-level `migrations` that an application's own Alembic folder would shadow.
    spec = importlib.util.find_spec("eventstore_migrations")
    if spec is None or not spec.submodule_search_locations:
        raise MigrationFailed("the eventstore_migrations package is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))))


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", _script_location())
    config.set_main_option("sqlalchemy.url", _sqlalchemy_url(url).replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "heads") -> None:
    """Upgrade the database at `url` to `revision` (every component's head by default).

    Inside a running event loop use `await migrate_async(url)`; called there anyway, this blocks the
    loop while the migration runs in a thread of its own (Alembic runs its own loop).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _upgrade(url, revision)
        return
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        worker.submit(_upgrade, url, revision).result()


def _upgrade(url: str, revision: str) -> None:
    try:
        command.upgrade(alembic_config(url), revision)
    except sa_exc.ArgumentError as exc:
        raise DatabaseUnavailable(f"not a PostgreSQL URL: {url!r} ({exc})") from None
    except sa_exc.DBAPIError as exc:
        raise MigrationFailed(f"cannot migrate {url!r}: {exc.orig}") from exc
    except OSError as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL at {url!r}: {exc}") from None


async def migrate_async(url: str, revision: str = "heads") -> None:
    """`migrate` for callers inside an event loop (an async main, a FastAPI lifespan)."""
    await asyncio.to_thread(_upgrade, url, revision)
