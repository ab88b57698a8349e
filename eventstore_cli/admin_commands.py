"""`eventstore admin`: serve the web console (the `admin` extra), read-only unless given a token."""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from rich.markup import escape

from eventstore import MasterKey
from eventstore_cli.common import (
    APP_ENV,
    CommandError,
    add_metrics_options,
    console,
    database_url,
    errors,
    load_app,
    open_store,
    run,
    start_metrics,
)

TOKEN_ENV = "EVENTSTORE_ADMIN_TOKEN"


def register(commands: Any) -> None:
    admin = commands.add_parser(
        "admin",
        help="serve the web admin console (read-only unless started with a token)",
        description=(
            "Serve the admin console: streams, the live log, projections and the outbox. It is read-only "
            f"unless started with a token (--token or ${TOKEN_ENV}; the variable keeps it out of the process "
            "list); operators sign in with it to rebuild, reset and resume projections and retry dead letters."
        ),
    )
    admin.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)"
    )
    admin.add_argument("--port", type=int, default=8000)
    admin.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"operators' token (default: ${TOKEN_ENV})")
    admin.add_argument(
        "--app",
        default=os.environ.get(APP_ENV),
        help=f"module:attribute naming the projections to rebuild and reset (default: ${APP_ENV})",
    )
    admin.add_argument(
        "--allowed-host", action="append", default=[], metavar="NAME",
        help="a host name browsers use to reach the console, besides the bind address and localhost (repeatable)",
    )
    add_metrics_options(admin)
    admin.set_defaults(handler=lambda a: run(_admin(a)))


async def _admin(args: argparse.Namespace) -> int:
    try:
        from eventstore_admin import AdminSettings, ConsoleError
        from eventstore_admin.server import serve
    except ImportError as exc:
        raise CommandError(
            f"the admin console needs its extra ({exc.name} is missing): pip install 'eventstore[admin]'"
        ) from None
    app = load_app(args.app) if args.app else None
    projections = list(app.projections) if app is not None else []
    try:
        settings = AdminSettings(
            database_url=database_url(args), projections=projections, token=args.token, host=args.host,
            port=args.port, allowed_hosts=args.allowed_host,
            keys=app.key_provider() if app is not None else MasterKey.from_env(),
        )
    except ConsoleError as exc:
        raise CommandError(str(exc)) from None
    # Checked before serving: the server would report them as a failed start, with a traceback.
    store = await open_store(args)  # a database that is missing, unreachable or not migrated
    await store.stop()
    _check_port(settings.host, settings.port)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    mode = "read-only" if settings.read_only else "operators sign in with the token"
    console.print(f"admin console on http://{host}:{settings.port}/ ({mode})", highlight=False)
    if not settings.loopback:
        errors.print(
            f"[yellow]warning:[/] listening on {escape(settings.host)}: whoever reaches this port can read every "
            "event; put it behind TLS, and name the hosts it is reached by with --allowed-host",
            markup=True,
            highlight=False,
        )
    if not projections:
        console.print("no --app given: projections are shown, but only resume works (rebuild and reset run handlers)")
    async with _metrics(args, [p.name for p in projections] if projections else None):
        await serve(settings)
    console.print("admin console stopped")
    return 0


@contextlib.asynccontextmanager
async def _metrics(args: argparse.Namespace, names: list[str] | None) -> AsyncIterator[None]:
    """With --metrics-port: serve the outbox's and the projections' gauges from a small store of its own."""
    server = start_metrics(args)
    if server is None:
        yield
        return
    from outbox import telemetry as outbox_telemetry
    from projections import telemetry as projection_telemetry

    store = await open_store(args, min_connections=1, max_connections=2, retry_for=5.0)
    owner = object()
    outbox_telemetry.watch_backlog(owner, store)
    projection_telemetry.watch_projections(owner, store, names)
    try:
        yield
    finally:
        outbox_telemetry.unwatch(owner)
        projection_telemetry.unwatch(owner)
        await store.stop()
        server.close()


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise CommandError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
