"""The compatibility rules: what breaks stored events, what breaks a topic's consumers, what only needs locking."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field, ValidationError

from aggregates import DomainEvent, EventRegistry
from eventstore_app import Application
from eventstore_contracts import CheckResult, Contracts, Incompatibility, check, compare, event_schema, locked
from outbox import Compatibility, Route


def app_of(
    *events: type[DomainEvent], upcasters: tuple[int, ...] = (), topic: Compatibility | None = None
) -> Application:
    registry = EventRegistry(*events)
    for event in events:
        for version in upcasters:
            registry.add_upcaster(event, version, lambda data: data)
    routes = None if topic is None else [Route("orders", [e.event_type for e in events], compatibility=topic)]
    return Application("orders-service", registry=registry, routes=routes)


def check_change(before: Application, after: Application) -> CheckResult:
    return check(Contracts.of(after), locked(Contracts.of(before)))


def breaking(result: CheckResult) -> list[tuple[str, int, str, str]]:
    return [(p.event_type, p.version, p.field, p.breaks) for p in result.breaking]


class Placed(DomainEvent, event_type="OrderPlaced"):
    customer: str
    total: int


def test_the_same_code_passes_its_own_lock() -> None:
    result = check_change(app_of(Placed, topic="full"), app_of(Placed, topic="full"))
    assert result.ok and result.breaking == [] and result.outdated == []


def test_a_retyped_field_breaks_stored_events_naming_type_and_field() -> None:
    class Retyped(DomainEvent, event_type="OrderPlaced"):
        customer: str
        total: str

    result = check_change(app_of(Placed), app_of(Retyped))
    assert breaking(result) == [("OrderPlaced", 1, "total", "stored events")]
    assert "type changed from integer to string" in str(result.breaking[0])
    assert "OrderPlaced v1 field 'total'" in str(result.breaking[0])


def test_a_removed_field_and_a_required_field_added_without_default_break_stored_events() -> None:
    class Changed(DomainEvent, event_type="OrderPlaced"):
        total: int
        currency: str

    result = check_change(app_of(Placed), app_of(Changed))
    found = {(p.field, p.reason.split(";")[0]) for p in result.breaking}
    assert found == {
        ("customer", "field removed: stored payloads still carry it"),
        ("currency", "required field added without a default"),
    }


def test_compatible_changes_only_ask_for_a_new_lock() -> None:
    class Widened(DomainEvent, event_type="OrderPlaced"):
        customer: str | None  # accepts every old value, and null
        total: float  # integer is a number
        note: str = ""  # optional: old events lack it and still load

    result = check_change(app_of(Placed), app_of(Widened))
    assert result.breaking == []
    assert result.outdated == ["OrderPlaced v1 changed compatibly"]
    assert not result.ok


def test_narrowing_breaks_optional_to_required_enums_and_constraints() -> None:
    class Loose(DomainEvent, event_type="Shipped"):
        carrier: Literal["dhl", "ups", "post"]
        tracking: str | None = None
        weight: int

    class Strict(DomainEvent, event_type="Shipped"):
        carrier: Literal["dhl", "ups"]
        tracking: str
        weight: int = Field(ge=0)

    reasons = {(p.field, p.reason.split(";")[0]) for p in check_change(app_of(Loose), app_of(Strict)).breaking}
    assert ("carrier", "no longer accepts 'post'") in reasons
    assert ("tracking", "became required, and older payloads may lack it") in reasons
    assert ("tracking", "type changed from string | null to string") in reasons
    assert ("weight", "new constraint minimum 0") in reasons


def test_nested_models_are_compared_field_by_field() -> None:
    class Line(BaseModel):
        sku: str
        price: int

    class LineNow(BaseModel):
        sku: str
        price: str

    class WithLines(DomainEvent, event_type="OrderPlaced"):
        lines: list[Line]

    class WithLinesNow(DomainEvent, event_type="OrderPlaced"):
        lines: list[LineNow]

    result = check_change(app_of(WithLines), app_of(WithLinesNow))
    assert [(p.field, p.reason.split(";")[0]) for p in result.breaking] == [
        ("lines[].price", "type changed from integer to string")
    ]


def test_a_recursive_model_is_compared_without_looping() -> None:
    class Node(BaseModel):
        name: str
        children: list[Node] = []

    class TreeChanged(DomainEvent, event_type="TreeChanged"):
        root: Node

    schema = event_schema(TreeChanged)
    assert compare(schema, schema) == []


class Inner(BaseModel):
    a: int


class Other(BaseModel):
    b: str


class Wrapped(BaseModel):
    x: Inner


class WrappedOther(BaseModel):
    x: Other


def test_a_pair_compared_in_a_dropped_union_branch_is_still_compared_for_another_field() -> None:
    class Before(DomainEvent, event_type="Wrapped"):
        p: Wrapped
        q: Inner

    class After(DomainEvent, event_type="Wrapped"):
        p: WrappedOther | Wrapped  # its first branch compares (Other, Inner), fails, and is dropped
        q: Other  # the same pair: must still be compared

    with pytest.raises(ValidationError):
        After.model_validate_json(Before(p=Wrapped(x=Inner(a=1)), q=Inner(a=2)).model_dump_json())
    result = check_change(app_of(Before), app_of(After))
    assert {(p.field, p.reason.split(";")[0]) for p in result.breaking} == {
        ("q.a", "field removed: stored payloads still carry it"),
        ("q.b", "required field added without a default"),
    }


def test_new_constraints_are_checked_against_every_old_enum_value() -> None:
    class Sized(DomainEvent, event_type="Sized"):
        size: Literal["s", "xl"]
        count: Literal[1, 2, 3]
        step: Literal[0.3, 0.6]

    class OneLetter(DomainEvent, event_type="Sized"):
        size: Annotated[str, Field(max_length=1)]
        count: Annotated[int, Field(ge=1, lt=3)]
        step: Annotated[float, Field(multiple_of=0.3)]

    class Lowercase(DomainEvent, event_type="Sized"):
        size: Annotated[str, Field(pattern="^[a-z]$")] | None
        count: Annotated[int, Field(ge=1, le=3)]  # every old value fits: fine
        step: Annotated[float, Field(multiple_of=0.2)]

    for after in (OneLetter, Lowercase):
        with pytest.raises(ValidationError):
            after.model_validate_json(Sized(size="xl", count=3, step=0.3).model_dump_json())
    assert {(p.field, p.reason.split(";")[0]) for p in check_change(app_of(Sized), app_of(OneLetter)).breaking} == {
        ("size", "no longer accepts 'xl': new constraint maxLength 1"),
        ("count", "no longer accepts 3: new constraint exclusiveMaximum 3"),
    }  # 0.3 and 0.6 are multiples of 0.3 as written, whatever floats make of them
    assert {(p.field, p.reason.split(";")[0]) for p in check_change(app_of(Sized), app_of(Lowercase)).breaking} == {
        ("size", "no longer accepts 'xl': does not match pattern '^[a-z]$'"),
        ("step", "no longer accepts 0.3: not a multiple of 0.2"),
    }

    class Small(DomainEvent, event_type="Small"):
        size: Literal["s", "m"]

    class AnyLetter(DomainEvent, event_type="Small"):
        size: Annotated[str, Field(max_length=1, pattern="^[a-z]$")]

    class Dated(DomainEvent, event_type="Small"):
        size: date

    assert check_change(app_of(Small), app_of(AnyLetter)).breaking == []  # every old value fits
    assert [p.reason.split(";")[0] for p in check_change(app_of(Small), app_of(Dated)).breaking] == [
        "no longer accepts 's': format 'date' cannot be checked here",
        "no longer accepts 'm': format 'date' cannot be checked here",
    ]


def test_a_version_bump_needs_an_upcaster_from_every_locked_version() -> None:
    class PlacedV2(DomainEvent, event_type="OrderPlaced", version=2):
        customer: str
        total: int
        currency: str

    without = check_change(app_of(Placed), app_of(PlacedV2))
    assert breaking(without) == [("OrderPlaced", 1, "", "stored events")]
    assert "no upcaster lifts v1 to v2" in without.breaking[0].reason

    with_upcaster = check_change(app_of(Placed), app_of(PlacedV2, upcasters=(1,)))
    assert with_upcaster.breaking == [] and with_upcaster.outdated == ["OrderPlaced v2 is new"]

    class PlacedV3(DomainEvent, event_type="OrderPlaced", version=3):
        customer: str
        total: int
        currency: str

    # v2 never shipped, but a stored v1 event goes through v2 on its way to v3: each step needs an upcaster.
    gap = check_change(app_of(Placed), app_of(PlacedV3, upcasters=(1,)))
    assert [(p.version, p.reason.split(",")[0]) for p in gap.breaking] == [(2, "no upcaster lifts v2 to v3")]


def test_going_back_a_version_or_dropping_a_type_breaks_stored_events() -> None:
    class PlacedV2(DomainEvent, event_type="OrderPlaced", version=2):
        customer: str
        total: int

    class Other(DomainEvent):
        x: int

    back = check_change(app_of(PlacedV2, upcasters=(1,)), app_of(Placed))
    assert "went back from v2 to v1" in back.breaking[0].reason
    dropped = check_change(app_of(Placed, Other), app_of(Other))
    assert breaking(dropped) == [("OrderPlaced", 1, "", "stored events")]
    assert "no longer registered" in dropped.breaking[0].reason


class PlacedV2(DomainEvent, event_type="OrderPlaced", version=2):
    """A new version: `customer` gone, `channel` added (the upcaster maps stored events)."""

    total: int
    channel: str


def topic_findings(compatibility: Compatibility) -> set[tuple[str, str]]:
    result = check_change(app_of(Placed, topic=compatibility), app_of(PlacedV2, upcasters=(1,), topic=compatibility))
    assert all(p.breaks.startswith("consumers of orders") for p in result.breaking), result.breaking
    return {(p.field, p.breaks.split("(")[1].split(":")[0]) for p in result.breaking}


def test_topic_rules_protect_consumers_even_when_an_upcaster_protects_stored_events() -> None:
    # backward: consumers on v2 reading v1 messages miss the new required `channel`.
    assert topic_findings("backward") == {("channel", "backward")}
    # forward: consumers still on v1 reading v2 messages miss `customer`, which they require.
    assert topic_findings("forward") == {("customer", "forward")}
    assert topic_findings("full") == {("channel", "full"), ("customer", "full")}
    assert topic_findings("none") == set()


def test_forward_consumers_ignore_added_optional_fields_but_not_closed_models() -> None:
    class Extended(DomainEvent, event_type="OrderPlaced"):
        customer: str
        total: int
        note: str = ""

    result = check_change(app_of(Placed, topic="forward"), app_of(Extended, topic="forward"))
    assert result.breaking == []
    closed: dict[str, Any] = {**event_schema(Placed), "additionalProperties": False}
    assert compare(closed, event_schema(Extended)) == [("note", "field removed, and unknown fields are refused")]


def test_incompatibility_reads_as_one_line() -> None:
    problem = Incompatibility("OrderPlaced", 3, "lines[].price", "type changed from integer to string", "stored events")
    assert str(problem) == (
        "OrderPlaced v3 field 'lines[].price': type changed from integer to string (breaks stored events)"
    )


def test_a_new_variant_of_a_discriminated_union_is_compatible_a_dropped_one_is_not() -> None:
    class Card(BaseModel):
        kind: Literal["card"]
        last4: str

    class Cash(BaseModel):
        kind: Literal["cash"]

    class Voucher(BaseModel):
        kind: Literal["voucher"]
        code: str

    class Paid(DomainEvent, event_type="Paid"):
        method: Annotated[Card | Cash, Field(discriminator="kind")]

    class PaidMoreWays(DomainEvent, event_type="Paid"):
        method: Annotated[Card | Cash | Voucher, Field(discriminator="kind")]

    assert check_change(app_of(Paid), app_of(PaidMoreWays)).breaking == []
    dropped = check_change(app_of(PaidMoreWays), app_of(Paid)).breaking
    assert [(p.field, p.reason.split(";")[0]) for p in dropped] == [
        ("method", "type changed from Card | Cash | Voucher to Card | Cash")
    ]


def test_a_schema_the_check_cannot_read_is_a_typed_error() -> None:
    import pytest

    from eventstore_contracts import SchemaUnreadable

    deep: dict[str, Any] = {}
    for _ in range(5_000):
        deep = {"type": "array", "items": deep}
    string = {"type": "string"}
    for reader, writer in [
        ("abc", string),
        (string, ["not", "a", "schema"]),
        ({"type": "object", "properties": [1, 2]}, {"type": "object", "properties": {"a": {}}}),
        (deep, deep),
    ]:
        with pytest.raises(SchemaUnreadable):
            compare(reader, writer)  # type: ignore[arg-type]
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}}}
    assert compare(tree, tree) == []  # a recursive schema is not a deep one
