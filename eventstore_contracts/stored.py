"""Do the stored events still load? Every event in the log, through the current classes and upcasters."""

from __future__ import annotations

from dataclasses import dataclass

from aggregates import EventDecodeError, EventRegistry, UnknownEventType
from aggregates.events import stored_schema_version
from eventstore import START, EventStore


@dataclass(slots=True)
class StoredVersion:
    """The events of one type stored at one schema version, and how many of them failed to load."""

    event_type: str
    schema_version: int | None
    """None where the metadata's version itself is unreadable."""
    events: int = 0
    failed: int = 0
    first_failure: str | None = None
    """The first failure's reason, with its stream and version."""

    @property
    def ok(self) -> bool:
        return self.failed == 0


@dataclass(slots=True)
class StoredReport:
    versions: list[StoredVersion]

    @property
    def ok(self) -> bool:
        return all(v.ok for v in self.versions)

    @property
    def events(self) -> int:
        return sum(v.events for v in self.versions)

    @property
    def failures(self) -> list[StoredVersion]:
        return [v for v in self.versions if not v.ok]


async def verify_stored(
    store: EventStore,
    registry: EventRegistry,
    *,
    category: str | None = None,
    ignore_unknown: bool = False,
    batch_size: int = 2000,
) -> StoredReport:
    """Decode every stored event (of `category`, if given) with `registry`; report by type and version.

    Every event is decoded, not a sample: one bad payload among a million is what this is for. An event
    of a type the registry does not know fails (`UnknownEventType`) unless `ignore_unknown` is set.
    """
    found: dict[tuple[str, int | None], StoredVersion] = {}
    # Every event committed by now, also those a transaction still running elsewhere holds back.
    await store.wait_until_visible(await store.last_committed())
    after = START
    while batch := await store.read_all(after, limit=batch_size, category=category):
        after = batch[-1].checkpoint
        for recorded in batch:
            if ignore_unknown and recorded.event_type not in registry:
                continue
            try:
                version: int | None = stored_schema_version(recorded)
            except EventDecodeError:
                version = None
            key = (recorded.event_type, version)
            entry = found.get(key)
            if entry is None:
                entry = found[key] = StoredVersion(recorded.event_type, version)
            entry.events += 1
            try:
                registry.decode(recorded)
            except (EventDecodeError, UnknownEventType) as exc:
                entry.failed += 1
                if entry.first_failure is None:
                    entry.first_failure = str(exc)
    return StoredReport(sorted(found.values(), key=lambda v: (v.event_type, v.schema_version or 0)))
