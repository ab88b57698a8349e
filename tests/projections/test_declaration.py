"""Declaring projections: what a declaration yields, and bad declarations rejected with a clear error."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
import sqlalchemy as sa

from eventstore import RecordedEvent
from projections import InvalidProjection, Projection, ReadModelTable, handles
from tests.projections.app import Ledger, StreamCounts


def recorded(event_type: str, position: int) -> RecordedEvent:
    return RecordedEvent(uuid4(), event_type, "{}", "{}", "s-1", position, position, 1, datetime.now(UTC))


def test_decorated_handlers_and_tables() -> None:
    ledger = Ledger()
    assert ledger.event_types == ["Deposited", "Withdrawn"]
    assert [t.name for t in ledger.read_model] == ["ledger_balances", "ledger_applied"]
    assert ledger.read_model[1].ddl[1] == "CREATE INDEX ON ledger_applied (position)"
    counts = StreamCounts()
    (table,) = counts.read_model
    assert table.name == "stream_counts"
    assert table.ddl[0].strip().startswith("CREATE TABLE stream_counts")
    assert "CREATE INDEX stream_counts_by_events ON stream_counts (events)" in table.ddl[1]


async def test_apply_keeps_log_order_and_groups_runs_for_batch_handlers() -> None:
    calls: list[tuple[str, list[int]]] = []

    async def single(conn: Any, event: RecordedEvent) -> None:
        calls.append(("single", [event.position]))

    async def batch(conn: Any, events: list[RecordedEvent]) -> None:
        calls.append(("batch", [e.position for e in events]))

    projection = Projection(
        name="mixed", tables={"t": "CREATE TABLE t (x int)"}, handlers={"A": single}, batch_handlers={"B": batch}
    )
    kinds = ["B", "B", "A", "Other", "B", "A", "A", "B", "B", "B"]
    await projection.apply(None, [recorded(k, i) for i, k in enumerate(kinds)])
    assert calls == [
        ("batch", [0, 1]), ("single", [2]), ("batch", [4]), ("single", [5]), ("single", [6]),
        ("batch", [7, 8, 9]),
    ]


def test_handler_mappings_and_overrides() -> None:
    async def on_a(conn: Any, event: RecordedEvent) -> None:
        return None

    projection = Projection(name="p", version=3, inline=True, tables=[ReadModelTable("t", ("CREATE TABLE t ()",))],
                            handlers={"A": on_a})
    assert (projection.name, projection.version, projection.inline, projection.event_types) == ("p", 3, True, ["A"])
    assert projection.handles("A") and not projection.handles("B")


async def _noop(conn: Any, event: RecordedEvent) -> None:
    return None


def _sync(conn: Any, event: RecordedEvent) -> None:
    return None


_TABLES = {"t": "CREATE TABLE t (x int)"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"name": "Bad-Name"}, "projection name"),
        ({"name": "x" * 41}, "projection name"),
        ({"name": "9lives"}, "projection name"),
        ({"version": 0}, "version must be an int"),
        ({"version": True}, "version must be an int"),
        ({"handlers": {}}, "handles no event types"),
        ({"handlers": {"A": _sync}}, "must be an `async def`"),
        ({"handlers": {"": _noop}}, "bad event type"),
        ({"tables": {}}, "declares no read-model tables"),
        ({"tables": {"Bad Table": "CREATE TABLE x ()"}}, "lower-case SQL identifier"),
        ({"tables": {"events": "CREATE TABLE events ()"}}, "belongs to the framework"),
        ({"tables": {"t": ""}}, "needs DDL text"),
        (
            {"tables": [sa.Table("t", sa.MetaData(), sa.Column("x", sa.Integer), schema="other")]},
            "must not name a schema",
        ),
        ({"tables": [ReadModelTable("t", ("CREATE TABLE t ()",))] * 2}, "declared twice"),
        ({"tables": ["CREATE TABLE t ()"]}, "tables must be"),
        ({"tables": "CREATE TABLE t ()"}, "tables must be"),
    ],
)
def test_bad_declarations_are_rejected(options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"name": "p", "tables": _TABLES, "handlers": {"A": _noop}} | options
    with pytest.raises(InvalidProjection, match=message):
        Projection(**arguments)


def test_two_handlers_for_one_event_type_are_rejected() -> None:
    class Twice(Projection):
        name = "twice"
        tables = _TABLES

        @handles("A")
        async def first(self, conn: Any, event: RecordedEvent) -> None:
            return None

        @handles("A", "B")
        async def second(self, conn: Any, event: RecordedEvent) -> None:
            return None

    with pytest.raises(InvalidProjection, match="two handlers for event type 'A'"):
        Twice()


async def test_an_override_replaces_the_inherited_handler() -> None:
    seen: list[str] = []

    class Base(Projection):
        name = "base"
        tables = _TABLES

        @handles("A", "B")
        async def on_ab(self, conn: Any, event: RecordedEvent) -> None:
            seen.append(f"base {event.event_type}")

    class Plain(Base):
        async def on_ab(self, conn: Any, event: RecordedEvent) -> None:
            seen.append(f"plain {event.event_type}")

    class Narrowed(Base):
        @handles("A")
        async def on_ab(self, conn: Any, event: RecordedEvent) -> None:
            seen.append(f"narrowed {event.event_type}")

    await Plain().apply(None, [recorded("A", 1), recorded("B", 2)])
    await Narrowed().apply(None, [recorded("A", 3), recorded("B", 4)])
    assert seen == ["plain A", "plain B", "narrowed A"]
    assert Narrowed().event_types == ["A"]


def test_handles_needs_an_event_type() -> None:
    with pytest.raises(InvalidProjection, match="at least one event type"):
        handles()


def test_the_framework_table_list_names_every_table_of_every_component() -> None:
    """The reserved names are a fixed list, not whatever happened to be imported: it must stay complete."""
    from eventstore_migrations import target_metadata
    from projections.projection import FRAMEWORK_TABLES

    assert set(target_metadata().tables) | {"alembic_version"} == FRAMEWORK_TABLES
    for name in ("outbox", "inbox", "outbox_routes", "projection_rebuilds"):
        with pytest.raises(InvalidProjection, match="belongs to the framework"):
            Projection(name="p", tables={name: f"CREATE TABLE {name} ()"}, handlers={"A": _noop})
