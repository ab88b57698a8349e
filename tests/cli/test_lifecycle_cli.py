"""`eventstore streams archive|restore|tombstone|delete|retain` and `eventstore personal forget`."""

from __future__ import annotations

import asyncio

import pytest

from eventstore import EventStore, NewEvent
from eventstore_cli.main import parser


async def test_stream_lifecycle_from_the_command_line(database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    async with EventStore(database_url) as store:
        for n in range(3):
            await store.append(f"cart-{n}", [NewEvent("Opened")])

    async def cli(*argv: str) -> tuple[int, str]:
        args = parser().parse_args(["--database-url", database_url, *argv])
        code = int(await asyncio.to_thread(args.handler, args))
        out = capsys.readouterr()
        return code, " ".join((out.out + out.err).split())

    assert await cli("streams", "archive", "cart-0") == (0, "archived cart-0 (1 events moved out of the log)")
    assert await cli("streams", "restore", "cart-0") == (0, "restored cart-0 (1 events back in the log)")
    assert (await cli("streams", "tombstone", "cart-1"))[0] == 0
    code, out = await cli("streams", "archive", "cart-missing")
    assert code == 2 and "stream 'cart-missing' not found" in out
    code, out = await cli("streams", "retain", "--category", "cart", "--max-count", "1", "--dry-run")
    assert code == 0 and "(dry run)" in out
    code, out = await cli("streams", "retain", "--category", "cart")
    assert code == 2 and "needs max_age, max_count or both" in out
    code, out = await cli("streams", "delete", "cart-2", "--reason", "test")
    assert code == 0 and "deleted cart-2 (1 events)" in out
    code, out = await cli("personal", "forget", "nobody")
    assert code == 2 and "no personal data is stored for subject 'nobody'" in out
    async with EventStore(database_url) as store:
        assert await store.read_stream("cart-2") == []
        assert len(await store.read_stream("cart-0")) == 1
