"""Values the event store takes and returns."""

from __future__ import annotations

import collections.abc
import enum
import functools
import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID, SafeUUID

import asyncpg
import orjson
import uuid_utils

from eventstore.errors import InvalidArgument
from eventstore.telemetry import inject_trace_context

CORRELATION_ID = "correlation_id"
CAUSATION_ID = "causation_id"
TAGS = "tags"
"""The metadata key under which an event keeps its tags (the `event_tags` index is built from the same list)."""


def uuid7() -> UUID:
    """A time-ordered UUIDv7 as a standard `uuid.UUID`, built without `UUID.__init__`'s checks.

    `uuid_utils.compat.uuid7` costs three times as much, a sizeable part of a small append.
    """
    value = _new(UUID)
    _set(value, "int", _uuid7().int)
    _set(value, "is_safe", _UNKNOWN)
    return value


_new, _set, _uuid7 = object.__new__, object.__setattr__, uuid_utils.uuid7
_UNKNOWN = SafeUUID.unknown  # an enum member's lookup costs as much as the rest of `uuid7` (Python 3.11)


class StreamState(enum.Enum):
    """Expected version that is not an exact number."""

    ANY = -2
    NO_STREAM = -1
    STREAM_EXISTS = -3

    def __str__(self) -> str:
        return self.name.lower().replace("_", "-")


ExpectedVersion = StreamState | int
"""An exact version (0 is the first event) or a `StreamState`."""


def expected_version(version: int) -> ExpectedVersion:
    """The expectation for a stream last seen at `version`; -1 (no events) means `NO_STREAM`."""
    return StreamState.NO_STREAM if version < 0 else version


class Direction(enum.Enum):
    FORWARDS = "forwards"
    BACKWARDS = "backwards"


MAX_BIGINT = 2**63 - 1
"""The largest PostgreSQL bigint: versions, positions, transaction ids and limits are bigints."""


def check_int(name: str, value: object, minimum: int | None) -> int:
    """An int argument bound for a bigint parameter: a typed error instead of the driver's."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidArgument(f"{name} must be at least {minimum}, got {value}")
    if not -MAX_BIGINT - 1 <= value <= MAX_BIGINT:
        raise InvalidArgument(f"{name} must fit in 64 bits (at most {MAX_BIGINT}), got {value}")
    return value


def storable_text(value: str) -> bool:
    """Whether PostgreSQL's text can hold `value`: no NUL character, no lone surrogate (no UTF-8 form)."""
    if value.isascii():
        return "\x00" not in value
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


UNSTORABLE = "the NUL character or a lone surrogate (PostgreSQL's text holds neither)"


def check_seconds(name: str, value: object, *, zero: bool = False) -> float:
    """A number of seconds: finite and positive (or 0 with `zero`); a NaN would spin a loop that waits on it."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not (
        value > 0 or (zero and value == 0)
    ):
        wanted = "a finite number >= 0" if zero else "a finite number > 0"
        raise InvalidArgument(f"{name} must be {wanted} of seconds, got {value!r}")
    return float(value)


def check_types(types: object) -> list[str] | None:
    """Event type names to filter on, read once (an iterator is fine), or None for every type.

    A single string is refused rather than taken as a sequence of one-letter types.
    """
    if types is None:
        return None
    if isinstance(types, str | bytes) or not isinstance(types, Iterable):
        raise InvalidArgument(f"types must be a sequence of event type names, got {types!r}")
    names = list(types)
    if not all(isinstance(t, str) and storable_text(t) for t in names):
        raise InvalidArgument(f"types must be a sequence of event type names, got {names!r}")
    return names


def check_text(kind: str, value: object, limit: int, error: type[InvalidArgument] = InvalidArgument) -> str:
    """A non-empty name of at most `limit` characters that PostgreSQL's text can hold (`storable_text`)."""
    if not isinstance(value, str):
        raise error(f"{kind} must be a string, got {type(value).__name__}")
    if not value:
        raise error(f"{kind} must not be empty")
    if len(value) > limit:
        raise error(f"{kind} is {len(value)} characters, over the limit of {limit}")
    if not storable_text(value):
        raise error(f"{kind} must not contain {UNSTORABLE}")
    return value


class Checkpoint(NamedTuple):
    """A reader's place in the global log, which is ordered by (log_xid, position).

    `log_xid` is a PostgreSQL transaction id: the writer's own, or the log_xid of the stream's previous
    event when that is higher, so a stream's events never go backwards in the log. A reader only sees
    log_xids below every transaction still running; since an event's log_xid is never below its
    writer's transaction id, an event that commits late can never land behind a checkpoint already
    handed out.
    """

    log_xid: int
    position: int

    @classmethod
    def start(cls) -> Checkpoint:
        return START

    @classmethod
    def of(cls, value: object) -> Checkpoint:
        """A checkpoint as a caller passes it (a `Checkpoint` or a pair of ints), or `InvalidArgument`."""
        if not isinstance(value, tuple) or len(value) != 2:
            raise InvalidArgument(f"a checkpoint is a (log_xid, position) pair, got {value!r}")
        return cls(check_int("checkpoint log_xid", value[0], 0), check_int("checkpoint position", value[1], 0))


START = Checkpoint(0, 0)


_GENERATED: Any = object()
"""`NewEvent`'s default for `data` and `event_id`: made per event (a new dict, a new UUIDv7)."""


@dataclass(frozen=True, slots=True, init=False)
class NewEvent:
    """An event to append. `data` and `metadata` must be JSON-serializable (orjson rules).

    Pass `orjson.Fragment(json_bytes)` as `data` to store JSON that is already serialized. Default
    event ids are UUIDv7: time-ordered, so the unique index on event ids grows at its right edge
    instead of touching random pages. `tags` (`student:42`) select the event in queries by tag.
    `personal_data` maps top-level fields of `data` to the subject whose personal data they are: those
    fields are stored encrypted (see `eventstore.personal`).
    """

    type: str
    data: Any = field(default_factory=dict)
    metadata: Mapping[str, Any] | None = None
    event_id: UUID = field(default_factory=uuid7)
    correlation_id: UUID | str | None = None
    causation_id: UUID | str | None = None
    tags: Sequence[str] = ()
    personal_data: Mapping[str, str] | None = None

    def __init__(
        self,
        type: str,
        data: Any = _GENERATED,
        metadata: Mapping[str, Any] | None = None,
        event_id: UUID = _GENERATED,
        correlation_id: UUID | str | None = None,
        causation_id: UUID | str | None = None,
        tags: Sequence[str] = (),
        personal_data: Mapping[str, str] | None = None,
    ) -> None:
        # The generated __init__ of a frozen dataclass sets each field through object.__setattr__: over
        # half of building an event (3.2 µs of 4.5), paid for every event of a batch. The slots' own
        # setters do the same at a fraction of it; the instance stays frozen to everyone else.
        _set_type(self, type)
        _set_data(self, {} if data is _GENERATED else data)
        _set_metadata(self, metadata)
        _set_event_id(self, uuid7() if event_id is _GENERATED else event_id)
        _set_correlation_id(self, correlation_id)
        _set_causation_id(self, causation_id)
        _set_tags(self, tags)
        _set_personal_data(self, personal_data)

    def metadata_with_ids(self, tags: Sequence[str] | None = None) -> dict[str, Any]:
        """The metadata to store; `tags` as checked (the append's: `self.tags` may be a one-shot iterator)."""
        meta = dict(self.metadata) if self.metadata else {}
        if self.correlation_id is not None:
            meta[CORRELATION_ID] = str(self.correlation_id)
        if self.causation_id is not None:
            meta[CAUSATION_ID] = str(self.causation_id)
        tags = self.tags if tags is None else tags
        if tags:
            meta[TAGS] = list(dict.fromkeys(tags))
        inject_trace_context(meta)
        return meta


_set_type, _set_data, _set_metadata, _set_event_id = (
    NewEvent.__dict__[name].__set__ for name in ("type", "data", "metadata", "event_id")
)
_set_correlation_id, _set_causation_id, _set_tags, _set_personal_data = (
    NewEvent.__dict__[name].__set__ for name in ("correlation_id", "causation_id", "tags", "personal_data")
)


_FIELDS = (
    "event_id", "event_type", "data", "metadata", "stream_id", "stream_version", "position", "log_xid", "recorded_at"
)


class RecordedEvent:
    """An event as stored. `data` and `metadata` are the stored JSON text, decoded on demand.

    A read-only sequence of the fields in `_fields` order, equal to (and hashed as) the tuple of them,
    with `_replace` and `_asdict` like a named tuple. Reads hand out the driver's rows themselves
    (`EventRow`): copying each into an object of its own was a tenth of `read_all` (a tuple subclass is
    allocated through the slow generic path, and twice the objects bring twice the garbage collections).
    Built in Python (`RecordedEvent(...)`, an append's result), it is a tuple; a row read is not one
    (`isinstance(e, tuple)` is false, `json.dumps` takes `tuple(e)` or `e._asdict()`), but both are
    `Sequence`s of the same values.
    """

    __slots__ = ()
    _fields = _FIELDS
    __match_args__ = (
        "event_id", "event_type", "data", "metadata", "stream_id", "stream_version", "position", "log_xid",
        "recorded_at",
    )

    if TYPE_CHECKING:  # what both kinds have: a tuple's and the driver row's sequence protocol
        def __getitem__(self, index: int) -> Any: ...
        def __iter__(self) -> Iterator[Any]: ...
        def __len__(self) -> int: ...

    event_id: UUID = property(operator.itemgetter(0))  # type: ignore[assignment]
    event_type: str = property(operator.itemgetter(1))  # type: ignore[assignment]
    data: str = property(operator.itemgetter(2))  # type: ignore[assignment]
    metadata: str = property(operator.itemgetter(3))  # type: ignore[assignment]
    stream_id: str = property(operator.itemgetter(4))  # type: ignore[assignment]
    stream_version: int = property(operator.itemgetter(5))  # type: ignore[assignment]
    position: int = property(operator.itemgetter(6))  # type: ignore[assignment]
    log_xid: int = property(operator.itemgetter(7))  # type: ignore[assignment]
    recorded_at: datetime = property(operator.itemgetter(8))  # type: ignore[assignment]

    def __new__(
        cls,
        event_id: UUID,
        event_type: str,
        data: str,
        metadata: str,
        stream_id: str,
        stream_version: int,
        position: int,
        log_xid: int,
        recorded_at: datetime,
    ) -> RecordedEvent:
        return tuple.__new__(
            _BuiltEvent,
            (event_id, event_type, data, metadata, stream_id, stream_version, position, log_xid, recorded_at),
        )

    @classmethod
    def _make(cls, values: Iterable[Any]) -> RecordedEvent:
        return RecordedEvent(*values)

    @classmethod
    def from_rows(cls, rows: Iterable[asyncpg.Record] | Iterable[Sequence[Any]]) -> list[RecordedEvent]:
        """One per sequence of the fields in order, without a Python-level call per row.

        Rows fetched from the database need no copy: fetch them as `EventRow`s (`fetch_events`).
        """
        return list(map(functools.partial(tuple.__new__, _BuiltEvent), rows))

    def _replace(self, **changes: Any) -> RecordedEvent:
        values = self._asdict()
        unknown = changes.keys() - values.keys()
        if unknown:
            raise ValueError(f"RecordedEvent has no field {sorted(unknown)[0]!r}")
        return RecordedEvent(**(values | changes))

    def _asdict(self) -> dict[str, Any]:
        return dict(zip(_FIELDS, self._values(), strict=True))

    def _values(self) -> tuple[Any, ...]:
        return tuple(self)

    def __repr__(self) -> str:
        return "RecordedEvent(" + ", ".join(f"{k}={v!r}" for k, v in zip(_FIELDS, self._values(), strict=True)) + ")"

    def __reduce__(self) -> tuple[Any, ...]:
        return RecordedEvent, self._values()

    # A tuple's sequence methods, for the driver's rows as well (a Record's `in` looks at column names).
    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def index(self, value: object, start: int = 0, stop: int = 9) -> int:
        return self._values().index(value, start, stop)

    def count(self, value: object) -> int:
        return self._values().count(value)

    def __add__(self, other: tuple[Any, ...]) -> tuple[Any, ...]:
        return self._values() + other

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.log_xid, self.position)

    @property
    def category(self) -> str:
        return category_of(self.stream_id)

    def json(self) -> Any:
        return orjson.loads(self.data)

    def meta(self) -> dict[str, Any]:
        value = orjson.loads(self.metadata)
        return value if isinstance(value, dict) else {}

    @property
    def correlation_id(self) -> str | None:
        value = self.meta().get(CORRELATION_ID)
        return None if value is None else str(value)

    @property
    def causation_id(self) -> str | None:
        value = self.meta().get(CAUSATION_ID)
        return None if value is None else str(value)

    @property
    def tags(self) -> tuple[str, ...]:
        if TAGS not in self.metadata:  # substring test first: most events have no tags
            return ()
        value = self.meta().get(TAGS)
        return tuple(value) if isinstance(value, list) else ()


class EventPayload(asyncpg.Record):
    """What rebuilding an aggregate needs of a stored event, as the driver's own row (no copy per event).

    `EventStore.read_stream_payloads` returns these: a load of thousands of events then decodes no ids,
    positions or times it does not use. Read-only, by name like a `RecordedEvent`.
    """

    event_type: str = property(operator.itemgetter(0))  # type: ignore[assignment]
    data: str = property(operator.itemgetter(1))  # type: ignore[assignment]
    metadata: str = property(operator.itemgetter(2))  # type: ignore[assignment]
    stream_id: str = property(operator.itemgetter(3))  # type: ignore[assignment]
    stream_version: int = property(operator.itemgetter(4))  # type: ignore[assignment]


class _BuiltEvent(tuple[Any, ...], RecordedEvent):
    """A `RecordedEvent` built in Python."""

    __slots__ = ()
    __repr__ = RecordedEvent.__repr__


class EventRow(asyncpg.Record, RecordedEvent):
    """A `RecordedEvent` as the driver's own row: fetch events with `record_class=EventRow`."""

    __slots__ = ()
    __new__ = asyncpg.Record.__dict__["__new__"]  # asyncpg takes no record class with a __new__ of its own
    __repr__ = RecordedEvent.__repr__
    __reduce__ = RecordedEvent.__reduce__
    __contains__ = RecordedEvent.__contains__


collections.abc.Sequence.register(RecordedEvent)  # both kinds: `isinstance(e, Sequence)`, sequence patterns


async def fetch_events(
    executor: asyncpg.Connection[Any] | asyncpg.pool.PoolConnectionProxy[Any] | asyncpg.Pool[Any],
    query: str,
    *args: object,
) -> list[RecordedEvent]:
    """The rows of `query` (selecting `sql.EVENT_COLUMNS`) as `RecordedEvent`s, without a copy per row."""
    rows: list[RecordedEvent] = await executor.fetch(query, *args, record_class=EventRow)
    return rows


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed. `next_expected_version` is the stream's version after it."""

    stream_id: str
    next_expected_version: int
    first_position: int
    last_position: int
    log_xid: int
    events: tuple[RecordedEvent, ...] = ()
    duplicate: bool = False

    @property
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.log_xid, self.last_position)


def category_of(stream_id: str) -> str:
    """The category is the stream id's prefix before the first '-' (`order-42` -> `order`).

    The one rule, in Python; `eventstore.sql.CATEGORY` is the same rule in SQL.
    """
    return stream_id.split("-", 1)[0]
