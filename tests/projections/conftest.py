"""Fixtures of the projection tests: the `eventstore projections` command run in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator

import pytest

from eventstore_cli import common
from eventstore_cli.main import parser

Cli = Callable[..., Awaitable[int]]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Wide enough that tables print whole lines; no application named by the environment."""
    monkeypatch.delenv("EVENTSTORE_APP", raising=False)
    width = common.console.width
    common.console.width = common.errors.width = 250
    yield
    common.console.width = common.errors.width = width


@pytest.fixture
def cli(database_url: str) -> Cli:
    """`eventstore --database-url URL projections ARGV...`, run in a thread as `main` would run it."""

    async def run(*argv: str) -> int:
        args = parser().parse_args(["--database-url", database_url, "projections", *argv])
        return int(await asyncio.to_thread(args.handler, args))

    return run
