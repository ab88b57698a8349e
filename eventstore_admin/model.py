"""What the console shows, in its own types: the pages and the JSON endpoints depend on these, not on the
library's, so a change in the library is absorbed by `backend` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from eventstore import MAX_BIGINT

RebuildPhase = Literal["starting", "building", "swapping", "done", "failed"]


@dataclass(frozen=True, slots=True)
class StreamSummary:
    stream_id: str
    version: int
    created_at: datetime
    first_position: int
    """Position of the stream's first event: its place in the newest-first order, and the paging key."""


@dataclass(frozen=True, slots=True)
class StreamPage:
    streams: list[StreamSummary]
    older: int | None
    """Cursor of the next (older) page: list streams created before this position."""
    newer: int | None
    """Cursor of the previous (newer) page: list streams created after this position."""


@dataclass(frozen=True, slots=True)
class StreamInfo:
    stream_id: str
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class EventView:
    """One stored event, its JSON pretty-printed for people (and never trusted: templates escape it)."""

    position: int
    log_xid: int
    stream_id: str
    version: int
    event_type: str
    event_id: str
    recorded_at: datetime
    data: str
    metadata: str

    def brief(self, limit: int = 2000) -> dict[str, Any]:
        """The live log's form: compact, with the data cut to `limit` characters."""
        data = self.data if len(self.data) <= limit else self.data[:limit] + " …"
        return {
            "position": self.position,
            "stream_id": self.stream_id,
            "version": self.version,
            "type": self.event_type,
            "recorded_at": self.recorded_at.isoformat(timespec="milliseconds"),
            "data": data,
        }


@dataclass(frozen=True, slots=True)
class LogPosition:
    """A place in the global log, as the live log's event ids carry it (`log_xid.position`)."""

    log_xid: int
    position: int

    def __str__(self) -> str:
        return f"{self.log_xid}.{self.position}"

    @classmethod
    def parse(cls, text: str) -> LogPosition | None:
        head, dot, tail = text.strip().partition(".")
        log_xid, position = parse_number(head), parse_number(tail)
        if not dot or log_xid is None or position is None:
            return None
        return cls(log_xid, position)


def parse_number(text: str | None) -> int | None:
    """A number from an address: plain ASCII digits within a bigint (`isdigit` also takes '²'), else None."""
    if text is None:
        return None
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_BIGINT:
        return None
    return int(text)


@dataclass(frozen=True, slots=True)
class FailedEvent:
    event_id: str
    event_type: str | None
    position: int | None
    failed_at: datetime | None


@dataclass(frozen=True, slots=True)
class RebuildRecord:
    """A rebuild as the database records it, whichever process runs it."""

    generation: int
    events_done: int
    active: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class ProjectionView:
    name: str
    state: str
    """running, stopped, failed, needs rebuild, inline or not started: the library's word, shown as it is."""
    mode: str
    declared: bool
    version: int | None
    declared_version: int | None
    generation: int | None
    checkpoint: str | None
    lag_events: int | None
    lag_seconds: float | None
    runner: str | None
    last_error: str | None
    failed: FailedEvent | None
    needs_rebuild: str | None
    rebuild: RebuildRecord | None

    @property
    def can_rebuild(self) -> bool:
        """Rebuild and reset run the projection's handlers, so only a projection declared here can."""
        return self.declared

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "mode": self.mode,
            "generation": self.generation,
            "checkpoint": self.checkpoint,
            "lag_events": self.lag_events,
            "lag_seconds": self.lag_seconds,
            "runner": self.runner,
            "last_error": self.last_error,
            "failed_position": None if self.failed is None else self.failed.position,
            "failed_type": None if self.failed is None else self.failed.event_type,
            "needs_rebuild": self.needs_rebuild,
            "rebuilding": None if self.rebuild is None else self.rebuild.events_done,
            "can_rebuild": self.can_rebuild,
        }


@dataclass(frozen=True, slots=True)
class RebuildProgressView:
    name: str
    phase: RebuildPhase
    done: int
    total: int
    rate: float
    eta: float | None
    elapsed: float
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in ("done", "failed")

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "rate": round(self.rate, 1),
            "eta": None if self.eta is None else round(self.eta, 1),
            "elapsed": round(self.elapsed, 2),
            "error": self.error,
            "finished": self.finished,
        }


@dataclass(frozen=True, slots=True)
class TopicView:
    topic: str
    pending: int
    published: int
    dead: int
    oldest_pending_age: float | None
    """Seconds since the oldest pending message's event was recorded."""


@dataclass(frozen=True, slots=True)
class RelayView:
    relay_id: str
    started_at: datetime
    expires_at: datetime
    slots: list[int]


@dataclass(frozen=True, slots=True)
class DeadLetterView:
    id: int
    topic: str
    key: str
    event_id: str
    event_type: str
    stream_id: str
    stream_version: int
    attempts: int
    last_error: str | None
    dead_at: datetime


@dataclass(frozen=True, slots=True)
class SlotView:
    slot: int
    owner: str | None


@dataclass(frozen=True, slots=True)
class OutboxView:
    topics: list[TopicView]
    relays: list[RelayView]
    dead: list[DeadLetterView]
    slots: list[SlotView] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "topics": [
                {
                    "topic": t.topic,
                    "pending": t.pending,
                    "published": t.published,
                    "dead": t.dead,
                    "oldest_pending_age": t.oldest_pending_age,
                }
                for t in self.topics
            ],
            "relays": [{"relay_id": r.relay_id, "slots": r.slots} for r in self.relays],
            "dead": [d.id for d in self.dead],
        }
