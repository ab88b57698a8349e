"""The composition root: an application declared once, built the same way by every process."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from aggregates import Aggregate, EventRegistry, Repository
from eventstore import DatabaseUnavailable, EventStore, InvalidArgument, KeyProvider, MasterKey, NotStarted
from eventstore.embedded import DATABASE_URL_ENV
from eventstore.lifecycle import RetentionPolicy
from eventstore_app.migrate import migrate_async
from outbox import (
    BrokerSettings,
    Inbox,
    KafkaSettings,
    NatsSettings,
    Outbox,
    Publisher,
    RabbitMQSettings,
    Relay,
    RelaySettings,
    Route,
)
from outbox import status as outbox_status
from outbox.embedded import BOOTSTRAP_ENV
from projections import InlineProjections, Projection, ProjectionAdmin, ProjectionRunner

BROKER_ENV = "EVENTSTORE_BROKER_URL"
"""The relay's broker as a URL (`nats://...`, `amqp://...`, `kafka://...`), when none is passed."""

A = TypeVar("A", bound=Aggregate[Any])


class ApplicationSettings(BaseModel):
    """How an application's processes use PostgreSQL and run their projections; defaults suit most."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_connections: int = Field(default=10, gt=0)
    retry_for: float = Field(default=15.0, ge=0)
    """Seconds an operation is retried after a lost connection (and start waits for the server)."""
    max_event_size: int = Field(default=1024 * 1024, gt=0)
    append_lanes: int = Field(default=4, ge=0, strict=True)
    """Appends in flight at once before the next ones wait and go together (`EventStore(append_lanes=)`)."""
    projection_batch_size: int = Field(default=500, gt=0)
    projection_poll_interval: float = Field(default=1.0, gt=0)
    projection_lease_interval: float = Field(default=1.0, gt=0)
    relay: RelaySettings = Field(default_factory=RelaySettings)


def _check_parts(
    aggregates: tuple[object, ...], projections: tuple[object, ...], database_url: object,
    kafka: object, broker: object, settings: object, keys: object, registry: object,
) -> None:
    """What an application is built from, checked where it is declared rather than when a process starts."""
    categories: dict[str, type[Aggregate[Any]]] = {}
    for aggregate in aggregates:
        if not (isinstance(aggregate, type) and issubclass(aggregate, Aggregate)):
            raise InvalidArgument(f"aggregates must be Aggregate subclasses, got {aggregate!r}")
        if aggregate.category is None:
            raise InvalidArgument(f"aggregate {aggregate.__qualname__} declares no category")
        other = categories.setdefault(aggregate.category, aggregate)
        if other is not aggregate:  # they would load and append each other's streams
            raise InvalidArgument(
                f"aggregates {other.__qualname__} and {aggregate.__qualname__} both have category"
                f" {aggregate.category!r}: give each its own"
            )
    for projection in projections:
        if not isinstance(projection, Projection):
            raise InvalidArgument(f"projections must be Projection instances, got {projection!r}")
    if database_url is not None and not isinstance(database_url, str):
        raise InvalidArgument(f"database_url must be a URL string, got {type(database_url).__name__}")
    if kafka is not None and not isinstance(kafka, str | KafkaSettings):
        raise InvalidArgument(f"kafka must be bootstrap servers or KafkaSettings, got {type(kafka).__name__}")
    if broker is not None and not isinstance(broker, str | KafkaSettings | NatsSettings | RabbitMQSettings | Publisher):
        raise InvalidArgument(f"broker must be a URL, broker settings or a Publisher, got {type(broker).__name__}")
    if settings is not None and not isinstance(settings, ApplicationSettings):
        raise InvalidArgument(f"settings must be ApplicationSettings, got {type(settings).__name__}")
    if keys is not None and not isinstance(keys, KeyProvider):
        raise InvalidArgument(f"keys must be a KeyProvider (e.g. MasterKey), got {type(keys).__name__}")
    if registry is not None and not isinstance(registry, EventRegistry):
        raise InvalidArgument(f"registry must be an EventRegistry, got {type(registry).__name__}")


class Application:
    """Everything one application declares: its aggregates, projections and outbox routes.

    Declare it once in a module; every process builds the same thing from it:

        APP = Application("shop", aggregates=[Cart, Order], projections=[OrderSummary()],
                          routes=[Route("shop.orders", ["OrderPlaced"])])

        async with APP as app:          # the web process: store started, routes declared,
            orders = app.repository(Order)       # inline projections attached
            await orders.execute("o1", lambda o: o.place(...))

    and `eventstore projections run --app shop.app:APP` or `eventstore outbox relay --app shop.app:APP`
    runs the rest in processes of their own (or `app.running()` in this one). The database URL and the
    broker are deployment, not declaration: they come from `using(...)`, else from
    `EVENTSTORE_DATABASE_URL` and `EVENTSTORE_BROKER_URL` (or `KAFKA_BOOTSTRAP_SERVERS`). The broker is
    a URL (`nats://127.0.0.1:4222`, `amqp://guest:guest@127.0.0.1:5672/`, `kafka://host:9092` or
    `host:9092`), broker settings, or a `Publisher` of your own; `kafka=` is the same for Kafka.
    """

    def __init__(
        self,
        name: str,
        *,
        aggregates: Iterable[type[Aggregate[Any]]] = (),
        projections: Iterable[Projection] = (),
        routes: Sequence[Route] | None = None,
        source: str | None = None,
        registry: EventRegistry | None = None,
        database_url: str | None = None,
        kafka: str | KafkaSettings | None = None,
        broker: str | BrokerSettings | Publisher | None = None,
        settings: ApplicationSettings | None = None,
        keys: KeyProvider | None = None,
        retention: Sequence[RetentionPolicy] = (),
    ) -> None:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise InvalidArgument("an application needs a name (the CloudEvents source of its messages by default)")
        for kind, parts in (("aggregates", aggregates), ("projections", projections)):
            if isinstance(parts, str) or not isinstance(parts, Iterable):
                raise InvalidArgument(f"{kind} must be a collection, got {type(parts).__name__}")
        self.aggregates = tuple(aggregates)
        self.projections = tuple(projections)
        _check_parts(self.aggregates, self.projections, database_url, kafka, broker, settings, keys, registry)
        self.name = name
        self.outbox = None if routes is None else Outbox(routes, source=source or name)
        self.database_url = database_url
        self.kafka = kafka
        self.broker = broker
        self.settings = settings or ApplicationSettings()
        self.keys = keys
        """The master key of personal data (`eventstore.personal`); `EVENTSTORE_MASTER_KEY` when None."""
        if isinstance(retention, RetentionPolicy) or not isinstance(retention, Iterable):
            raise InvalidArgument("retention must be a sequence of eventstore.lifecycle.RetentionPolicy")
        self.retention = tuple(retention)
        """Retention policies per category, run by `eventstore streams retain --app ...`."""
        if not all(isinstance(p, RetentionPolicy) for p in self.retention):
            raise InvalidArgument("retention must be a sequence of eventstore.lifecycle.RetentionPolicy")
        self.registry = registry if registry is not None else EventRegistry()
        """The event types of every aggregate; register upcasters here (`APP.registry.upcaster(...)`)."""
        for aggregate_type in self.aggregates:
            self.registry.register(*aggregate_type.event_types())
        self._store: EventStore | None = None
        self._starting = False
        self._inline: InlineProjections | None = None
        self._repositories: dict[type[Aggregate[Any]], Repository[Any]] = {}

    def using(
        self,
        *,
        database_url: str | None = None,
        kafka: str | KafkaSettings | None = None,
        broker: str | BrokerSettings | Publisher | None = None,
        settings: ApplicationSettings | None = None,
        keys: KeyProvider | None = None,
    ) -> Application:
        """The same application on other servers or settings (what a CLI flag or a test changes)."""
        return Application(
            self.name,
            aggregates=self.aggregates,
            projections=self.projections,
            routes=None if self.outbox is None else self.outbox.routes,
            source=None if self.outbox is None else self.outbox.source,
            registry=self.registry,
            database_url=database_url or self.database_url,
            kafka=kafka or (None if broker else self.kafka),
            broker=broker or (None if kafka else self.broker),
            settings=settings or self.settings,
            keys=keys or self.keys,
            retention=self.retention,
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def url(self) -> str:
        url = self.database_url or os.environ.get(DATABASE_URL_ENV)
        if not url:
            raise DatabaseUnavailable(f"application {self.name!r}: no database URL: pass one or set {DATABASE_URL_ENV}")
        return url

    def key_provider(self) -> KeyProvider | None:
        """The declared master key, else the one in `EVENTSTORE_MASTER_KEY` (None: personal data stays shut)."""
        return self.keys if self.keys is not None else MasterKey.from_env()

    async def migrate(self) -> None:
        """Bring the database schema to this version of the framework (every component's tables)."""
        await migrate_async(self.url())

    async def start(self) -> None:
        """Start the store, declare the outbox routes and attach the inline projections."""
        if self._store is not None or self._starting:
            raise InvalidArgument(f"application {self.name!r} is started already: stop it first")
        s = self.settings
        store = EventStore(
            self.url(), max_connections=s.max_connections, retry_for=s.retry_for, max_event_size=s.max_event_size,
            keys=self.key_provider(), append_lanes=s.append_lanes,
        )
        # Claimed before the first await: a concurrent start would otherwise build a second store and leak it.
        self._starting = True
        try:
            await store.start()
            try:
                if self.outbox is not None:
                    await self.outbox.declare(store)
                inline = [p for p in self.projections if p.inline]
                if inline:
                    self._inline = InlineProjections(store, inline)
                    await self._inline.start()
            except BaseException:
                await store.stop()
                raise
            self._store = store
        finally:
            self._starting = False

    async def stop(self) -> None:
        store, self._store = self._store, None
        if self._inline is not None:
            await self._inline.stop()
            self._inline = None
        self._repositories.clear()
        if store is not None:
            await store.stop()

    async def __aenter__(self) -> Application:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what the application hands out ------------------------------------------------------------

    @property
    def store(self) -> EventStore:
        if self._store is None:
            raise NotStarted(f"application {self.name!r} is not started: use `async with app:`")
        return self._store

    def repository(self, aggregate_type: type[A]) -> Repository[A]:
        """The repository of a declared aggregate type (one per type, sharing the application's events)."""
        if not isinstance(aggregate_type, type) or aggregate_type not in self.aggregates:
            declared = ", ".join(a.__name__ for a in self.aggregates) or "none"
            raise InvalidArgument(
                f"{getattr(aggregate_type, '__name__', repr(aggregate_type))} is not an aggregate of {self.name!r}"
                f" (declared: {declared})"
            )
        repository = self._repositories.get(aggregate_type)
        if repository is None:
            repository = self._repositories[aggregate_type] = Repository(
                self.store, aggregate_type, registry=self.registry
            )
        return repository

    @property
    def admin(self) -> ProjectionAdmin:
        """Status, rebuild, reset, resume and drop of the declared projections."""
        return ProjectionAdmin(self.store, self.projections)

    def runner(self, only: Iterable[str] | None = None) -> ProjectionRunner:
        """A runner of the asynchronous projections (or of those named in `only`)."""
        s = self.settings
        return self.admin.runner(
            only, batch_size=s.projection_batch_size, poll_interval=s.projection_poll_interval,
            lease_interval=s.projection_lease_interval,
        )

    def relay(self, settings: RelaySettings | None = None) -> Relay:
        """A relay publishing the outbox to the application's broker, on the application's connection pool.

        A process that only relays does better with a small store of its own (`eventstore outbox relay`
        builds one): the relay's lease renewals then never queue behind the application's queries.
        """
        broker = self.broker or self.kafka or os.environ.get(BROKER_ENV) or os.environ.get(BOOTSTRAP_ENV)
        if not broker:
            raise InvalidArgument(
                f"application {self.name!r}: no broker: pass broker= (or kafka=), "
                f"or set {BROKER_ENV} or {BOOTSTRAP_ENV}"
            )
        return Relay(self.store, broker, settings or self.settings.relay)

    def inbox(self, consumer: str) -> Inbox:
        """The idempotent inbox of one consumer of this application's messages."""
        return Inbox(self.store, consumer)

    @contextlib.asynccontextmanager
    async def running(self, *, projections: bool = True, relay: bool = False) -> AsyncIterator[Running]:
        """Run the projection runner and/or the relay in this process while the block runs."""
        async with contextlib.AsyncExitStack() as stack:
            runner = None
            if projections and any(not p.inline for p in self.projections):
                runner = await stack.enter_async_context(self.runner())
            publisher = await stack.enter_async_context(self.relay()) if relay else None
            yield Running(self.store, runner, publisher)


@dataclass(frozen=True, slots=True)
class Running:
    """What `Application.running` runs: its runner and relay (None where not asked for)."""

    store: EventStore
    runner: ProjectionRunner | None
    relay: Relay | None

    async def wait_caught_up(self, poll: float = 0.02) -> None:
        """Wait until the projections have the whole log and the relay has published every message.

        Bound it with `asyncio.timeout`; raises `ProjectionFailed` if a projection fails meanwhile.
        """
        if self.runner is not None:
            await self.runner.wait_caught_up()
        if self.relay is not None:
            while (await outbox_status(self.store)).pending:  # noqa: ASYNC110 - state in the database
                await asyncio.sleep(poll)
