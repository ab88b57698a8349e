"""The relay against real NATS JetStream and RabbitMQ servers: the same guarantees as with Kafka.

Each test reads back from the broker itself: CloudEvents attributes, order per key, refusals that
are retried and dead-lettered without holding other keys, and nothing lost (or out of order) when
the broker goes away mid-stream.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import orjson
import pytest
from nats.js.api import DiscardPolicy

from eventstore import EventStore, NewEvent
from outbox import CloudEvent, Outbox, Relay, Route, retry_dead
from outbox import status as outbox_status
from outbox.embedded import EmbeddedNats
from tests.outbox.conftest import keyed_writers, relay_settings
from tests.outbox.readers import NatsReader, RabbitReader, cut_relay_connections


@pytest.fixture
async def nats_reader(nats_url: str) -> AsyncIterator[NatsReader]:
    reader = NatsReader(nats_url)
    yield reader
    await reader.delete()


@pytest.fixture
async def rabbit_reader(rabbitmq_url: str) -> AsyncIterator[RabbitReader]:
    reader = RabbitReader(rabbitmq_url)
    yield reader
    await reader.delete()


def versions_by_subject(events: list[CloudEvent]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = defaultdict(list)
    for event in events:
        seen[event.subject or ""].append(int(event.extensions["streamversion"]))
    return seen


async def _append_interleaved(store: EventStore, streams: int, versions: int) -> dict[str, NewEvent]:
    written: dict[str, NewEvent] = {}
    correlation = uuid.uuid4()
    for version in range(versions):
        for stream in range(streams):
            event = NewEvent("OrderChanged", {"stream": stream, "version": version}, correlation_id=correlation)
            await store.append(f"order-{stream}", [event])
            written[str(event.event_id)] = event
    return written


def _check_attributes(events: list[CloudEvent], written: dict[str, NewEvent]) -> None:
    for event in events:
        original = written[event.id]
        assert (event.specversion, event.source, event.type) == ("1.0", "/tests", "OrderChanged")
        assert event.content_type == "application/json" and event.time is not None
        assert event.subject == event.partition_key == f"order-{original.data['stream']}"
        assert event.correlation_id == str(original.correlation_id)
        assert orjson.loads(event.data) == original.data


async def _wait_none_pending(store: EventStore, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while (await outbox_status(store)).pending:  # noqa: ASYNC110 - state in the database
            await asyncio.sleep(0.05)


async def _arrive_in_order_per_key_once(store: EventStore, reader: NatsReader | RabbitReader) -> None:
    await reader.create(["orders"])
    await Outbox([Route("orders", category="order")], source="/tests").declare(store)
    written = await _append_interleaved(store, streams=20, versions=5)
    async with Relay(store, reader.settings, relay_settings(batch_size=32)) as relay:
        events = await reader.read(100)
        await _wait_none_pending(store)
    assert relay.stats.published == 100
    assert len(events) == 100 and {e.id for e in events} == set(written)
    _check_attributes(events, written)
    assert versions_by_subject(events) == {f"order-{s}": list(range(5)) for s in range(20)}


async def test_nats_messages_arrive_as_cloud_events_in_order_per_key_once(
    store: EventStore, nats_reader: NatsReader
) -> None:
    await _arrive_in_order_per_key_once(store, nats_reader)


async def test_rabbitmq_messages_arrive_as_cloud_events_in_order_per_key(
    store: EventStore, rabbit_reader: RabbitReader
) -> None:
    await _arrive_in_order_per_key_once(store, rabbit_reader)


async def test_nats_re_sends_within_the_duplicate_window_are_dropped(
    store: EventStore, nats_reader: NatsReader
) -> None:
    await nats_reader.create(["orders"])
    await Outbox([Route("orders", category="order")], source="/tests").declare(store)
    await _append_interleaved(store, streams=5, versions=4)
    async with Relay(store, nats_reader.settings, relay_settings()):
        await nats_reader.read(20)
        await _wait_none_pending(store)
    # As if the relay had crashed before marking them: every message is sent again.
    await store.pool.execute("UPDATE outbox SET published_at = NULL, published_by = NULL")
    async with Relay(store, nats_reader.settings, relay_settings()) as again:
        await _wait_none_pending(store)
    assert again.stats.published == 20
    assert len(await nats_reader.read(20)) == 20, "JetStream dropped the re-sends by Nats-Msg-Id"


async def test_nats_refused_message_is_dead_lettered_without_blocking_other_keys_and_can_be_retried(
    store: EventStore, nats_reader: NatsReader
) -> None:
    await nats_reader.create(["orders"], max_msg_size=2000)
    await Outbox([Route("orders", category="order")], source="/tests").declare(store)
    await store.append("order-bad", [NewEvent("OrderPlaced", {"n": 0}), NewEvent("OrderPlaced", {"blob": "x" * 5000}),
                                     NewEvent("OrderPlaced", {"n": 2})])
    for stream in range(5):
        await store.append(f"order-{stream}", [NewEvent("OrderPlaced", {"n": n}) for n in range(3)])
    async with Relay(store, nats_reader.settings, relay_settings(max_attempts=2)) as relay:
        await _wait_none_pending(store)
    assert relay.stats.dead == 1 and relay.stats.refused == 2
    events = await nats_reader.read(17)
    assert len(events) == 17, "the big message's key went on after it was dead-lettered"
    last_error = await store.pool.fetchval("SELECT last_error FROM outbox WHERE dead_at IS NOT NULL")
    assert "maximum" in last_error.lower() or "size" in last_error.lower(), last_error
    assert len(await retry_dead(store)) == 1  # still too big: it is refused again and dies again
    async with Relay(store, nats_reader.settings, relay_settings(max_attempts=1)) as relay:
        await _wait_none_pending(store)
    assert relay.stats.dead == 1


async def test_nats_a_full_stream_refuses_the_message_it_has_no_room_for(
    store: EventStore, nats_reader: NatsReader
) -> None:
    """A stream at its limits (`discard new`) answers with a 503 of its own code: a refusal of that message,
    dead-lettered after `max_attempts`, not a broker that is down (the relay reconnected for ever)."""
    await nats_reader.create(["orders"], max_msgs=2, discard=DiscardPolicy.NEW)
    await Outbox([Route("orders", category="order")], source="/tests").declare(store)
    await store.append("order-1", [NewEvent("OrderPlaced", {"n": n}) for n in range(3)])
    async with Relay(store, nats_reader.settings, relay_settings(max_attempts=2)) as relay:
        await _wait_none_pending(store)
    assert (relay.stats.published, relay.stats.refused, relay.stats.dead) == (2, 2, 1)
    last_error = await store.pool.fetchval("SELECT last_error FROM outbox WHERE dead_at IS NOT NULL")
    assert "maximum messages" in last_error, last_error


async def test_rabbitmq_unroutable_message_is_refused_dead_lettered_and_retried_once_bound(
    store: EventStore, rabbit_reader: RabbitReader
) -> None:
    await rabbit_reader.create(["orders"])
    await Outbox([Route("orders", category="order"), Route("audit", category="order")], source="/tests").declare(
        store
    )
    written = await _append_interleaved(store, streams=3, versions=2)
    async with Relay(store, rabbit_reader.settings, relay_settings(max_attempts=2)) as relay:
        await _wait_none_pending(store)
    assert relay.stats.published == 6 and relay.stats.dead == 6  # "audit" has no queue: returned, not dropped
    await rabbit_reader.bind("audit")
    assert len(await retry_dead(store, topic="audit")) == 6
    async with Relay(store, rabbit_reader.settings, relay_settings()):
        await _wait_none_pending(store)
    events = await rabbit_reader.read(12)
    assert sorted(e.id for e in events) == sorted(list(written) * 2)


async def _restart_mid_stream(store: EventStore, relay: Relay, fail: object, rounds: int = 2) -> list[str]:
    """Writers append to 4 keys while the broker fails `rounds` times; returns the event ids appended."""
    async with keyed_writers(store, keys=4) as appended:
        for _ in range(rounds):
            published = relay.stats.published
            async with asyncio.timeout(20):
                while relay.stats.published < published + 30:  # noqa: ASYNC110 - mid-stream
                    await asyncio.sleep(0.02)
            errors = relay.stats.broker_errors
            await fail()  # type: ignore[operator]
            # the writers go on until the relay has met the failure: a cut found only by a send
            # that never comes (every event already published) would not be a failure mid-stream
            async with asyncio.timeout(20):
                while relay.stats.broker_errors == errors:  # noqa: ASYNC110 - mid-stream
                    await asyncio.sleep(0.02)
    await _wait_none_pending(store, timeout=30)
    return appended


def _assert_complete_and_in_order(events: list[CloudEvent], appended: list[str]) -> None:
    assert {e.id for e in events} == set(appended), "every appended event arrived"
    for subject, versions in versions_by_subject(events).items():
        firsts = list(dict.fromkeys(versions))  # at least once: a repeat may come late, a first may not
        assert firsts == sorted(firsts), f"{subject}: a later stream version came first"
        assert firsts == list(range(len(firsts))), f"{subject}: a version is missing"


@pytest.mark.fault
async def test_nats_server_killed_and_restarted_mid_stream_loses_nothing_and_keeps_order(
    store: EventStore, tmp_path: object
) -> None:
    with EmbeddedNats(store_dir=str(tmp_path)) as server:
        reader = NatsReader(server.url)
        await reader.create(["orders"])
        await Outbox([Route("orders", category="order")], source="/tests").declare(store)

        async def restart() -> None:
            server.stop(kill=True)
            await asyncio.sleep(0.5)  # the relay finds the broker gone and backs off
            await asyncio.to_thread(server.start)

        async with Relay(store, reader.settings, relay_settings(send_timeout=1.0)) as relay:
            appended = await _restart_mid_stream(store, relay, restart)
        events = await reader.read(len(appended), timeout=30)
    assert relay.stats.broker_errors >= 2
    assert len(events) == len(appended), "JetStream kept each message once (re-sends dropped by Nats-Msg-Id)"
    _assert_complete_and_in_order(events, appended)


@pytest.mark.fault
async def test_rabbitmq_connection_cut_mid_stream_loses_nothing_and_keeps_order(
    store: EventStore, rabbit_reader: RabbitReader
) -> None:
    """The system server is shared with other processes, so the broker side of the relay's own
    connection is closed (`rabbitmqctl close_connection`) instead of restarting the server."""
    await rabbit_reader.create(["orders"])
    await Outbox([Route("orders", category="order")], source="/tests").declare(store)

    async def cut() -> None:
        assert await asyncio.to_thread(cut_relay_connections, rabbit_reader.name) >= 1

    async with Relay(store, rabbit_reader.settings, relay_settings(send_timeout=1.0)) as relay:
        appended = await _restart_mid_stream(store, relay, cut)
    events = await rabbit_reader.read(len(appended), timeout=30)
    assert relay.stats.broker_errors >= 2
    _assert_complete_and_in_order(events, appended)


async def test_the_relay_command_publishes_to_nats_and_rabbitmq(
    store: EventStore, database_url: str, nats_reader: NatsReader, rabbit_reader: RabbitReader
) -> None:
    from tests.outbox.test_relay_processes import RelayProcess

    await nats_reader.create(["orders"])
    await rabbit_reader.create(["orders"])
    await Outbox([Route("orders", category="order")], source="/tests").declare(store)
    written = await _append_interleaved(store, streams=4, versions=3)
    for relay_id, options in (
        ("to-nats", ["--broker", nats_reader.url, "--subject-prefix", nats_reader.settings.subject_prefix]),
        ("to-rabbitmq", ["--broker", rabbit_reader.url, "--exchange", rabbit_reader.name]),
    ):
        await store.pool.execute("UPDATE outbox SET published_at = NULL, published_by = NULL")
        relay = RelayProcess(database_url, "unused:9092", relay_id, *options)
        try:
            await _wait_none_pending(store)
            assert relay.terminate() == 0, relay.output()
            assert "publishing to " + ("NATS" if relay_id == "to-nats" else "RabbitMQ") in relay.output()
        finally:
            relay.close()
    for reader in (nats_reader, rabbit_reader):
        events = await reader.read(12)
        assert {e.id for e in events} == set(written)
        assert versions_by_subject(events) == {f"order-{s}": list(range(3)) for s in range(4)}
