"""An application with an inline projection of tickets that handles deletions and erasures, for the
CLI tests: `--app tests.cli.inline_app:APP`, run from the repository root."""

from __future__ import annotations

from eventstore import STREAM_DELETED, SUBJECT_FORGOTTEN, MasterKey, RecordedEvent
from eventstore_app import Application
from projections import Connection, Projection, handles

KEY = MasterKey(b"i" * 32)


class Tickets(Projection):
    name = "tickets_inline"
    inline = True
    tables = {"tickets": "CREATE TABLE tickets (stream_id text PRIMARY KEY, owner text)"}

    @handles("Opened")
    async def opened(self, conn: Connection, event: RecordedEvent) -> None:
        await conn.execute("INSERT INTO tickets VALUES ($1, $2)", event.stream_id, event.json().get("owner"))

    @handles(STREAM_DELETED)
    async def deleted(self, conn: Connection, event: RecordedEvent) -> None:
        await conn.execute("DELETE FROM tickets WHERE stream_id = $1", event.json()["stream_id"])

    @handles(SUBJECT_FORGOTTEN)
    async def forgotten(self, conn: Connection, event: RecordedEvent) -> None:
        await conn.execute("UPDATE tickets SET owner = NULL WHERE owner = $1", event.json()["subject"])


APP = Application("tickets", projections=[Tickets()], keys=KEY)
