"""What the console tests declare (`--app tests.admin.app:PROJECTIONS`): the shop's projections, and one
that fails on purpose so the console has a failed projection, its error and its failing event to show."""

from __future__ import annotations

from typing import Any

from eventstore import RecordedEvent
from examples.shop.app import PROJECTIONS as SHOP_PROJECTIONS
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


PROJECTIONS = [*SHOP_PROJECTIONS, Notes()]
