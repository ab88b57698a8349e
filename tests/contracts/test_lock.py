"""The lock file: written stable, read back equal, and bad files refused with their line."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from aggregates import Aggregate, DomainEvent, DuplicateEventType, EventRegistry, applies
from eventstore import InvalidArgument
from eventstore_app import Application
from eventstore_contracts import (
    LOCK_FORMAT,
    Contracts,
    LockFileError,
    lock_text,
    locked,
    parse_lock,
    read_lock,
    write_lock,
)
from eventstore_examples.shop.app import APP
from outbox import Route

SHOP_LOCK = Path(__file__).parents[2] / "examples" / "shop" / "eventstore.schemas.lock"


def test_the_lock_round_trips_and_is_stable(tmp_path: Path) -> None:
    contracts = Contracts.of(APP)
    path = tmp_path / "eventstore.schemas.lock"
    write_lock(path, locked(contracts))
    text = path.read_text()
    again = read_lock(path)
    assert lock_text(again) == text, "writing what was read changes nothing"
    assert json.loads(text)["format"] == LOCK_FORMAT
    assert set(again.events) == set(contracts.events)
    assert again.topics["shop.orders"].event_types == contracts.topics["shop.orders"].event_types
    assert list(tmp_path.iterdir()) == [path], "no temporary file left behind"


def test_the_committed_shop_lock_matches_the_shop() -> None:
    committed = read_lock(SHOP_LOCK)
    assert locked(Contracts.of(APP), committed) == committed  # the generator line may name another version


def test_locking_a_new_version_keeps_the_old_ones() -> None:
    class Placed(DomainEvent, event_type="OrderPlaced"):
        total: int

    class PlacedV2(DomainEvent, event_type="OrderPlaced", version=2):
        total: int
        currency: str

    first = locked(Contracts.of(Application("a", registry=EventRegistry(Placed))))
    registry = EventRegistry(PlacedV2)
    registry.add_upcaster(PlacedV2, 1, lambda data: {**data, "currency": "EUR"})
    second = locked(Contracts.of(Application("a", registry=registry)), first)
    assert set(second.events["OrderPlaced"]) == {1, 2}
    assert second.events["OrderPlaced"][1] == first.events["OrderPlaced"][1]
    assert "currency" in second.events["OrderPlaced"][2]["properties"]


GOOD = lock_text(locked(Contracts.of(APP)))


def lines_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('{\n  "format": 1,\n  "events": {,\n}', 3, "not JSON"),
        ("[]", 1, "a lock file is a JSON object"),
        ('{"events": {}}', 1, "'format' must be the lock format number"),
        (GOOD.replace('"format": 1', '"format": 7'), 2, "written by a newer eventstore"),
        (GOOD.replace('"format": 1', '"format": "1"'), 2, "'format' must be the lock format number"),
        (GOOD.replace('"OrderPlaced": {\n      "1"', '"OrderPlaced": {\n      "one"'),
         lines_of(GOOD, '"OrderPlaced": {') + 1, "schema version 'one' is not an integer"),
        (GOOD.replace('"compatibility": "backward"', '"compatibility": "sideways"'),
         lines_of(GOOD, '"compatibility"'), "compatibility must be one of backward, forward, full, none"),
        (GOOD.replace('"topics": {', '"topics": 3, "x": {'), lines_of(GOOD, '"topics"'),
         "'topics' must be a JSON object"),
        # "01" is version 1 too: one of the two schemas would silently replace the other.
        (GOOD.replace('"OrderPlaced": {\n      "1"', '"OrderPlaced": {\n      "01": {},\n      "1"'),
         lines_of(GOOD, '"OrderPlaced": {') + 1, "schema version '01' must be written '1'"),
        # A repeated key (a merge gone wrong) would too, as json.loads keeps the last one.
        (GOOD.replace('"OrderPlaced": {\n      "1"', '"OrderPlaced": {\n      "1": {},\n      "1"'),
         lines_of(GOOD, '"OrderPlaced": {') + 2, "key '1' appears twice in one object"),
        # Nested past what json.loads can recurse into, and deep enough to trouble what reads the lock.
        ('{"format": 1, "events": {"E": {"1": ' + '{"a":' * 100_000 + "{}" + "}" * 100_000 + "}}}", 1,
         "nests more than 128 levels deep"),
        ('{"format": 1,\n"events": {"E": {"1":\n' + '{"items":' * 600 + "{}" + "}" * 600 + "}}}", 2,
         "E v1: the schema nests more than 128 levels deep"),
    ],
)
def test_a_bad_lock_file_is_refused_with_file_and_line(tmp_path: Path, text: str, line: int, reason: str) -> None:
    path = tmp_path / "eventstore.schemas.lock"
    path.write_text(text)
    with pytest.raises(LockFileError) as caught:
        read_lock(path)
    assert isinstance(caught.value, InvalidArgument)
    assert caught.value.line == line and reason in caught.value.reason
    assert str(caught.value).startswith(f"{path}:{line}: ")


def test_a_missing_lock_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(LockFileError, match="eventstore schemas lock"):
        read_lock(tmp_path / "nope.lock")


def test_a_newer_lock_names_the_version_that_wrote_it() -> None:
    newer = json.loads(GOOD)
    newer.update(format=LOCK_FORMAT + 1, generator="eventstore 9.0.0")
    with pytest.raises(LockFileError, match=r"eventstore 9\.0\.0, lock format 2.*upgrade eventstore"):
        parse_lock(json.dumps(newer, indent=2), "x.lock")


class Thing(BaseModel):
    n: int = 0


class Counted(DomainEvent):
    n: int


def test_an_event_type_registered_twice_with_different_schemas_names_both_files_and_lines() -> None:
    class Counter(Aggregate[Thing], category="counter"):
        @applies(Counted)
        def _counted(self, event: Counted) -> None:
            self.state.n = event.n

    class OtherCounted(DomainEvent, event_type="Counted"):
        n: str

    class Tally(Aggregate[Thing], category="tally"):
        @applies(OtherCounted)
        def _counted(self, event: OtherCounted) -> None:
            self.state.n = len(event.n)

    with pytest.raises(DuplicateEventType) as caught:
        Application("twice", aggregates=[Counter, Tally], routes=[Route("t", ["Counted"])])
    message = str(caught.value)
    assert "'Counted' is registered twice" in message
    for cls in (Counted, OtherCounted):
        assert f"{cls.__qualname__} ({__file__}:{inspect.getsourcelines(cls)[1]})" in message
