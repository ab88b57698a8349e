"""Typed domain events: pydantic models stored under a stable type name with a schema version."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin, overload
from uuid import UUID

import orjson
from pydantic import AliasChoices, AliasPath, BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticSerializationError

from aggregates.errors import (
    AggregateUsageError,
    DuplicateEventType,
    EventDecodeError,
    EventRegistrationError,
    MissingUpcaster,
    UnknownEventType,
)
from eventstore import (
    REDACTED,
    EventPayload,
    EventSerializationError,
    InvalidArgument,
    NewEvent,
    RecordedEvent,
    has_non_finite,
    storable_text,
)

SCHEMA_VERSION_KEY = "schema_version"
"""Metadata key holding the schema version an event was written with (absent means 1)."""

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the JSON object of one schema version into the JSON object of the next."""

E = TypeVar("E", bound="DomainEvent")
U = TypeVar("U", bound=Upcaster)


@dataclass(frozen=True, slots=True)
class PersonalData:
    """Marks an event field as personal data of the subject whose id is in field `subject`.

    `email: Annotated[str, PersonalData(subject="customer_id")]`: the field is stored encrypted under the
    subject's key, and reads as `eventstore.REDACTED` once `store.forget(customer_id)` deleted that key,
    so the field's type must accept that string (`str`, `str | None`).
    """

    subject: str


class DomainEvent(BaseModel):
    """Base of every domain event: immutable, stored as its pydantic JSON.

    The stored type name defaults to the class name; pass `event_type="..."` as a class keyword to keep
    it stable across renames. Bump `version=` when the payload changes shape and register an upcaster
    from the previous version, so that old stored events still decode.
    """

    model_config = ConfigDict(frozen=True)

    event_type: ClassVar[str] = "DomainEvent"
    schema_version: ClassVar[int] = 1
    personal_fields: ClassVar[Mapping[str, str]] = {}
    stored_by_alias: ClassVar[bool] = False
    """Whether the stored JSON names fields by alias (only if one cannot be read back by its name)."""
    """Personal field -> the field holding its subject's id (from `PersonalData` annotations)."""

    def __init_subclass__(cls, *, event_type: str | None = None, version: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = event_type if event_type is not None else cls.__dict__.get("event_type", cls.__name__)
        if not isinstance(name, str) or not name or not storable_text(name) or len(name) > 255:
            raise EventRegistrationError(f"{cls.__qualname__}: event type must be a non-empty string, got {name!r}")
        cls.event_type = name
        number = version if version is not None else cls.__dict__.get("schema_version", 1)
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise EventRegistrationError(f"{cls.__qualname__}: schema version must be an int >= 1, got {number!r}")
        cls.schema_version = number

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        for name in cls.model_fields:
            if name in DomainEvent.__class_vars__:  # the field would replace what the framework reads off the class
                raise EventRegistrationError(
                    f"{cls.__qualname__}: field {name!r} is a name DomainEvent uses itself; rename it"
                    f" (Field(alias={name!r}) keeps the JSON key)"
                )
        personal: dict[str, str] = {}
        # By name, as always, unless a field cannot be read back by its name (an alias without
        # populate_by_name): then by alias, the only way such events load. The JSON names nested models'
        # fields the same way (one `by_alias` for the whole dump), so they count as much as the event's own.
        models = _models_within(cls)
        cls.stored_by_alias = any(
            name not in _read_keys(model, name, info) for model in models for name, info in _fields(model).items()
        )
        for model in models:
            for name, info in _fields(model).items():
                _check_stored_key(cls, model, name, info)
        for name, info in cls.model_fields.items():
            marks = [m for m in info.metadata if isinstance(m, PersonalData)]
            if not marks:
                if _nested_mark(info.annotation):
                    raise EventRegistrationError(
                        f"{cls.__qualname__}.{name}: PersonalData must annotate the whole field type,"
                        " e.g. Annotated[str | None, PersonalData(...)], not a member of a union"
                    )
                continue
            subject = marks[0].subject
            where = f"{cls.__qualname__}.{name}"
            if subject not in cls.model_fields or subject == name:
                raise EventRegistrationError(f"{where}: PersonalData names subject field {subject!r}, not a field")
            adapter: TypeAdapter[Any] = TypeAdapter(Annotated[(info.annotation, *info.metadata)])  # type: ignore[arg-type]
            try:
                adapter.validate_json(orjson.dumps(REDACTED))
            except ValidationError:
                raise EventRegistrationError(
                    f"{where}: a personal field must accept the redacted value {REDACTED!r} (use str or str | None)"
                ) from None
            personal[name] = subject
        for subject in personal.values():
            if subject in personal:
                raise EventRegistrationError(f"{cls.__qualname__}: subject field {subject!r} is itself personal data")
        cls.personal_fields = personal


@dataclass(slots=True)
class _Entry:
    cls: type[DomainEvent]
    upcasters: dict[int, Upcaster] = field(default_factory=dict)


def stored_schema_version(recorded: RecordedEvent | EventPayload) -> int:
    """The schema version an event was written with; events written without one are version 1."""
    try:
        meta = orjson.loads(recorded.metadata)
    except orjson.JSONDecodeError:
        return 1
    version = meta.get(SCHEMA_VERSION_KEY, 1) if isinstance(meta, dict) else 1
    if isinstance(version, bool) or not isinstance(version, int):
        raise EventDecodeError(
            recorded.event_type,
            None,
            f"metadata {SCHEMA_VERSION_KEY!r} must be an int, got {version!r}",
            recorded.stream_id,
            recorded.stream_version,
        )
    return version


class EventRegistry:
    """Maps stored type names to event classes and lifts old schema versions to the current one.

    Events at their class's current version decode straight from the stored JSON text (one parse, in
    pydantic's core); only old versions are parsed to a dict, passed through the upcaster chain
    v1 -> v2 -> ... and then validated.
    """

    def __init__(self, *event_types: type[DomainEvent]) -> None:
        self._entries: dict[str, _Entry] = {}
        self._orphans: dict[str, dict[int, Upcaster]] = {}
        self.register(*event_types)

    # -- registration ------------------------------------------------------------------------------

    def register(self, *event_types: type[DomainEvent]) -> None:
        """Register event classes; registering the same class twice is harmless, two under one name is not."""
        for cls in event_types:
            if not (isinstance(cls, type) and issubclass(cls, DomainEvent)) or cls is DomainEvent:
                raise EventRegistrationError(f"not a DomainEvent subclass: {cls!r}")
            entry = self._entries.get(cls.event_type)
            if entry is not None:
                if entry.cls is not cls:
                    raise DuplicateEventType(
                        cls.event_type, (entry.cls.__qualname__, *defined_at(entry.cls)),
                        (cls.__qualname__, *defined_at(cls)),
                    )
                continue
            upcasters = self._orphans.get(cls.event_type, {})
            for from_version in upcasters:
                self._check_step(cls, from_version)  # refused: the upcasters wait for the right class
            self._orphans.pop(cls.event_type, None)
            self._entries[cls.event_type] = _Entry(cls, upcasters)

    def upcaster(self, event: type[DomainEvent] | str, *, from_version: int) -> Callable[[U], U]:
        """Decorator form of `add_upcaster`."""

        def decorate(function: U) -> U:
            self.add_upcaster(event, from_version, function)
            return function

        return decorate

    def add_upcaster(self, event: type[DomainEvent] | str, from_version: int, upcaster: Upcaster) -> None:
        """Lift the JSON object of `event` at schema `from_version` to `from_version + 1`."""
        if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
            raise EventRegistrationError(f"from_version must be an int >= 1, got {from_version!r}")
        if not callable(upcaster):
            raise EventRegistrationError(f"upcaster must be callable, got {upcaster!r}")
        if isinstance(event, str):
            name = event
            entry = self._entries.get(name)
        else:
            self.register(event)
            name = event.event_type
            entry = self._entries[name]
        if entry is None:
            steps = self._orphans.setdefault(name, {})
        else:
            self._check_step(entry.cls, from_version)
            steps = entry.upcasters
        if from_version in steps:
            raise EventRegistrationError(f"event {name!r} already has an upcaster from v{from_version}")
        steps[from_version] = upcaster

    @staticmethod
    def _check_step(cls: type[DomainEvent], from_version: int) -> None:
        if from_version >= cls.schema_version:
            raise EventRegistrationError(
                f"upcaster of {cls.event_type!r} from v{from_version} is not below the current"
                f" schema version v{cls.schema_version}"
            )

    # -- lookup ------------------------------------------------------------------------------------

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str):
            return item in self._entries
        if isinstance(item, type) and issubclass(item, DomainEvent):
            entry = self._entries.get(item.event_type)
            return entry is not None and entry.cls is item
        return False

    def event_class(self, event_type: str) -> type[DomainEvent]:
        entry = self._entries.get(_check_type_name(event_type))
        if entry is None:
            raise UnknownEventType(event_type)
        return entry.cls

    @property
    def event_types(self) -> Mapping[str, type[DomainEvent]]:
        return {name: entry.cls for name, entry in self._entries.items()}

    def upcaster_versions(self, event_type: str) -> frozenset[int]:
        """The schema versions of `event_type` an upcaster lifts (to the next one)."""
        entry = self._entries.get(_check_type_name(event_type))
        if entry is None:
            raise UnknownEventType(event_type)
        return frozenset(entry.upcasters)

    # -- encoding ----------------------------------------------------------------------------------

    def encode(
        self,
        event: DomainEvent,
        *,
        metadata: Mapping[str, Any] | None = None,
        event_id: UUID | None = None,
        correlation_id: UUID | str | None = None,
        causation_id: UUID | str | None = None,
    ) -> NewEvent:
        """The `NewEvent` to append; the pydantic JSON goes to the store as is (no second serialization)."""
        cls = type(event)
        if not isinstance(event, DomainEvent):
            raise EventRegistrationError(f"not a DomainEvent: {event!r}")
        if event.event_type not in self._entries or self._entries[event.event_type].cls is not cls:
            raise UnknownEventType(cls.event_type)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidArgument(f"metadata must be a mapping, got {type(metadata).__name__}")
        meta: dict[str, Any] = dict(metadata) if metadata else {}
        meta[SCHEMA_VERSION_KEY] = cls.schema_version
        data = orjson.Fragment(_stored_json(event))
        personal = _subjects(event) if cls.personal_fields else None
        if event_id is None:
            return NewEvent(
                cls.event_type, data, meta, correlation_id=correlation_id, causation_id=causation_id,
                personal_data=personal,
            )
        return NewEvent(
            cls.event_type,
            data,
            meta,
            event_id=event_id,
            correlation_id=correlation_id,
            causation_id=causation_id,
            personal_data=personal,
        )

    # -- decoding ----------------------------------------------------------------------------------

    @overload
    def decode(self, recorded: RecordedEvent, *, raw_unknown: Literal[False] = False) -> DomainEvent: ...

    @overload
    def decode(self, recorded: RecordedEvent, *, raw_unknown: bool) -> DomainEvent | RecordedEvent: ...

    def decode(self, recorded: RecordedEvent, *, raw_unknown: bool = False) -> DomainEvent | RecordedEvent:
        """The current-version event for a stored one.

        An unregistered type raises `UnknownEventType`, or comes back as the `RecordedEvent` itself when
        `raw_unknown` is set (for tools that show whole streams).
        """
        if not isinstance(recorded, RecordedEvent | EventPayload):
            raise InvalidArgument(f"decode takes a RecordedEvent, got {type(recorded).__name__}")
        entry = self._entries.get(recorded.event_type)
        if entry is None:
            if raw_unknown:
                return recorded
            raise UnknownEventType(recorded.event_type, recorded.stream_id, recorded.stream_version)
        version = stored_schema_version(recorded)
        cls = entry.cls
        if version == cls.schema_version:
            try:
                return cls.__pydantic_validator__.validate_json(recorded.data)  # type: ignore[no-any-return]
            except ValidationError as exc:
                raise EventDecodeError(
                    recorded.event_type, version, _reason(exc), recorded.stream_id, recorded.stream_version
                ) from None
        return self._upcast(entry, version, recorded)

    def decode_all(self, records: Iterable[RecordedEvent | EventPayload]) -> list[DomainEvent]:
        return list(self.decode_each(records))

    def decode_each(self, records: Iterable[RecordedEvent | EventPayload]) -> Iterator[DomainEvent]:
        """`decode` for a whole stream read, one event at a time: the load hot path.

        Events of one save share their metadata text, so its schema version is parsed once per run of
        equal metadata rather than once per event. Yielding lets a load apply and drop each event before
        decoding the next, which keeps the garbage collector from scanning thousands of live events.
        """
        entries = self._entries
        last_metadata: str | None = None
        version = 1
        for recorded in records:
            entry = entries.get(recorded.event_type)
            if entry is None:
                raise UnknownEventType(recorded.event_type, recorded.stream_id, recorded.stream_version)
            metadata = recorded.metadata
            if metadata != last_metadata:
                version = stored_schema_version(recorded)
                last_metadata = metadata
            cls = entry.cls
            if version != cls.schema_version:
                yield self._upcast(entry, version, recorded)
                continue
            try:
                event = cls.__pydantic_validator__.validate_json(recorded.data)
            except ValidationError as exc:
                raise EventDecodeError(
                    recorded.event_type, version, _reason(exc), recorded.stream_id, recorded.stream_version
                ) from None
            yield event

    def _upcast(self, entry: _Entry, version: int, recorded: RecordedEvent | EventPayload) -> DomainEvent:
        cls = entry.cls
        where = (recorded.stream_id, recorded.stream_version)
        if version > cls.schema_version:
            raise EventDecodeError(
                recorded.event_type,
                version,
                f"stored with a newer schema than this code knows (v{cls.schema_version})",
                *where,
            )
        if version < 1:
            raise EventDecodeError(recorded.event_type, version, "schema versions start at 1", *where)
        data: Any = orjson.loads(recorded.data)
        for step in range(version, cls.schema_version):
            upcaster = entry.upcasters.get(step)
            if upcaster is None:
                raise MissingUpcaster(recorded.event_type, step, *where)
            if not isinstance(data, dict):
                raise EventDecodeError(recorded.event_type, step, "payload is not a JSON object", *where)
            try:
                data = upcaster(data)
            except Exception as exc:
                raise EventDecodeError(
                    recorded.event_type, step, f"upcaster from v{step} failed: {exc!r}", *where
                ) from exc
        try:
            text = orjson.dumps(data)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise EventDecodeError(recorded.event_type, version, f"upcast result is not JSON: {exc}", *where) from None
        try:
            # JSON mode, like current events: python-mode validation accepts different inputs.
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise EventDecodeError(recorded.event_type, version, _reason(exc), *where) from None


def _stored_json(event: DomainEvent) -> bytes:
    """The JSON text `encode` stores for an event."""
    cls = type(event)
    try:
        # By alias, as the JSON Schema (and a validation) names the fields: else aliased fields never load.
        text = event.model_dump_json(by_alias=cls.stored_by_alias).encode()
    except PydanticSerializationError as exc:  # bytes that are not UTF-8, objects with no JSON form
        raise EventSerializationError(cls.event_type, str(exc)) from None
    if b"null" in text and has_non_finite(event.model_dump()):  # pydantic writes NaN as null
        raise EventSerializationError(cls.event_type, "NaN and infinity are not JSON")
    return text


def as_stored(event: E) -> E:
    """`event` as a load gives it back: its stored JSON, in jsonb's key order, decoded.

    A command applies this, not the event as emitted, so that the state after the command is the state
    after a reload (a dict's key order included).
    """
    if not isinstance(event, DomainEvent):
        raise AggregateUsageError(f"aggregates apply DomainEvent instances, got {type(event).__name__}")
    cls = type(event)
    try:
        return cls.__pydantic_validator__.validate_json(as_jsonb(_stored_json(event)))  # type: ignore[no-any-return]
    except ValidationError as exc:
        raise EventDecodeError(cls.event_type, cls.schema_version, f"it does not read back: {_reason(exc)}") from None


def as_jsonb(text: str | bytes) -> str:
    """JSON text as PostgreSQL's `jsonb` gives it back: each object's keys shorter first, then bytewise
    (UTF-8), and only the last of duplicate keys; a dict's insertion order is not kept."""
    return json.dumps(json.loads(text, object_pairs_hook=_jsonb_object), ensure_ascii=False, separators=(",", ":"))


def _jsonb_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    last = dict(pairs)
    return {key: last[key] for key in sorted(last, key=_jsonb_key_order)}


def _jsonb_key_order(key: str) -> tuple[int, bytes]:
    raw = key.encode("utf-8", "surrogatepass")
    return len(raw), raw


def _check_type_name(event_type: object) -> str:
    if not isinstance(event_type, str):
        raise InvalidArgument(f"an event type is a stored type name (a string), got {type(event_type).__name__}")
    return event_type


def defined_at(cls: type) -> tuple[str | None, int | None]:
    """The file and line of a class's definition, where Python can tell (not for classes made in a REPL)."""
    try:
        path = inspect.getsourcefile(cls)
        line = inspect.getsourcelines(cls)[1] if path is not None else None
    except (OSError, TypeError):
        return None, None
    return path, line


def _nested_mark(annotation: Any) -> bool:
    """Whether a `PersonalData` hides inside a type (where pydantic would not report it)."""
    if get_origin(annotation) is Annotated:
        marked = any(isinstance(m, PersonalData) for m in annotation.__metadata__)
        return marked or _nested_mark(get_args(annotation)[0])
    return any(_nested_mark(a) for a in get_args(annotation))


def stored_key(cls: type[DomainEvent], name: str) -> str:
    """The key a field is stored under: its name, or its alias in a class stored by alias."""
    return (cls.model_fields[name].serialization_alias or name) if cls.stored_by_alias else name


def _check_stored_key(cls: type[DomainEvent], model: type, name: str, info: FieldInfo) -> None:
    """Refuse a field that `encode` would store under a key `decode` does not read (it could never load).

    `Field(alias=...)` names a field both ways; a `serialization_alias` or `validation_alias` alone
    does not, in a class stored by alias. `model` is the event class or a model nested in its fields.
    """
    stored = (info.serialization_alias or name) if cls.stored_by_alias else name
    read = _read_keys(model, name, info)
    if stored not in read:
        where = f"{model.__qualname__}.{name}" + ("" if model is cls else f" (in event {cls.__qualname__})")
        raise EventRegistrationError(
            f"{where}: stored as {stored!r} but read back from"
            f" {' or '.join(repr(k) for k in sorted(read)) or 'nothing'}, so stored events would not load;"
            " name it both ways with Field(alias=...)"
        )


def _read_keys(model: type, name: str, info: FieldInfo) -> set[str]:
    """The keys validation reads a field of `model` (a pydantic model or dataclass) from."""
    config = getattr(model, "model_config", None) or getattr(model, "__pydantic_config__", {})
    read: set[str] = set()
    if config.get("validate_by_alias", True):
        alias = info.validation_alias
        if alias is None:
            read.add(name)
        else:
            for choice in alias.choices if isinstance(alias, AliasChoices) else [alias]:
                path = choice.path if isinstance(choice, AliasPath) else [choice]
                if len(path) == 1 and isinstance(path[0], str):
                    read.add(path[0])
    if config.get("validate_by_name") or config.get("populate_by_name"):
        read.add(name)
    return read


def _fields(model: type) -> dict[str, FieldInfo]:
    """The fields of a pydantic model or pydantic dataclass (none for any other type)."""
    fields = getattr(model, "__pydantic_fields__", None)
    return fields if isinstance(fields, dict) else {}


def _models_within(cls: type[DomainEvent]) -> list[type]:
    """The event class and every pydantic model or dataclass its fields hold, however deeply nested
    (in Optional, list, dict, tuple, unions, Annotated, other models), each once."""
    found: list[type] = []
    pending: list[Any] = [cls]
    while pending:
        annotation = pending.pop()
        if isinstance(annotation, type) and _fields(annotation):
            if annotation in found:
                continue
            found.append(annotation)
            pending.extend(info.annotation for info in _fields(annotation).values())
        else:
            pending.extend(get_args(annotation))
    return found


def _subjects(event: DomainEvent) -> dict[str, str] | None:
    """Each personal field that holds a value, keyed as stored (`stored_key`), with its subject's id.

    A field set to None hides nothing.
    """
    personal: dict[str, str] = {}
    for name, subject_field in event.personal_fields.items():
        if getattr(event, name) is None:
            continue
        subject = getattr(event, subject_field)
        if subject is None or subject == "":
            raise EventSerializationError(
                event.event_type, f"personal field {name!r} has no subject: {subject_field!r} is empty"
            )
        personal[stored_key(type(event), name)] = str(subject)
    return personal or None


def _reason(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors)
