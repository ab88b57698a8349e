"""Argument parsing for `eventstore`; each command group lives in a module of its own."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from eventstore_cli import (
    admin_commands,
    demo,
    outbox_commands,
    projection_commands,
    schema_commands,
    store_commands,
)
from eventstore_cli.common import exit_with


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="eventstore",
        description=(
            "Operate the event store, its projections and its outbox; check event schemas and describe the topics;"
            " serve the admin console; run the demo."
        ),
    )
    root.add_argument("--database-url", help="PostgreSQL URL (default: $EVENTSTORE_DATABASE_URL)")
    root.add_argument("--kafka", help="Kafka bootstrap servers (default: $KAFKA_BOOTSTRAP_SERVERS)")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (store_commands, projection_commands, outbox_commands, schema_commands, admin_commands, demo):
        group.register(commands)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    exit_with(args.handler(args))
