"""The `eventstore` command: one console script over the store, projections, outbox and the demo."""

from eventstore_cli.main import main

__all__ = ["main"]
