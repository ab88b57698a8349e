"""The aggregate base: commands validate and emit events, state changes only by applying them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Generic, TypeVar, get_args, get_origin

import orjson
from pydantic import BaseModel

from aggregates.errors import AggregateUsageError, EventRegistrationError, InvalidAggregateId, MissingHandler
from aggregates.events import DomainEvent, as_stored
from eventstore import EventSerializationError, storable_text

S = TypeVar("S", bound=BaseModel)
E = TypeVar("E", bound=DomainEvent)
A = TypeVar("A", bound="Aggregate[Any]")

Handler = Callable[[Any, Any], None]

_HANDLES = "__aggregate_applies__"
_MAX_STREAM_ID_LENGTH = 255


def applies(event_type: type[E]) -> Callable[[Callable[[A, E], None]], Callable[[A, E], None]]:
    """Mark a method as the aggregate's one handler for `event_type`.

    Handlers are the only place state changes: the same code runs when a command emits the event and
    when the event is replayed from the store, so both paths agree by construction.
    """
    if not (isinstance(event_type, type) and issubclass(event_type, DomainEvent)) or event_type is DomainEvent:
        raise EventRegistrationError(f"@applies needs a DomainEvent subclass, got {event_type!r}")

    def mark(method: Callable[[A, E], None]) -> Callable[[A, E], None]:
        if not callable(method):
            raise EventRegistrationError(f"@applies({event_type.__name__}) must decorate a method")
        setattr(method, _HANDLES, event_type)
        return method

    return mark


def _state_type_of(cls: type) -> type[BaseModel] | None:
    for base in getattr(cls, "__orig_bases__", ()):
        origin = get_origin(base)
        if isinstance(origin, type) and issubclass(origin, Aggregate):
            for arg in get_args(base):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    return arg
    return None


def same_state(a: BaseModel, b: BaseModel) -> bool:
    """Equal, and with every dict in the same key order: `==` ignores that order, a command iterating
    the dict does not."""
    return a == b and _in_order(a.model_dump()) == _in_order(b.model_dump())


def _in_order(value: Any) -> Any:
    if isinstance(value, dict):
        return [(key, _in_order(item)) for key, item in value.items()]
    if isinstance(value, list | tuple):
        return [_in_order(item) for item in value]
    return value


def _fingerprint(state_type: type[BaseModel]) -> str:
    """A digest of the state class's schema: a changed state class no longer matches stale snapshots."""
    try:
        schema: Any = state_type.model_json_schema()
    except Exception:  # types without a JSON schema: fall back to the declared fields
        schema = {name: repr(f.annotation) for name, f in state_type.model_fields.items()}
    schema = {"name": state_type.__qualname__, "schema": schema}
    return hashlib.sha256(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS, default=repr)).hexdigest()[:16]


class Aggregate(Generic[S]):
    """Base of aggregates: `class Order(Aggregate[OrderState], category="order"): ...`.

    `state` is a pydantic model holding everything the handlers build; it is what snapshots store.
    `version` is the stream version the aggregate was loaded at or last saved to (-1 when new): the
    expected version of the next save. Events emitted since then wait in `pending_events`.

    Class keywords: `category` (the stream id prefix, without '-'), `snapshot_every` (take a snapshot
    whenever a save crosses a multiple of this many events) and `snapshot_version` (bump it when handlers
    change what they build without the state class changing, so old snapshots are ignored).
    """

    category: ClassVar[str | None] = None
    snapshot_every: ClassVar[int | None] = None
    snapshot_version: ClassVar[int] = 1
    state_type: ClassVar[type[BaseModel] | None] = None
    _handlers: ClassVar[dict[type[DomainEvent], Handler]] = {}
    _handler_names: ClassVar[dict[type[DomainEvent], str]] = {}
    _snapshot_tag: ClassVar[str | None] = None

    def __init_subclass__(
        cls,
        *,
        category: str | None = None,
        snapshot_every: int | None = None,
        snapshot_version: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        state_type = _state_type_of(cls)
        if state_type is not None:
            cls.state_type = state_type
        if category is not None:
            if (
                not isinstance(category, str)
                or not category
                or "-" in category
                or not storable_text(category)
                or category.startswith("$")  # the store's own record streams ($deleted-...)
            ):
                raise EventRegistrationError(
                    f"{cls.__qualname__}: category must be a non-empty string without '-', NUL or lone"
                    f" surrogates, not starting with '$', got {category!r}"
                )
            cls.category = category
        if snapshot_every is not None:
            if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
                raise EventRegistrationError(
                    f"{cls.__qualname__}: snapshot_every must be an int >= 1, got {snapshot_every!r}"
                )
            cls.snapshot_every = snapshot_every
        if snapshot_version is not None:
            if isinstance(snapshot_version, bool) or not isinstance(snapshot_version, int):
                raise EventRegistrationError(
                    f"{cls.__qualname__}: snapshot_version must be an int, got {snapshot_version!r}"
                )
            cls.snapshot_version = snapshot_version
        cls._snapshot_tag = None
        # Handlers are kept by method name, so a subclass overriding the method replaces the handler; an
        # override that applies another event type would take the base class's events too, so it is refused.
        names = dict(cls._handler_names)
        inherited = {name: event_type for event_type, name in names.items()}
        own: dict[type[DomainEvent], str] = {}
        for name, member in vars(cls).items():
            event_type = getattr(member, _HANDLES, None)
            if event_type is None:
                continue
            if event_type in own:
                raise EventRegistrationError(
                    f"{cls.__qualname__}: {own[event_type]} and {name} both apply {event_type.__name__};"
                    " one handler per event type"
                )
            base_type = inherited.get(name)
            if base_type is not None and base_type is not event_type:
                raise EventRegistrationError(
                    f"{cls.__qualname__}.{name} applies {event_type.__name__} but overrides the handler of"
                    f" {base_type.__name__} of a base class, which would then apply both; give it another name"
                )
            own[event_type] = name
            names[event_type] = name
        cls._handler_names = names
        cls._handlers = {event_type: getattr(cls, name) for event_type, name in names.items()}
        if cls.category is not None and cls.state_type is None:
            raise EventRegistrationError(f"{cls.__qualname__}: declare the state model as `Aggregate[StateModel]`")

    def __init__(self, id: str) -> None:
        cls = type(self)
        if cls.category is None or cls.state_type is None:
            raise EventRegistrationError(f"{cls.__qualname__} declares no category: it cannot have streams")
        self.id = cls.check_id(id)
        self.version = -1
        self.state: S = self.initial_state()
        self._pending: list[DomainEvent] = []

    # -- class-level facts -------------------------------------------------------------------------

    @classmethod
    def check_id(cls, aggregate_id: object) -> str:
        if not isinstance(aggregate_id, str):
            raise InvalidAggregateId(aggregate_id, f"must be a string, got {type(aggregate_id).__name__}")
        if not aggregate_id:
            raise InvalidAggregateId(aggregate_id, "must not be empty")
        if not storable_text(aggregate_id):
            raise InvalidAggregateId(aggregate_id, "must not contain the NUL character or a lone surrogate")
        limit = _MAX_STREAM_ID_LENGTH - len(cls.category or "") - 1
        if len(aggregate_id) > limit:
            raise InvalidAggregateId(aggregate_id, f"is {len(aggregate_id)} characters, over the limit of {limit}")
        return aggregate_id

    @classmethod
    def stream_id_for(cls, aggregate_id: str) -> str:
        """The stream of an aggregate: `{category}-{id}`; the id itself may contain '-'."""
        return f"{cls.category}-{cls.check_id(aggregate_id)}"

    @classmethod
    def event_types(cls) -> tuple[type[DomainEvent], ...]:
        """The event classes this aggregate applies (what its repository must be able to decode)."""
        return tuple(cls._handlers)

    @classmethod
    def initial_state(cls) -> S:
        """State before the first event; override when the state model has required fields."""
        assert cls.state_type is not None
        return cls.state_type()  # type: ignore[return-value]

    @classmethod
    def snapshot_tag(cls) -> str:
        """Stored with every snapshot; a snapshot with another tag was made by other code and is ignored."""
        if cls._snapshot_tag is None:
            assert cls.state_type is not None
            cls._snapshot_tag = f"{cls.snapshot_version}:{_fingerprint(cls.state_type)}"
        return cls._snapshot_tag

    # -- instance ----------------------------------------------------------------------------------

    @property
    def stream_id(self) -> str:
        return f"{self.category}-{self.id}"

    @property
    def pending_events(self) -> tuple[DomainEvent, ...]:
        return tuple(self._pending)

    @property
    def is_new(self) -> bool:
        return self.version < 0 and not self._pending

    def _emit(self, event: DomainEvent) -> None:
        """Record a decision: apply it to the state now and keep it until the repository saves it.

        What the handler gets is the event as a load will give it back (`as_stored`), so the state after
        the command is the state after a reload, down to a dict's key order. An event with no JSON form
        is applied as it is: the save refuses it, and writes nothing.
        """
        try:
            stored = as_stored(event)
        except EventSerializationError:
            stored = event
        self._apply(stored)
        self._pending.append(event)

    def _apply(self, event: DomainEvent) -> None:
        handler = self._handlers.get(type(event))
        if handler is None:
            if not isinstance(event, DomainEvent):
                raise AggregateUsageError(f"aggregates apply DomainEvent instances, got {type(event).__name__}")
            raise MissingHandler(type(self).__qualname__, event.event_type)
        handler(self, event)

    def _replay(self, events: Iterable[DomainEvent], version: int) -> None:
        handlers = self._handlers
        apply = self._apply
        for event in events:
            handler = handlers.get(type(event))
            if handler is None:
                apply(event)  # raises the typed error
            else:
                handler(self, event)
        self.version = version

    def _mark_saved(self, version: int) -> None:
        self._pending.clear()
        self.version = version

    @classmethod
    def from_events(cls: type[A], aggregate_id: str, events: Iterable[DomainEvent]) -> A:
        """Rebuild an aggregate from its whole history (versions 0..n-1) without a store."""
        history = list(events)
        aggregate = cls(aggregate_id)
        aggregate._replay(history, len(history) - 1)
        return aggregate

    def __repr__(self) -> str:
        pending = f", pending={len(self._pending)}" if self._pending else ""
        name = type(self).__qualname__
        return f"{name}(id={self.id!r}, version={self.version}{pending}, state={self.state!r})"
