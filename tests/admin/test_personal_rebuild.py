"""The console rebuilds and resets projections with the master key: sealed fields of subjects not
forgotten are opened, as the application's runners open them (without it every one read `[redacted]`)."""

from __future__ import annotations

from eventstore import EventStore, NewEvent, RecordedEvent
from eventstore_admin import AdminSettings
from eventstore_admin.app import AdminConsole
from projections import Connection, Projection, ProjectionRunner, handles
from tests.cli.inline_app import KEY


class Contacts(Projection):
    name = "contacts"
    tables = {"contacts": "CREATE TABLE contacts (name text PRIMARY KEY, email text)"}

    @handles("Added")
    async def added(self, conn: Connection, event: RecordedEvent) -> None:
        data = event.json()
        await conn.execute("INSERT INTO contacts VALUES ($1, $2)", data["name"], data["email"])


async def _rows(store: EventStore) -> list[tuple[str, str]]:
    return [(r["name"], r["email"]) for r in await store.pool.fetch("SELECT name, email FROM contacts ORDER BY name")]


async def test_a_console_rebuild_and_reset_open_sealed_fields(database_url: str) -> None:
    async with EventStore(database_url, keys=KEY) as store:
        for name in ("ann", "bob"):
            event = NewEvent("Added", {"name": name, "email": f"{name}@x"}, personal_data={"email": name})
            await store.append(f"contact-{name}", [event])
        await store.forget("bob")
        async with ProjectionRunner(store, [Contacts()]) as runner:
            await runner.wait_caught_up(await store.head())
        expected = [("ann", "ann@x"), ("bob", "[redacted]")]
        assert await _rows(store) == expected
        settings = AdminSettings(database_url=database_url, projections=[Contacts()], keys=KEY)
        async with AdminConsole(settings).backend as backend:
            await backend.rebuild("contacts", lambda progress: None)
            assert await _rows(store) == expected
            await backend.reset("contacts")
        async with ProjectionRunner(store, [Contacts()]) as runner:
            await runner.wait_caught_up(await store.head())
        assert await _rows(store) == expected
