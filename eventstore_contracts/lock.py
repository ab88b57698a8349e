"""The schema lock file: every schema version of every event type the application has shipped.

Old versions live only here: the code keeps the newest class of an event and upcasters from the older
shapes, so the lock is what remembers what the stored events of v1 look like. Commit it; `eventstore
schemas check` compares the code with it, `eventstore schemas lock` updates it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from eventstore_contracts.errors import LockFileError
from eventstore_contracts.model import Contracts
from outbox import COMPATIBILITY, Compatibility

LOCK_FORMAT = 1
"""The lock file format this version writes and the newest it reads."""

DEFAULT_LOCK_FILE = "eventstore.schemas.lock"

MAX_NESTING = 128
"""How deeply a locked schema may nest: far beyond what pydantic writes (nested models are `$defs`),
and shallow enough that comparing, copying and writing it again stay clear of Python's recursion limit."""


@dataclass(frozen=True, slots=True)
class LockedTopic:
    compatibility: Compatibility
    event_types: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SchemaLock:
    """The locked schemas: `events[type][version]` is a JSON Schema; `topics` what each topic carried."""

    events: Mapping[str, Mapping[int, Mapping[str, Any]]] = field(default_factory=dict)
    topics: Mapping[str, LockedTopic] = field(default_factory=dict)
    application: str | None = None

    def newest(self, event_type: str) -> tuple[int, Mapping[str, Any]] | None:
        versions = self.events.get(event_type)
        if not versions:
            return None
        version = max(versions)
        return version, versions[version]


def locked(contracts: Contracts, previous: SchemaLock | None = None) -> SchemaLock:
    """The lock for `contracts`: the current version of each type from the code, older ones kept from `previous`.

    Types the code no longer registers are dropped (only `lock --force` gets here with any).
    """
    events: dict[str, dict[int, Mapping[str, Any]]] = {}
    for name, event in contracts.events.items():
        kept = dict(previous.events.get(name, {})) if previous is not None else {}
        versions = {v: s for v, s in kept.items() if v < event.version}
        versions[event.version] = event.schema
        events[name] = dict(sorted(versions.items()))
    topics = {
        name: LockedTopic(topic.compatibility, topic.event_types) for name, topic in contracts.topics.items()
    }
    return SchemaLock(dict(sorted(events.items())), topics, contracts.name)


def lock_text(lock: SchemaLock) -> str:
    """The file's text: stable (sorted types and versions), one key per line, so diffs review well."""
    document = {
        "format": LOCK_FORMAT,
        "generator": f"eventstore {_version()}",
        "application": lock.application,
        "events": {
            name: {str(version): schema for version, schema in sorted(versions.items())}
            for name, versions in sorted(lock.events.items())
        },
        "topics": {
            name: {"compatibility": topic.compatibility, "events": list(topic.event_types)}
            for name, topic in sorted(lock.topics.items())
        },
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write_lock(path: str | Path, lock: SchemaLock) -> None:
    target = Path(path)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(lock_text(lock), encoding="utf-8")
    temporary.replace(target)  # a reader never sees half a lock


def read_lock(path: str | Path) -> SchemaLock:
    """Read a lock file; raise `LockFileError` (with the line) if it is malformed or from a newer eventstore."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockFileError(path, 1, "no such lock file: create it with `eventstore schemas lock`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LockFileError(path, 1, f"cannot read the lock file: {exc}") from None
    return parse_lock(text, path)


def parse_lock(text: str, path: str | Path = "<lock>") -> SchemaLock:
    reader = _Reader(text, path)
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise LockFileError(path, exc.lineno, f"not JSON: {exc.msg} (column {exc.colno})") from None
    except _DuplicateKey as exc:
        raise LockFileError(
            path, reader.repeated_line(),
            f"key {exc.key!r} appears twice in one object, and the second would silently replace the first"
            " (an unresolved merge?)",
        ) from None
    except RecursionError:
        raise LockFileError(
            path, reader.nesting_line(MAX_NESTING), f"nests more than {MAX_NESTING} levels deep"
        ) from None
    if not isinstance(document, dict):
        raise reader.error((), "a lock file is a JSON object")
    version = document.get("format")
    if isinstance(version, bool) or not isinstance(version, int):
        raise reader.error(("format",) if "format" in document else (), "'format' must be the lock format number")
    if version > LOCK_FORMAT:
        raise reader.error(
            ("format",),
            f"written by a newer eventstore ({document.get('generator', 'unknown')}, lock format {version});"
            f" this one ({_version()}) reads format {LOCK_FORMAT} and older: upgrade eventstore",
        )
    if version < 1:
        raise reader.error(("format",), f"lock format must be 1 or more, got {version}")
    application = document.get("application")
    if application is not None and not isinstance(application, str):
        raise reader.error(("application",), "'application' must be a string")
    events: dict[str, dict[int, Mapping[str, Any]]] = {}
    for name, versions in reader.object(document, ("events",)).items():
        where = ("events", name)
        if not isinstance(versions, dict) or not versions:
            raise reader.error(where, f"event type {name!r} must map schema versions to schemas")
        events[name] = {}
        for number, schema in versions.items():
            if not (number.isascii() and number.isdigit() and int(number) >= 1):
                raise reader.error((*where, number), f"{name}: schema version {number!r} is not an integer >= 1")
            if number != str(int(number)):  # else "1" and "01" could both be there, one hiding the other
                raise reader.error(
                    (*where, number), f"{name}: schema version {number!r} must be written {str(int(number))!r}"
                )
            if not isinstance(schema, dict):
                raise reader.error((*where, number), f"{name} v{number}: a schema must be a JSON object")
            if _depth(schema) > MAX_NESTING:
                raise reader.error((*where, number), f"{name} v{number}: the schema nests more than {MAX_NESTING}"
                                   " levels deep")
            events[name][int(number)] = schema
    topics: dict[str, LockedTopic] = {}
    for name, topic in reader.object(document, ("topics",)).items():
        where = ("topics", name)
        if not isinstance(topic, dict):
            raise reader.error(where, f"topic {name!r} must be an object")
        compatibility = topic.get("compatibility")
        if compatibility not in COMPATIBILITY:
            raise reader.error(
                (*where, "compatibility") if "compatibility" in topic else where,
                f"topic {name!r}: compatibility must be one of {', '.join(COMPATIBILITY)}, got {compatibility!r}",
            )
        types = topic.get("events")
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise reader.error((*where, "events") if "events" in topic else where,
                               f"topic {name!r}: 'events' must be a list of event types")
        topics[name] = LockedTopic(compatibility, tuple(types))
    return SchemaLock(events, topics, application)


class _Reader:
    """Finds the line of a key path in the lock's text, for errors (json reports lines only for syntax)."""

    def __init__(self, text: str, path: str | Path) -> None:
        self._text = text
        self._path = path

    def line(self, keys: tuple[str, ...]) -> int:
        offset = 0
        for key in keys:
            found = self._text.find(json.dumps(key, ensure_ascii=False) + ":", offset)
            if found < 0:
                found = self._text.find(json.dumps(key, ensure_ascii=False), offset)
            if found < 0:
                break
            offset = found
        return self._text.count("\n", 0, offset) + 1

    def repeated_line(self) -> int:
        """The line of the first key that repeats one before it in the same object (the text is JSON)."""
        text, offset = self._text, 0
        keys: list[set[str]] = []  # of each open object (and array, which never gets any)
        try:
            while offset < len(text):
                char = text[offset]
                if char == '"':
                    close = offset + 1
                    while text[close] != '"':
                        close += 2 if text[close] == "\\" else 1
                    after = close + 1
                    while text[after] in " \t\r\n":
                        after += 1
                    if text[after] == ":" and keys:
                        key = json.loads(text[offset : close + 1])
                        if key in keys[-1]:
                            return text.count("\n", 0, offset) + 1
                        keys[-1].add(key)
                    offset = close + 1
                    continue
                if char in "{[":
                    keys.append(set())
                elif char in "}]" and keys:
                    keys.pop()
                offset += 1
        except (IndexError, ValueError):
            pass
        return 1

    def nesting_line(self, limit: int) -> int:
        """The line where the text nests more than `limit` levels deep (inside the lock's own three)."""
        depth, in_string, escaped = 0, False, False
        for offset, char in enumerate(self._text):
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char in "[{":
                depth += 1
                if depth > limit + 3:
                    return self._text.count("\n", 0, offset) + 1
            elif char in "]}":
                depth -= 1
        return 1

    def error(self, keys: tuple[str, ...], reason: str) -> LockFileError:
        return LockFileError(self._path, self.line(keys), reason)

    def object(self, document: dict[str, Any], keys: tuple[str]) -> dict[str, Any]:
        value = document.get(keys[0], {})
        if not isinstance(value, dict):
            raise self.error(keys, f"{keys[0]!r} must be a JSON object")
        return value


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads` keeps the last of repeated keys without a word; a lock file must not lose a version so."""
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return document


def _depth(node: Any) -> int:
    """How deeply JSON data nests (without recursing: that is what this guards against), stopping past the limit."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(node, 1)]
    while pending and deepest <= MAX_NESTING:
        item, level = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            pending.extend((child, level + 1) for child in item)
    return deepest


def _version() -> str:
    try:
        return metadata.version("eventstore")
    except metadata.PackageNotFoundError:
        return "unknown"
