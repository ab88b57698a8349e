"""`eventstore schemas check|lock|export|verify-stored` and `eventstore asyncapi`: the events as contracts."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from eventstore_cli.common import APP_ENV, CommandError, console, errors, load_app, open_store, run
from eventstore_contracts import (
    DEFAULT_LOCK_FILE,
    Contracts,
    SchemaLock,
    asyncapi_document,
    check,
    export_schemas,
    locked,
    read_lock,
    verify_stored,
    write_lock,
)


def register(commands: Any) -> None:
    schemas = commands.add_parser(
        "schemas", help="event schemas: check them against the lock file, lock, export; verify stored events"
    ).add_subparsers(dest="schemas_command", required=True)

    checking = schemas.add_parser(
        "check",
        help="fail if the code's event schemas break stored events or topic consumers, or the lock is outdated",
        description=(
            "Compare the application's event schemas with the lock file. Exit 1, naming the type and field, when "
            "a change breaks stored events (a field removed or retyped, a required field added, a version "
            "without an upcaster) or a routed topic's consumers (its compatibility: backward, forward, full, "
            "none), or when the lock has yet to record a compatible change; 2 on bad input."
        ),
    )
    _common(checking)
    checking.set_defaults(handler=lambda a: run(_check(a)))

    locking = schemas.add_parser("lock", help="write the lock file from the code (refuses breaking changes)")
    _common(locking)
    locking.add_argument("--force", action="store_true",
                         help="lock even breaking changes (when no stored event or consumer has the old shape)")
    locking.set_defaults(handler=lambda a: run(_lock(a)))

    export = schemas.add_parser("export", help="write DIR/<type>/v<version>.json for every known schema version")
    export.add_argument("directory", type=Path)
    _common(export)
    export.set_defaults(handler=lambda a: run(_export(a)))

    stored = schemas.add_parser(
        "verify-stored", help="decode every stored event with the current classes and upcasters; exit 1 if any fails"
    )
    _app(stored)
    stored.add_argument("--category", help="only the events of this stream category")
    stored.add_argument("--ignore-unknown", action="store_true",
                        help="skip events of types the application does not register")
    stored.set_defaults(handler=lambda a: run(_verify_stored(a)))

    asyncapi = commands.add_parser("asyncapi", help="print an AsyncAPI 3.0 document of the outbox's topics")
    _common(asyncapi)
    asyncapi.add_argument("--output", "-o", type=Path, help="write it here instead of printing it")
    asyncapi.add_argument("--api-version", default="1.0.0", help="the document's info.version")
    asyncapi.add_argument("--server", action="append", default=[], metavar="NAME=HOST:PORT",
                          help="a Kafka server to list (repeatable)")
    asyncapi.set_defaults(handler=lambda a: run(_asyncapi(a)))


def _app(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app", default=os.environ.get(APP_ENV),
                        help=f"module:attribute of the eventstore_app.Application (default: ${APP_ENV})")


def _common(parser: argparse.ArgumentParser) -> None:
    _app(parser)
    parser.add_argument("--lock", type=Path, default=Path(DEFAULT_LOCK_FILE),
                        help="the schema lock file (default: %(default)s)")


def _contracts(args: argparse.Namespace) -> Contracts:
    return Contracts.of(load_app(args.app))


def _lock_if_any(path: Path) -> SchemaLock | None:
    return read_lock(path) if path.exists() else None


async def _check(args: argparse.Namespace) -> int:
    contracts = _contracts(args)
    result = check(contracts, read_lock(args.lock))
    for problem in result.breaking:
        errors.print(f"[bold red]breaking:[/] {escape(str(problem))}", markup=True, highlight=False, soft_wrap=True)
    for change in result.outdated:
        errors.print(f"[yellow]not locked:[/] {escape(change)}", markup=True, highlight=False, soft_wrap=True)
    if result.breaking:
        errors.print(f"{len(result.breaking)} breaking change(s) against {args.lock}", highlight=False)
        return 1
    if result.outdated:
        errors.print(f"{args.lock} is out of date: run `eventstore schemas lock` and commit it", highlight=False)
        return 1
    console.print(f"{len(contracts.events)} event types and {len(contracts.topics)} topics match {args.lock}",
                  highlight=False)
    return 0


async def _lock(args: argparse.Namespace) -> int:
    contracts = _contracts(args)
    previous = _lock_if_any(args.lock)
    if previous is not None:
        result = check(contracts, previous)
        if result.breaking and not args.force:
            for problem in result.breaking:
                errors.print(
                    f"[bold red]breaking:[/] {escape(str(problem))}", markup=True, highlight=False, soft_wrap=True
                )
            raise CommandError(f"not locked: {len(result.breaking)} breaking change(s); --force locks them anyway")
        if result.ok:
            console.print(f"{args.lock} is up to date", highlight=False)
            return 0
    write_lock(args.lock, locked(contracts, previous))
    console.print(f"wrote {args.lock}: {len(contracts.events)} event types, {len(contracts.topics)} topics",
                  highlight=False)
    return 0


async def _export(args: argparse.Namespace) -> int:
    contracts = _contracts(args)
    written = export_schemas(contracts, _lock_if_any(args.lock), args.directory)
    console.print(f"wrote {len(written)} schema(s) to {args.directory}", highlight=False)
    return 0


async def _verify_stored(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    store = await open_store(args, notify=False)
    try:
        report = await verify_stored(store, app.registry, category=args.category, ignore_unknown=args.ignore_unknown)
    finally:
        await store.stop()
    table = Table("type", "version", "events", "failed", "first failure", title="stored events")
    for entry in report.versions:
        version = "?" if entry.schema_version is None else f"v{entry.schema_version}"
        table.add_row(entry.event_type, version, str(entry.events), str(entry.failed), entry.first_failure or "")
    console.print(table)
    if not report.ok:
        failed = sum(v.failed for v in report.failures)
        errors.print(
            f"[bold red]{failed} of {report.events} stored event(s) no longer load[/]", markup=True, highlight=False
        )
        return 1
    console.print(f"all {report.events} stored events load", highlight=False)
    return 0


async def _asyncapi(args: argparse.Namespace) -> int:
    servers: dict[str, str] = {}
    for server in args.server:
        name, equals, host = server.partition("=")
        if not equals or not name or not host:
            raise CommandError(f"--server must look like NAME=HOST:PORT, got {server!r}")
        servers[name] = host
    contracts = _contracts(args)
    document = asyncapi_document(contracts, _lock_if_any(args.lock), version=args.api_version, servers=servers)
    text = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
        console.print(f"wrote {args.output}", highlight=False)
    return 0
