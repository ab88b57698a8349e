"""`eventstore demo`: the end-to-end demo on embedded defaults."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from typing import Any

from eventstore import EventStore, NewEvent, StreamState, WrongExpectedVersion, expected_version
from eventstore.embedded import DATABASE_URL_ENV, database_url
from eventstore.migrate import migrate_async
from eventstore_cli.common import CommandError, console, run


def register(commands: Any) -> None:
    demo = commands.add_parser("demo", help="run the end-to-end demo (embedded services by default)")
    demo.add_argument("--smoke", action="store_true", help="only the quick event store check")
    demo.set_defaults(handler=lambda a: run(_demo(a)))


async def _demo(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as stack:
        url = args.database_url or os.environ.get(DATABASE_URL_ENV)
        if not url:
            console.print("starting embedded PostgreSQL ...")
            url = stack.enter_context(database_url())
        await migrate_async(url)
        async with EventStore(url) as store:
            return await _smoke(store)
    return 1


async def _smoke(store: EventStore) -> int:
    streams = [f"demo_account-{i}" for i in range(20)]
    writes = 0

    async def writer(stream_id: str) -> None:
        nonlocal writes
        version = await store.stream_version(stream_id)
        for n in range(50):
            try:
                result = await store.append(
                    stream_id, [NewEvent("Deposited", {"amount": n})], expected_version(version)
                )
            except WrongExpectedVersion as conflict:
                version = conflict.actual
                continue
            version = result.next_expected_version
            writes += 1

    head_before = await store.head()
    await asyncio.gather(*(writer(s) for s in streams), *(writer(s) for s in streams[:5]))
    seen = 0
    after = head_before
    while batch := await store.read_all(after, category="demo_account"):
        seen += len(batch)
        after = batch[-1].checkpoint
    await store.append("demo_account-check", [NewEvent("Opened")], StreamState.ANY)
    console.print(f"appended {writes} events with concurrent conflicts; read back {seen} from the log")
    if seen != writes:
        raise CommandError(f"lost events: wrote {writes}, read {seen}")
    console.print("[green]ok[/]: every committed event was read exactly once")
    return 0
