"""What every subcommand shares: resolving the database URL and turning errors into one clear line."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
import urllib.parse
from collections.abc import Coroutine
from typing import Any

from rich.console import Console
from rich.markup import escape

from eventstore import DatabaseUnavailable, EventStore, EventStoreError, MasterKey, MetricsServer, serve_metrics
from eventstore.embedded import DATABASE_URL_ENV
from eventstore_app import Application
from projections import InlineProjections

# No markup or emoji codes by default: stream ids, event types and error texts are printed as they are
# (`[/x]` in one crashed the command after its change was made). Styled text says `markup=True` and escapes.
console = Console(markup=False, emoji=False)
errors = Console(stderr=True, markup=False, emoji=False)


class CommandError(Exception):
    """A failure the user can fix; printed as one line, no traceback."""


APP_ENV = "EVENTSTORE_APP"


def load_app(spec: str | None) -> Application:
    """Import the application declared at `module:attribute` (the working directory is importable)."""
    if not spec:
        raise CommandError(f"no application: pass --app module:attribute or set {APP_ENV}")
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CommandError(f"--app must look like module:attribute, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CommandError(f"--app {spec}: cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise CommandError(f"--app {spec}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise CommandError(f"--app {spec}: {module_name!r} has no attribute {attribute!r}") from None
    if not isinstance(value, Application):
        raise CommandError(f"--app {spec}: expected an eventstore_app.Application, got {type(value).__name__}")
    return value


def database_url(args: argparse.Namespace) -> str:
    url: str | None = getattr(args, "database_url", None) or os.environ.get(DATABASE_URL_ENV)
    if not url:
        raise CommandError(f"no database: pass --database-url or set {DATABASE_URL_ENV}")
    # The driver's own check of a port is an OverflowError from deep inside it. Hosts may be several.
    for host in urllib.parse.urlsplit(url).netloc.rpartition("@")[2].split(","):
        _, colon, port = host.rpartition("]")[2].rpartition(":")
        if colon and port and (not port.isdigit() or int(port) > 65535):
            raise CommandError(f"the database URL's port {port!r} is not a port number (0-65535)")
    return url


async def open_store(args: argparse.Namespace, *, inline: bool = False, **kwargs: Any) -> EventStore:
    """The store of `--database-url`, with the application's master key if `--app` names one.

    `inline`: a command whose events the application's inline projections handle (a deletion record, a
    subject forgotten) attaches them, as the application does: their guards refuse such events otherwise.
    """
    kwargs.setdefault("retry_for", 2.0)
    kwargs.setdefault("connect_timeout", 0.0)  # a one-shot command with a wrong URL says so at once
    spec = getattr(args, "app", None) or os.environ.get(APP_ENV)
    app = load_app(spec) if spec else None
    if "keys" not in kwargs:  # the application's master key, else the configured one
        kwargs["keys"] = app.key_provider() if app is not None else MasterKey.from_env()
    store = EventStore(database_url(args), **kwargs)
    await store.start()
    try:
        projections = [p for p in app.projections if p.inline] if inline and app is not None else []
        if projections:
            await InlineProjections(store, projections).start()
    except BaseException:
        await store.stop()
        raise
    return store


def add_metrics_options(parser: argparse.ArgumentParser) -> None:
    """`--metrics-port` (and `--metrics-host`) for the long-running commands."""
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (needs eventstore[observability])")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address the metrics endpoint listens on (default 127.0.0.1; 0.0.0.0 for all)")


def start_metrics(args: argparse.Namespace) -> MetricsServer | None:
    """Serve /metrics if the command was given `--metrics-port`; say where."""
    if args.metrics_port is None:
        return None
    server = serve_metrics(args.metrics_port, args.metrics_host)
    console.print(f"metrics on {server.url}", highlight=False)
    return server


def run(coroutine: Coroutine[Any, Any, int]) -> int:
    """Run a command's coroutine; expected failures become a message and exit status 2."""
    try:
        return asyncio.run(coroutine)
    except KeyboardInterrupt:
        return 130
    except (CommandError, EventStoreError, DatabaseUnavailable) as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        return 2
    except (OSError, ValueError) as exc:
        message = f"[bold red]error:[/] {type(exc).__name__}: {escape(str(exc))}"
        errors.print(message, markup=True, highlight=False, soft_wrap=True)
        return 2


def exit_with(code: int) -> None:
    sys.exit(code)
