"""`compare` is sound against pydantic itself: when it finds nothing, every payload the writer can produce loads."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, ValidationError, create_model

from eventstore_contracts import compare

# Field types: (annotation, values it holds, a default).
TYPES: dict[str, tuple[Any, st.SearchStrategy[Any], Any]] = {
    "int": (int, st.integers(), 0),
    "float": (float, st.floats(allow_nan=False, allow_infinity=False), 0.0),
    "str": (str, st.text(max_size=5), ""),
    "str?": (str | None, st.none() | st.text(max_size=5), None),
    "int[]": (list[int], st.lists(st.integers(), max_size=3), []),
    "ab": (Literal["a", "b"], st.sampled_from(["a", "b"]), "a"),
    "abc": (Literal["a", "b", "c"], st.sampled_from(["a", "b", "c"]), "a"),
    "bool": (bool, st.booleans(), False),
    "a|bb": (Literal["a", "bb"], st.sampled_from(["a", "bb"]), "a"),
    "str<=1": (Annotated[str, Field(max_length=1)], st.text(max_size=1), ""),
    "[ab]": (Annotated[str, Field(pattern="^[ab]$")], st.sampled_from(["a", "b"]), "a"),
}
NAMES = ["w", "x", "y", "z"]
Spec = dict[str, tuple[str, bool]]  # field name -> (type, required)

specs = st.dictionaries(st.sampled_from(NAMES), st.tuples(st.sampled_from(sorted(TYPES)), st.booleans()), max_size=4)


def model(spec: Spec) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for name, (kind, required) in spec.items():
        annotation, _, default = TYPES[kind]
        fields[name] = (annotation, ...) if required else (annotation, default)
    created: type[BaseModel] = create_model("Event", **fields)
    return created


@settings(max_examples=300, deadline=None)
@given(writer=specs, reader=specs, data=st.data())
def test_nothing_found_means_every_writer_payload_loads(writer: Spec, reader: Spec, data: st.DataObject) -> None:
    writer_model, reader_model = model(writer), model(reader)
    findings = compare(reader_model.model_json_schema(), writer_model.model_json_schema())
    payload = data.draw(st.fixed_dictionaries({name: TYPES[kind][1] for name, (kind, _) in writer.items()}))
    text = writer_model.model_validate(payload).model_dump_json()
    try:
        reader_model.model_validate_json(text)
    except ValidationError as exc:
        assert findings, f"compare found nothing, yet {text} fails: {exc}"


@settings(max_examples=100, deadline=None)
@given(spec=specs)
def test_a_schema_is_compatible_with_itself(spec: Spec) -> None:
    schema = json.loads(json.dumps(model(spec).model_json_schema()))
    assert compare(schema, schema, removal_breaks=True) == []
