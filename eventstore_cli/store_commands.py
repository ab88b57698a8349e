"""`eventstore migrate`, `streams list|show|archive|restore|tombstone|delete|retain`, `personal forget`,
`events tail`."""

from __future__ import annotations

import argparse
import re
from datetime import timedelta
from typing import Any

import asyncpg
from rich.table import Table

from eventstore import START, Checkpoint, Direction, EventStore, StreamNotFound, lifecycle
from eventstore.lifecycle import RetentionPolicy
from eventstore_app import migrate_async
from eventstore_cli.common import CommandError, console, database_url, load_app, open_store, run
from outbox import prune_orphans

_INLINE_APP = (
    "module:attribute of the Application: its master key, and its inline projections, which apply the "
    "record of this change in its transaction (their guards refuse it otherwise)"
)


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
    for name, what in (
        ("archive", "move a stream out of the log (hidden, refuses appends) until it is restored"),
        ("restore", "move an archived stream back into the log"),
        ("tombstone", "close a stream for good: it keeps its events but is never written again"),
    ):
        one = streams.add_parser(name, help=what)
        one.add_argument("stream_id")
        one.set_defaults(handler=lambda a, n=name: run(_lifecycle(a, n)))
    delete = streams.add_parser("delete", help="hard-delete streams (recorded as $StreamDeleted events)")
    delete.add_argument("stream_ids", nargs="+")
    delete.add_argument("--reason", required=True, help="why: recorded with the deletion")
    delete.add_argument("--app", help=_INLINE_APP)
    delete.set_defaults(handler=lambda a: run(_delete(a)))
    retain = streams.add_parser(
        "retain", help="delete the streams a retention policy no longer keeps (flags, or the --app's policies)"
    )
    retain.add_argument("--app", help="module:attribute of the Application whose retention policies to run")
    retain.add_argument("--category")
    retain.add_argument("--max-age", type=_duration, help="e.g. 30d, 12h, 90m: since a stream's last event")
    retain.add_argument("--max-count", type=int, help="keep only this many most recently written streams")
    retain.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    retain.add_argument("--allow-all", action="store_true", help="allow a policy to delete every stream")
    retain.set_defaults(handler=lambda a: run(_retain(a)))

    personal = commands.add_parser("personal", help="personal data (crypto-shredding)").add_subparsers(
        dest="personal_command", required=True
    )
    forget = personal.add_parser("forget", help="delete a subject's key: its personal data reads as redacted")
    forget.add_argument("subject")
    forget.add_argument("--app", help=_INLINE_APP)
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


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([dhms])", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"a duration looks like 30d, 12h, 90m or 45s, got {text!r}")
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match[2]]
    return timedelta(**{unit: int(match[1])})


async def _lifecycle(args: argparse.Namespace, action: str) -> int:
    store = await open_store(args)
    try:
        if action == "archive":
            moved = await lifecycle.archive(store, args.stream_id)
            console.print(f"archived {args.stream_id} ({moved} events moved out of the log)", highlight=False)
        elif action == "restore":
            moved = await lifecycle.restore(store, args.stream_id)
            console.print(f"restored {args.stream_id} ({moved} events back in the log)", highlight=False)
        else:
            await lifecycle.tombstone(store, args.stream_id)
            console.print(f"tombstoned {args.stream_id}: it can never be written again", highlight=False)
    finally:
        await store.stop()
    return 0


async def _prune_outbox(store: EventStore) -> None:
    """Pending messages of deleted events can never be published: drop them (if there is an outbox)."""
    try:
        pruned = await prune_orphans(store)
    except asyncpg.UndefinedTableError:
        return
    if pruned:
        console.print(f"dropped {pruned} outbox message(s) of deleted events", highlight=False)


async def _delete(args: argparse.Namespace) -> int:
    store = await open_store(args, inline=True)
    try:
        removed = await lifecycle.delete(store, args.stream_ids, args.reason)
        await _prune_outbox(store)
    finally:
        await store.stop()
    for stream_id, count in sorted(removed.items()):
        console.print(f"deleted {stream_id} ({count} events)", highlight=False)
    return 0


async def _retain(args: argparse.Namespace) -> int:
    if args.category is not None:
        policies = [RetentionPolicy(args.category, max_age=args.max_age, max_count=args.max_count)]
    elif args.app is not None:
        policies = list(load_app(args.app).retention)
        if not policies:
            raise CommandError(f"{args.app} declares no retention policies")
    else:
        raise CommandError("pass --category with --max-age and/or --max-count, or --app")
    store = await open_store(args, inline=True)
    try:
        table = Table("category", "streams", "expired", "events deleted")
        for policy in policies:
            result = await lifecycle.retain(store, policy, dry_run=args.dry_run, allow_all=args.allow_all)
            deleted = "(dry run)" if result.dry_run else str(result.deleted_events)
            table.add_row(policy.category, str(result.streams), str(len(result.expired)), deleted)
        if not args.dry_run:
            await _prune_outbox(store)
        console.print(table)
    finally:
        await store.stop()
    return 0


async def _forget(args: argparse.Namespace) -> int:
    store = await open_store(args, inline=True)
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
    if args.count < 0:
        raise CommandError(f"--count must be 0 (follow) or more, got {args.count}")
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
