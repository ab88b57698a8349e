"""`eventstore projections status|run|rebuild NAME|reset NAME|resume NAME|drop NAME`.

Projections are application code, so the commands that need their declarations import the
application from `--app module:attribute` (default `$EVENTSTORE_APP`): an `eventstore_app.Application`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from eventstore_cli.common import (
    APP_ENV,
    CommandError,
    add_metrics_options,
    console,
    errors,
    load_app,
    open_store,
    run,
    start_metrics,
)
from projections import Projection, ProjectionAdmin, ProjectionStatus, RebuildProgress

RUNNER_PATIENCE = 60.0
"""Seconds a runner waits for PostgreSQL, at start (it may be restarting) and after a lost connection."""


def register(commands: Any) -> None:
    group = commands.add_parser("projections", help="run, inspect, rebuild and reset projections")
    sub = group.add_subparsers(dest="projections_command", required=True, metavar="COMMAND")

    def with_app(parser: argparse.ArgumentParser, required: bool) -> None:
        parser.add_argument(
            "--app",
            default=os.environ.get(APP_ENV),
            help=f"module:attribute naming the application (default: ${APP_ENV})"
            + ("" if required else "; without it only recorded projections are shown"),
        )

    status = sub.add_parser(
        "status",
        help="state, checkpoint, lag and last error of every projection",
        description="Exit status 1 if any projection has failed.",
    )
    with_app(status, required=False)
    status.set_defaults(handler=lambda a: run(_status(a)))

    runner = sub.add_parser("run", help="keep the asynchronous projections current (until Ctrl-C)")
    with_app(runner, required=True)
    runner.add_argument("--only", action="append", metavar="NAME", help="run only these projections")
    runner.add_argument("--batch-size", type=_positive_int, default=500)
    runner.add_argument("--poll-interval", type=_positive_float, default=1.0,
                        help="seconds between polls when no notification arrives")
    runner.add_argument("--lease-interval", type=_positive_float, default=1.0,
                        help="seconds between attempts to take over a projection another runner holds")
    runner.add_argument("--until-caught-up", action="store_true", help="exit once they reach the head")
    add_metrics_options(runner)
    runner.set_defaults(handler=lambda a: run(_run(a)))

    rebuild = sub.add_parser("rebuild", help="rebuild one projection from the start while it keeps serving")
    rebuild.add_argument("name")
    with_app(rebuild, required=True)
    rebuild.add_argument("--batch-size", type=_positive_int, default=1000)
    rebuild.add_argument("--restart", action="store_true", help="discard an interrupted rebuild's progress")
    rebuild.set_defaults(handler=lambda a: run(_rebuild(a)))

    reset = sub.add_parser("reset", help="empty one projection's tables and replay it from the start in place")
    reset.add_argument("name")
    with_app(reset, required=True)
    reset.set_defaults(handler=lambda a: run(_reset(a)))

    resume = sub.add_parser("resume", help="let a failed projection retry its failed event")
    resume.add_argument("name")
    resume.set_defaults(handler=lambda a: run(_resume(a)))
    drop = sub.add_parser(
        "drop", help="remove a projection the application no longer declares (tables, checkpoint, guard)"
    )
    drop.add_argument("name")
    drop.set_defaults(handler=lambda a: run(_drop(a)))


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def load_projections(spec: str | None) -> list[Projection]:
    """The projections the application at `module:attribute` declares."""
    return list(load_app(spec).projections)


async def _status(args: argparse.Namespace) -> int:
    declared = load_projections(args.app) if args.app else []
    store = await open_store(args)
    try:
        statuses = await ProjectionAdmin(store, declared).status()
    finally:
        await store.stop()
    if not statuses:
        console.print("no projections recorded" + ("" if args.app else " (pass --app to list declared ones)"))
        return 0
    console.print(_status_table(statuses))
    return 1 if any(s.state == "failed" for s in statuses) else 0


def _status_table(statuses: list[ProjectionStatus]) -> Table:
    table = Table()
    table.add_column("projection", no_wrap=True)
    for column in ("mode", "state", "version", "gen", "checkpoint", "lag", "runner"):
        table.add_column(column, justify="right" if column in ("gen", "lag") else "left")
    table.add_column("notes", overflow="fold")
    colours = {"running": "green", "failed": "bold red", "needs rebuild": "yellow", "stopped": "dim"}
    for s in statuses:
        notes: list[str] = []
        if s.failed_event_id is not None:
            notes.append(f"failed at {s.failed_event_type} {s.failed_event_id} (position {s.failed_position})")
        if s.last_error:
            notes.append(f"last error: {s.last_error}")
        if s.needs_rebuild:
            notes.append(s.needs_rebuild)
        if s.rebuild is not None:
            busy = "rebuilding" if s.rebuild.active else "interrupted rebuild of"
            notes.append(f"{busy} generation {s.rebuild.generation}: {s.rebuild.events_done:,} events done")
            if s.rebuild.last_error:
                notes.append(f"rebuild error: {s.rebuild.last_error}")
        version = "-" if s.version is None else str(s.version)
        if s.declared_version is not None and s.declared_version != s.version:
            version += f" (declared {s.declared_version})"
        colour = colours.get(s.state)
        table.add_row(
            s.name,
            s.mode,
            Text(s.state, style=colour or ""),
            version,
            "-" if s.generation is None else str(s.generation),
            "-" if s.checkpoint is None else f"{s.checkpoint.log_xid}/{s.checkpoint.position}",
            "-" if s.lag is None else f"{s.lag:,}",
            s.runner or "-",
            "; ".join(notes),
        )
    return table


async def _run(args: argparse.Namespace) -> int:
    declared = load_projections(args.app)
    logging.basicConfig(
        level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=errors, show_path=False)]
    )
    metrics = start_metrics(args)
    store = await open_store(args, retry_for=RUNNER_PATIENCE, connect_timeout=RUNNER_PATIENCE)
    try:
        projections = ProjectionAdmin(store, declared)
        runner = projections.runner(
            args.only, batch_size=args.batch_size, poll_interval=args.poll_interval,
            lease_interval=args.lease_interval,
        )
        if not runner.projections:
            raise CommandError("no asynchronous projections to run (inline ones run inside the appends)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # not the main thread
                loop.add_signal_handler(signum, stop.set)
        try:
            async with runner:
                names = ", ".join(p.name for p in runner.projections)
                console.print(f"running {names} as {runner.identity}", highlight=False)
                if args.until_caught_up:
                    waiting = asyncio.ensure_future(runner.wait_caught_up())
                    stopped = asyncio.ensure_future(stop.wait())
                    await asyncio.wait([waiting, stopped], return_when=asyncio.FIRST_COMPLETED)
                    stopped.cancel()
                    if waiting.done():
                        waiting.result()
                        console.print("caught up")
                    else:
                        waiting.cancel()
                else:
                    await stop.wait()
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signum)
    finally:
        await store.stop()
        if metrics is not None:
            metrics.close()
    return 0


async def _rebuild(args: argparse.Namespace) -> int:
    declared = load_projections(args.app)
    store = await open_store(args)
    try:
        projections = ProjectionAdmin(store, declared)
        projections.get(args.name)
        columns = (
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} events/s"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
        )
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(f"{args.name}: starting", total=None, rate="-", eta="-")

            def show(p: RebuildProgress) -> None:
                bar.update(
                    task,
                    description=f"{p.name}: {p.phase}",
                    completed=p.done,
                    total=max(p.total, p.done) or None,
                    rate=f"{p.rate:,.0f}",
                    eta="-" if p.eta is None else f"{p.eta:,.0f}s",
                )

            result = await projections.rebuild(
                args.name, progress=show, batch_size=args.batch_size, restart=args.restart
            )
    finally:
        await store.stop()
    console.print(
        f"rebuilt {result.name}: {result.done:,} events in {result.elapsed:.1f}s "
        f"({result.rate:,.0f} events/s); the new tables are live",
        highlight=False,
    )
    return 0


async def _reset(args: argparse.Namespace) -> int:
    declared = load_projections(args.app)
    store = await open_store(args)
    try:
        projections = ProjectionAdmin(store, declared)
        projection = projections.get(args.name)
        await projections.reset(args.name)
    finally:
        await store.stop()
    if projection.inline:
        console.print(f"reset {args.name}: its tables were refilled from the whole log")
    else:
        console.print(f"reset {args.name}: its tables are empty; a runner replays it from the start")
    return 0


async def _resume(args: argparse.Namespace) -> int:
    store = await open_store(args)
    try:
        resumed = await ProjectionAdmin(store, []).resume(args.name)
    finally:
        await store.stop()
    if resumed:
        console.print(f"resumed {args.name}: its runner retries the failed event")
    else:
        console.print(f"{args.name} had not failed; nothing to resume")
    return 0


async def _drop(args: argparse.Namespace) -> int:
    store = await open_store(args)
    try:
        await ProjectionAdmin(store, []).drop(args.name)
    finally:
        await store.stop()
    console.print(f"dropped {args.name}: its tables, checkpoint and guard are gone")
    return 0
