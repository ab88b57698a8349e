"""Does a schema change break anyone? Stored events (read by the new code) and topic consumers.

`compare(reader, writer)` answers whether every payload valid under `writer` is valid under `reader`,
for the JSON Schemas pydantic generates (types, objects, arrays, unions, enums, references and the
usual constraints). It errs on the side of a finding: a keyword it does not understand that changed is
reported, never assumed harmless.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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


class _Comparison:
    def __init__(self, reader: Mapping[str, Any], writer: Mapping[str, Any], removal_breaks: bool) -> None:
        self._reader_root = reader
        self._writer_root = writer
        self._removal_breaks = removal_breaks
        self._seen: set[tuple[str, str]] = set()

    def check(self, reader: Any, writer: Any, path: str) -> list[Finding]:
        r, r_ref = _resolve(reader, self._reader_root)
        w, w_ref = _resolve(writer, self._writer_root)
        if r_ref is not None and w_ref is not None:
            if (r_ref, w_ref) in self._seen:
                return []  # a recursive model: assume what is being checked further up
            self._seen.add((r_ref, w_ref))
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
            return [(path, f"no longer accepts {_show(lost)}")] if lost else []
        r_types, w_types = _types(r), _types(w)
        if r_types is not None:
            if w_types is None:
                return [(path, f"was of any type, now only {_describe(r, self._reader_root)}")]
            lost_types = {t for t in w_types if t not in r_types and not (t == "integer" and "number" in r_types)}
            if lost_types:
                return [(path, self._type_changed(r, w))]
        if w_values is not None:
            return []
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
