"""Schema files: one JSON Schema per event type and version, named the way `ce_dataschema` points at them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eventstore_contracts.lock import SchemaLock
from eventstore_contracts.model import JSON_SCHEMA_DIALECT, Contracts
from outbox.cloudevents import path_segment


def all_versions(contracts: Contracts, lock: SchemaLock | None) -> dict[str, dict[int, Mapping[str, Any]]]:
    """Every known schema of every registered type: older versions from the lock, the current one from the code."""
    schemas: dict[str, dict[int, Mapping[str, Any]]] = {}
    for name, event in contracts.events.items():
        versions = dict(lock.events.get(name, {})) if lock is not None else {}
        versions = {v: s for v, s in versions.items() if v < event.version}
        versions[event.version] = event.schema
        schemas[name] = dict(sorted(versions.items()))
    return schemas


def standalone_schema(contracts: Contracts, event_type: str, version: int, schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema as a document of its own: dialect, and `$id` equal to the messages' `ce_dataschema`."""
    document: dict[str, Any] = {"$schema": JSON_SCHEMA_DIALECT}
    schema_id = contracts.schema_id(event_type, version)
    if schema_id is not None:
        document["$id"] = schema_id
    document.update(schema)
    return document


def schema_folder(event_type: str) -> str:
    """The folder name of a type's schemas: percent-encoded, as in `ce_dataschema` URIs, so `unquote` reverses it.

    A leading dot is encoded too: `.` and `..` are valid type names, and as folder names they would
    write into DIR itself or outside it (and a hidden folder is easy to miss).
    """
    return path_segment(event_type)


def export_schemas(contracts: Contracts, lock: SchemaLock | None, directory: str | Path) -> list[Path]:
    """Write `DIR/<type>/v<version>.json` for every known version; return the files written."""
    root = Path(directory)
    written: list[Path] = []
    for name, versions in all_versions(contracts, lock).items():
        folder = root / schema_folder(name)
        folder.mkdir(parents=True, exist_ok=True)
        for version, schema in versions.items():
            path = folder / f"v{version}.json"
            document = standalone_schema(contracts, name, version, schema)
            path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
    return written
