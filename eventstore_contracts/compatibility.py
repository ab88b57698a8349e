"""Does a schema change break anyone? Stored events (read by the new code) and topic consumers.

`compare(reader, writer)` answers whether every payload valid under `writer` is valid under `reader`,
for the JSON Schemas pydantic generates (types, objects, arrays, unions, enums, references and the
usual constraints). It errs on the side of a finding: a keyword it does not understand that changed is
reported, never assumed harmless.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Any

from pydantic_core import SchemaError, SchemaValidator, core_schema

from eventstore_contracts.errors import SchemaUnreadable
from eventstore_contracts.lock import LockedTopic, SchemaLock
from eventstore_contracts.model import Contracts

STORED = "stored events"

_ANNOTATIONS = frozenset({
    "title", "description", "examples", "default", "deprecated", "readOnly", "writeOnly", "$comment",
    "$schema", "$id", "$defs", "definitions",
    "discriminator",  # an OpenAPI hint beside a oneOf, which says the same
})
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
_EXACT = ("pattern", "format", "multipleOf", "uniqueItems", "contentEncoding", "contentMediaType")
_UNDERSTOOD = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "anyOf", "oneOf",
    "allOf", "enum", "const", "$ref", *_LOWER_BOUNDS, *_UPPER_BOUNDS, *_EXACT,
})

Finding = tuple[str, str]
"""(field path, reason); the path is '' for the payload as a whole."""


@dataclass(frozen=True, slots=True)
class Incompatibility:
    """A change that breaks stored events or a topic's consumers."""

    event_type: str
    version: int
    field: str
    """Dotted path of the field (`lines[].price`), '' for the event as a whole."""
    reason: str
    breaks: str
    """`stored events`, or `consumers of TOPIC (RULE)`."""

    def __str__(self) -> str:
        where = f" field {self.field!r}" if self.field else ""
        return f"{self.event_type} v{self.version}{where}: {self.reason} (breaks {self.breaks})"


@dataclass(frozen=True, slots=True)
class CheckResult:
    breaking: list[Incompatibility] = field(default_factory=list)
    outdated: list[str] = field(default_factory=list)
    """Compatible differences between code and lock: run `eventstore schemas lock` to record them."""

    @property
    def ok(self) -> bool:
        return not self.breaking and not self.outdated


def check(contracts: Contracts, lock: SchemaLock) -> CheckResult:
    """Compare the code's schemas with the locked ones: what breaks, and what the lock has yet to record."""
    result = CheckResult()
    breaking, outdated = result.breaking, result.outdated
    for name, event in contracts.events.items():
        versions = lock.events.get(name)
        if not versions:
            outdated.append(f"{name} v{event.version} is not in the lock")
            continue
        newest = max(versions)
        if event.version < newest:
            breaking.append(Incompatibility(
                name, event.version, "",
                f"schema version went back from v{newest} to v{event.version}: events stored as v{newest} cannot load",
                STORED,
            ))
            continue
        oldest = min(versions)
        for step in range(oldest, event.version):  # every locked version needs the whole chain to the current
            if step not in event.upcasts_from:
                breaking.append(Incompatibility(
                    name, step, "",
                    f"no upcaster lifts v{step} to v{step + 1}, and events may be stored as v{oldest}"
                    f"{'' if step == oldest else f' to v{step}'}"
                    f" (register one: @registry.upcaster({name}, from_version={step}))",
                    STORED,
                ))
        if event.version in versions:
            locked = versions[event.version]
            for path, reason in compare(event.schema, locked, removal_breaks=True):
                breaking.append(Incompatibility(
                    name, event.version, path,
                    f"{reason}; bump the version (`version={event.version + 1}`) and add an upcaster", STORED,
                ))
            if locked != event.schema:
                outdated.append(f"{name} v{event.version} changed compatibly")
        else:
            outdated.append(f"{name} v{event.version} is new")
    for name in sorted(set(lock.events) - set(contracts.events)):
        breaking.append(Incompatibility(
            name, max(lock.events[name]), "",
            "event type no longer registered: its stored events cannot load (keep its class registered)", STORED,
        ))
    for topic in contracts.topics.values():
        for name in topic.event_types:
            current = contracts.events.get(name)
            previous = lock.newest(name)
            if current is None or previous is None:
                continue
            version, schema = previous
            if version == current.version and schema == current.schema:
                continue
            if topic.backward:
                breaks = f"consumers of {topic.topic} ({topic.compatibility}: new readers, old messages)"
                for path, reason in compare(current.schema, schema):
                    breaking.append(Incompatibility(name, current.version, path, reason, breaks))
            if topic.forward:
                breaks = f"consumers of {topic.topic} ({topic.compatibility}: old readers, new messages)"
                for path, reason in compare(schema, current.schema):
                    breaking.append(Incompatibility(name, current.version, path, reason, breaks))
        if lock.topics.get(topic.topic) != LockedTopic(topic.compatibility, topic.event_types):
            outdated.append(f"topic {topic.topic} changed its events or compatibility")
    for name in sorted(set(lock.topics) - set(contracts.topics)):
        outdated.append(f"topic {name} is no longer routed")
    return result


def compare(
    reader: Mapping[str, Any], writer: Mapping[str, Any], *, removal_breaks: bool = False
) -> list[Finding]:
    """Why some payload valid under `writer` is not valid under `reader` (empty: none found).

    With `removal_breaks`, a field the writer has and the reader lacks is a finding even where the
    reader would ignore it: for stored events that is data the new code silently drops.
    """
    for side, schema in (("reader", reader), ("writer", writer)):
        if not isinstance(schema, Mapping):
            raise SchemaUnreadable(f"the {side} schema must be a JSON Schema object, got {type(schema).__name__}")
    try:
        findings = _Comparison(reader, writer, removal_breaks).check(reader, writer, "")
    except RecursionError:
        raise SchemaUnreadable("a schema nests too deeply to compare") from None
    except (AttributeError, TypeError, KeyError) as exc:  # a keyword whose value has the wrong shape
        raise SchemaUnreadable(f"a schema is malformed ({type(exc).__name__}: {exc})") from None
    return list(dict.fromkeys(findings))


_HERE = "\x00"
"""The path findings of a pair of references are worked out at, so they can be moved to wherever it recurs."""


class _Comparison:
    def __init__(self, reader: Mapping[str, Any], writer: Mapping[str, Any], removal_breaks: bool) -> None:
        self._reader_root = reader
        self._writer_root = writer
        self._removal_breaks = removal_breaks
        self._open: dict[tuple[str, str], int] = {}
        """Pairs of references being compared further up (a recursive model), with their depth."""
        self._assumed = _NOTHING_ASSUMED
        """The shallowest open pair the comparison under way assumed compatible."""
        self._done: dict[tuple[str, str], tuple[list[Finding], int]] = {}
        """Findings of pairs compared (at `_HERE`), with the shallowest open pair they assumed compatible."""
        self._resting: dict[int, list[tuple[str, str]]] = {}
        """The pairs in `_done` that rest on the open pair at each depth."""

    def check(self, reader: Any, writer: Any, path: str) -> list[Finding]:
        r, r_ref = _resolve(reader, self._reader_root)
        w, w_ref = _resolve(writer, self._writer_root)
        if r_ref is None or w_ref is None:
            return self._resolved(r, w, path)
        # Keyed by the nodes, not only the references: keywords beside a `$ref` apply too.
        key = (_key(reader), _key(writer))
        depth = self._open.get(key)
        if depth is not None:  # a recursive model: assume what is being checked further up holds
            self._assumed = min(self._assumed, depth)
            return []
        if key in self._done:
            done, assumed = self._done[key]
            self._assumed = min(self._assumed, assumed)
        else:
            done = self._compare_pair(key, r, w)
        return [(_moved(where, path), reason) for where, reason in done]

    def _compare_pair(self, key: tuple[str, str], r: Any, w: Any) -> list[Finding]:
        """Compare a pair once, and keep the result while what it assumed still holds.

        A result that assumed an open pair compatible is only as good as that assumption: when the pair
        turns out incompatible (and is perhaps a union branch tried and dropped), the results resting on
        it go, or a later field comparing the same pair would be let through.
        """
        depth = self._open[key] = len(self._open)
        outer, self._assumed = self._assumed, _NOTHING_ASSUMED
        try:
            # Capped: a model shared along many paths would otherwise repeat its findings exponentially often.
            done = self._resolved(r, w, _HERE)[:_MOST_PER_PAIR]
        finally:
            del self._open[key]
            assumed, self._assumed = self._assumed, min(outer, self._assumed)
        if assumed >= depth:
            assumed = _NOTHING_ASSUMED  # only itself, or pairs closed since: a result of its own
        for resting in self._resting.pop(depth, []):
            if done:
                del self._done[resting]
            else:
                self._keep(resting, self._done[resting][0], assumed)
        self._keep(key, done, assumed)
        return done

    def _keep(self, key: tuple[str, str], findings: list[Finding], assumed: int) -> None:
        self._done[key] = (findings, assumed)
        if assumed != _NOTHING_ASSUMED:
            self._resting.setdefault(assumed, []).append(key)

    def _resolved(self, r: Any, w: Any, path: str) -> list[Finding]:
        if r is True or (isinstance(r, dict) and not (set(r) - _ANNOTATIONS)):
            return []
        if w is False:
            return []
        if r is False:
            return [(path, "no longer allowed")]
        if w is True:
            w = {}
        if _branches(w) is not None:
            findings: list[Finding] = []
            for branch in _branches(w) or ():
                for where, reason in self.check(r, _merge(w, branch), path):
                    if where == path and reason.startswith("type changed"):
                        reason = self._type_changed(r, w)  # name the whole union the writer had
                    findings.append((where, reason))
            return findings
        branches = _branches(r)
        if branches is not None:
            return self._any_of(r, branches, w, path)
        return self._single(r, w, path)

    def _any_of(self, r: dict[str, Any], branches: list[Any], w: dict[str, Any], path: str) -> list[Finding]:
        candidates: list[list[Finding]] = []
        for branch in branches:
            findings = self.check(_merge(r, branch), w, path)
            if not findings:
                return []
            merged, _ = _resolve(_merge(r, branch), self._reader_root)
            if isinstance(merged, dict) and _overlaps(_types(merged), _types(w)):
                candidates.append(findings)
        if len(candidates) == 1:
            return candidates[0]  # the one branch of the right type: say what in it broke
        return [(path, self._type_changed(r, w))]

    def _type_changed(self, r: Any, w: Any) -> str:
        return f"type changed from {_describe(w, self._writer_root)} to {_describe(r, self._reader_root)}"

    def _single(self, r: dict[str, Any], w: dict[str, Any], path: str) -> list[Finding]:
        r_values, w_values = _values(r), _values(w)
        if r_values is not None:
            if w_values is None:
                return [(path, f"now accepts only {_show(r_values)}")]
            lost = [v for v in w_values if v not in r_values]
            if lost:
                return [(path, f"no longer accepts {_show(lost)}")]
            return self._values_allowed(r, w, w_values, path)
        r_types, w_types = _types(r), _types(w)
        if r_types is not None:
            if w_types is None:
                return [(path, f"was of any type, now only {_describe(r, self._reader_root)}")]
            lost_types = {t for t in w_types if t not in r_types and not (t == "integer" and "number" in r_types)}
            if lost_types:
                return [(path, self._type_changed(r, w))]
        if w_values is not None:
            return self._values_allowed(r, w, w_values, path)
        findings: list[Finding] = []
        for keyword in _LOWER_BOUNDS:
            if keyword in r and not (keyword in w and w[keyword] >= r[keyword]):
                findings.append((path, f"new constraint {keyword} {r[keyword]!r}"))
        for keyword in _UPPER_BOUNDS:
            if keyword in r and not (keyword in w and w[keyword] <= r[keyword]):
                findings.append((path, f"new constraint {keyword} {r[keyword]!r}"))
        for keyword in _EXACT:
            if keyword in r and w.get(keyword) != r[keyword]:
                findings.append((path, f"{keyword} changed from {w.get(keyword)!r} to {r[keyword]!r}"))
        if "properties" in r or "properties" in w or "additionalProperties" in r:
            findings += self._object(r, w, path)
        findings += self._array(r, w, path)
        for keyword in sorted(set(r) - _UNDERSTOOD - _ANNOTATIONS):
            if r[keyword] != w.get(keyword):
                findings.append((path, f"{keyword} changed"))
        return findings

    def _values_allowed(self, r: dict[str, Any], w: dict[str, Any], values: list[Any], path: str) -> list[Finding]:
        """The writer's values (an enum) that the reader's constraints refuse; the types already match.

        Each value is checked against each constraint, so `Literal["a"]` to `str` with `max_length=1`
        is fine and `Literal["a", "bb"]` to it is not; a constraint that cannot be checked is a finding.
        """
        findings: list[Finding] = []
        for value in values:
            findings += self._value_allowed(r, w, value, path)
        for keyword in sorted(set(r) - _UNDERSTOOD - _ANNOTATIONS):
            if r[keyword] != w.get(keyword):
                findings.append((path, f"{keyword} changed"))
        return findings

    def _value_allowed(self, r: dict[str, Any], w: dict[str, Any], value: Any, path: str) -> list[Finding]:
        refused = _refusal(r, w, value)
        if refused is not None:
            return [(path, f"no longer accepts {value!r}: {refused}")]
        if isinstance(value, list):
            shape: dict[str, Any] = {
                "type": "array", "prefixItems": [{"const": v} for v in value], "items": False,
            }
            return self._array(r, shape, path)
        if isinstance(value, dict):
            shape = {
                "type": "object", "properties": {k: {"const": v} for k, v in value.items()},
                "required": list(value), "additionalProperties": False,
            }
            return self._object(r, shape, path) if {"properties", "additionalProperties"} & set(r) else []
        return []

    def _object(self, r: dict[str, Any], w: dict[str, Any], path: str) -> list[Finding]:
        findings: list[Finding] = []
        r_props: dict[str, Any] = r.get("properties", {})
        w_props: dict[str, Any] = w.get("properties", {})
        r_required, w_required = set(r.get("required", ())), set(w.get("required", ()))
        r_extra = r.get("additionalProperties", True)
        w_extra = w.get("additionalProperties", True)
        for name, schema in r_props.items():
            sub = _join(path, name)
            if name in w_props:
                findings += self.check(schema, w_props[name], sub)
                if name in r_required and name not in w_required:
                    findings.append((sub, "became required, and older payloads may lack it"))
            elif name in r_required:
                findings.append((sub, "required field added without a default"))
        for name, schema in w_props.items():
            if name in r_props:
                continue
            sub = _join(path, name)
            if r_extra is False:
                findings.append((sub, "field removed, and unknown fields are refused"))
            elif self._removal_breaks:
                findings.append((sub, "field removed: stored payloads still carry it"))
            elif isinstance(r_extra, dict):
                findings += self.check(r_extra, schema, sub)
        if isinstance(r_extra, dict) and isinstance(w_extra, dict):
            findings += self.check(r_extra, w_extra, path + "{}")
        elif r_extra is False and isinstance(w_extra, dict):
            findings.append((path, "no longer accepts other keys"))
        return findings

    def _array(self, r: dict[str, Any], w: dict[str, Any], path: str) -> list[Finding]:
        findings: list[Finding] = []
        if "prefixItems" in r:
            r_items, w_items = r["prefixItems"], w.get("prefixItems")
            if not isinstance(w_items, list) or len(w_items) != len(r_items):
                return [(path, "tuple shape changed")]
            for index, (r_item, w_item) in enumerate(zip(r_items, w_items, strict=True)):
                findings += self.check(r_item, w_item, f"{path}[{index}]")
        if "items" in r:
            if "items" in w:
                findings += self.check(r["items"], w["items"], path + "[]")
            elif isinstance(w.get("prefixItems"), list):
                for index, w_item in enumerate(w["prefixItems"]):
                    findings += self.check(r["items"], w_item, f"{path}[{index}]")
            else:
                findings += self.check(r["items"], {}, path + "[]")
        return findings


def _resolve(node: Any, root: Mapping[str, Any]) -> tuple[Any, str | None]:
    """Follow `$ref`s (local ones, as pydantic writes them); sibling keywords are kept beside the target."""
    ref: str | None = None
    for _ in range(32):
        if not isinstance(node, dict):
            return node, ref
        if "$ref" in node:
            ref = node["$ref"]
            target = _pointer(root, node["$ref"])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node = {**target, **rest} if isinstance(target, dict) and rest else target
            continue
        all_of = node.get("allOf")
        if isinstance(all_of, list) and len(all_of) == 1:
            node = _merge({k: v for k, v in node.items() if k != "allOf"}, all_of[0])
            continue
        return node, ref
    return node, ref


def _pointer(root: Mapping[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        return {"$unresolved": ref}  # a remote reference: compared as an opaque keyword
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return {"$unresolved": ref}
        node = node[part]
    return node


def _branches(node: Any) -> list[Any] | None:
    if not isinstance(node, dict):
        return None
    branches = node.get("anyOf", node.get("oneOf"))
    return branches if isinstance(branches, list) else None


def _merge(outer: dict[str, Any], branch: Any) -> Any:
    """A union branch with the union's own keywords (other than the union) beside it."""
    rest = {k: v for k, v in outer.items() if k not in ("anyOf", "oneOf")}
    if not isinstance(branch, dict) or not (set(rest) - _ANNOTATIONS):
        return branch
    return {**rest, **branch}


def _refusal(r: dict[str, Any], w: dict[str, Any], value: Any) -> str | None:
    """Why the constraints of `r` (bounds, pattern, format, ...) refuse `value`, as JSON Schema applies them."""
    kind = _JSON_TYPES.get(type(value), "object")
    size: int | float = 0
    bounds: tuple[str, ...] = ()
    if kind == "string":
        for keyword in ("pattern", "format", "contentEncoding", "contentMediaType"):
            if keyword not in r or (keyword != "pattern" and w.get(keyword) == r[keyword]):
                continue
            matches = _pattern(r["pattern"]) if keyword == "pattern" and isinstance(r["pattern"], str) else None
            if matches is None:
                return f"{keyword} {r[keyword]!r} cannot be checked here"
            if not matches.isinstance_python(value):
                return f"does not match pattern {r['pattern']!r}"
        size, bounds = len(value), ("minLength", "maxLength")
    elif kind in ("integer", "number"):
        if "multipleOf" in r and not _multiple(value, r["multipleOf"]):
            return f"not a multiple of {r['multipleOf']!r}"
        size, bounds = value, ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    elif kind == "array":
        if r.get("uniqueItems") is True and len({_key(v) for v in value}) != len(value):
            return "items must be unique"
        size, bounds = len(value), ("minItems", "maxItems")
    elif kind == "object":
        size, bounds = len(value), ("minProperties", "maxProperties")
    for keyword in bounds:
        if keyword not in r:
            continue
        limit = r[keyword]
        if isinstance(limit, bool) or not isinstance(limit, int | float):
            raise TypeError(f"{keyword} must be a number, got {limit!r}")
        if keyword.startswith("exclusive"):
            fits = size > limit if keyword == "exclusiveMinimum" else size < limit
        else:
            fits = size >= limit if keyword.startswith("min") else size <= limit
        if not fits:
            return f"new constraint {keyword} {limit!r}"
    return None


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> SchemaValidator | None:
    """A string validator of the pattern as pydantic runs it (Rust's regex: linear time, and its dialect)."""
    try:
        return SchemaValidator(core_schema.str_schema(pattern=pattern))
    except SchemaError:
        return None


def _multiple(value: int | float, divisor: Any) -> bool:
    if isinstance(divisor, bool) or not isinstance(divisor, int | float) or divisor <= 0:
        raise TypeError(f"multipleOf must be a positive number, got {divisor!r}")
    try:
        return Fraction(str(value)) % Fraction(str(divisor)) == 0  # as written: 0.3 is a multiple of 0.1
    except (ValueError, OverflowError):  # infinity and NaN are no multiple of anything
        return False


def _values(node: dict[str, Any]) -> list[Any] | None:
    if "const" in node:
        return [node["const"]]
    enum = node.get("enum")
    return list(enum) if isinstance(enum, list) else None


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null",
               list: "array", dict: "object"}


def _types(node: Any) -> set[str] | None:
    if not isinstance(node, dict):
        return None
    declared = node.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)}
    values = _values(node)
    if values is not None:
        return {_JSON_TYPES.get(type(v), "object") for v in values}
    if "properties" in node:
        return {"object"}
    if "items" in node or "prefixItems" in node:
        return {"array"}
    return None


def _overlaps(left: set[str] | None, right: set[str] | None) -> bool:
    if left is None or right is None:
        return True
    widened = right | ({"number"} if "integer" in right else set())
    return bool(left & widened)


def _describe(node: Any, root: Mapping[str, Any]) -> str:
    resolved, ref = _resolve(node, root)
    if ref is not None:
        return ref.rsplit("/", 1)[-1]
    branches = _branches(resolved)
    if branches is not None:
        return " | ".join(_describe(b, root) for b in branches)
    values = _values(resolved) if isinstance(resolved, dict) else None
    if values is not None:
        return _show(values)
    types = _types(resolved)
    if types is None:
        return "any"
    text = " | ".join(sorted(types))
    if isinstance(resolved, dict) and "items" in resolved and types == {"array"}:
        return f"array of {_describe(resolved['items'], root)}"
    return text


def _show(values: list[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_NOTHING_ASSUMED = 1 << 62
_MOST_PER_PAIR = 100


def _key(node: Any) -> str:
    return json.dumps(node, sort_keys=True, default=repr)


def _moved(where: str, path: str) -> str:
    """A path found at `_HERE`, where the pair really is."""
    rest = where[len(_HERE):]
    if path:
        return path + rest
    return rest[1:] if rest.startswith(".") else rest
