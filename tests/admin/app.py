"""What the console tests declare (`--app tests.admin.app:APP`): the shop, plus a projection
that fails on purpose so the console has a failed projection, its error and its failing event to show."""

from __future__ import annotations

from typing import Any

from eventstore import RecordedEvent
from eventstore_app import Application
from examples.shop.app import APP as SHOP
from projections import Projection, handles


class Notes(Projection):
    """Keeps the notes; a note that says `fail` makes the handler raise (quoting the note, untrusted)."""

    name = "notes"
    tables = {"notes": "CREATE TABLE notes (position bigint PRIMARY KEY, text text NOT NULL)"}

    @handles("NoteAdded")
    async def added(self, conn: Any, event: RecordedEvent) -> None:
        text = str(event.json().get("text", ""))
        if "fail" in text:
            raise ValueError(f"cannot file the note {text}")
        await conn.execute("INSERT INTO notes VALUES ($1, $2)", event.position, text)


assert SHOP.outbox is not None
APP = Application(
    "admin-tests",
    aggregates=SHOP.aggregates,
    projections=[*SHOP.projections, Notes()],
    routes=SHOP.outbox.routes,
    registry=SHOP.registry,
)
PROJECTIONS = list(APP.projections)
