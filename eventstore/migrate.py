"""Apply the Alembic migrations from Python or the CLI."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from alembic import command
from alembic.config import Config


def _sqlalchemy_url(url: str) -> str:
    return re.sub(r"^postgres(?:ql)?(?:\+\w+)?://", "postgresql+asyncpg://", url)


def alembic_config(url: str) -> Config:
    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", _sqlalchemy_url(url).replace("%", "%%"))
    return config


def migrate(url: str, revision: str = "heads") -> None:
    """Upgrade the database at `url` to `revision` (every component's head by default)."""
    command.upgrade(alembic_config(url), revision)


async def migrate_async(url: str, revision: str = "heads") -> None:
    """`migrate` for callers inside an event loop (Alembic itself is synchronous)."""
    await asyncio.to_thread(migrate, url, revision)
