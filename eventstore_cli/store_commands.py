"""`eventstore migrate`, `streams list|show`, `events tail`."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from eventstore import START, Checkpoint, Direction, StreamNotFound
from eventstore_app import migrate_async
from eventstore_cli.common import console, database_url, open_store, run


def register(commands: Any) -> None:
    migrate = commands.add_parser("migrate", help="create or upgrade the schema")
    migrate.set_defaults(handler=lambda a: run(_migrate(a)))

    streams = commands.add_parser("streams", help="inspect streams").add_subparsers(
        dest="streams_command", required=True
    )
    listing = streams.add_parser("list", help="list streams and their versions")
    listing.add_argument("--category")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=lambda a: run(_streams_list(a)))
    show = streams.add_parser("show", help="print the events of one stream")
    show.add_argument("stream_id")
    show.add_argument("--limit", type=int, default=100)
    show.set_defaults(handler=lambda a: run(_streams_show(a)))

    personal = commands.add_parser("personal", help="personal data (crypto-shredding)").add_subparsers(
        dest="personal_command", required=True
    )
    forget = personal.add_parser("forget", help="delete a subject's key: its personal data reads as redacted")
    forget.add_argument("subject")
    forget.set_defaults(handler=lambda a: run(_forget(a)))

    events = commands.add_parser("events", help="the global log").add_subparsers(
        dest="events_command", required=True
    )
    tail = events.add_parser("tail", help="follow the global log")
    tail.add_argument("--from-start", action="store_true", help="start at the beginning, not the head")
    tail.add_argument("--category")
    tail.add_argument("--count", type=int, default=0, help="stop after this many events (0: follow)")
    tail.set_defaults(handler=lambda a: run(_events_tail(a)))


async def _migrate(args: argparse.Namespace) -> int:
    url = database_url(args)
    await migrate_async(url)
    console.print("schema is at the newest revision")
    return 0


async def _streams_list(args: argparse.Namespace) -> int:
    store = await open_store(args)
    try:
        table = Table("stream", "version")
        for stream_id, version in await store.list_streams(args.category, args.limit):
            table.add_row(stream_id, str(version))
        console.print(table)
    finally:
        await store.stop()
    return 0


async def _streams_show(args: argparse.Namespace) -> int:
    store = await open_store(args)
    try:
        events = await store.read_stream(args.stream_id, direction=Direction.FORWARDS, limit=args.limit)
        if not events:
            raise StreamNotFound(args.stream_id)
        table = Table("version", "position", "type", "recorded", "data")
        for e in events:
            table.add_row(str(e.stream_version), str(e.position), e.event_type,
                          e.recorded_at.isoformat(timespec="seconds"), e.data)
        console.print(table)
    finally:
        await store.stop()
    return 0


async def _forget(args: argparse.Namespace) -> int:
    store = await open_store(args)
    try:
        erasure = await store.forget(args.subject)
    finally:
        await store.stop()
    if erasure.forgotten_now:
        console.print(f"forgot {erasure.subject}: key deleted, {erasure.snapshots_dropped} snapshot(s) dropped",
                      highlight=False)
    else:
        console.print(f"{erasure.subject} was already forgotten", highlight=False)
    return 0


async def _events_tail(args: argparse.Namespace) -> int:
    store = await open_store(args)
    try:
        after: Checkpoint = START if args.from_start else await store.head()
        seen = 0
        async with store.subscribe(after, category=args.category) as subscription:
            async for e in subscription:
                console.print(
                    f"{e.position:>10} {e.stream_id}@{e.stream_version} {e.event_type} {e.data}",
                    highlight=False, markup=False,
                )
                seen += 1
                if args.count and seen >= args.count:
                    break
    finally:
        await store.stop()
    return 0
