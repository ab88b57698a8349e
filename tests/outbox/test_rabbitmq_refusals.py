"""A message RabbitMQ refuses by closing the channel (larger than the node's `max_message_size`): it is that
message's refusal, dead-lettered after `max_attempts`, while every other key flows. Before, every message in
flight on the channel failed with it, it counted as a broker that is down, and the relay stalled for good.

Runs a RabbitMQ node of its own (the system's `rabbitmq-server`, with a small `max_message_size`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventstore import EventStore, NewEvent
from eventstore.embedded import free_port
from outbox import CloudEvent, Outbox, Relay, Route
from tests.outbox.conftest import relay_settings
from tests.outbox.readers import RabbitReader
from tests.outbox.test_brokers import _wait_none_pending, versions_by_subject

MAX_MESSAGE_SIZE = 100_000


@pytest.fixture(scope="module")
def small_rabbitmq() -> Iterator[str]:
    server = shutil.which("rabbitmq-server")
    if server is None:
        pytest.skip("rabbitmq-server is not installed here: the node with a small max_message_size cannot start")
    port, dist = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="es-rmq-") as base:
        home = Path(base)
        (home / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {port}\nmax_message_size = {MAX_MESSAGE_SIZE}\nloopback_users = none\n"
        )
        (home / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            shutil.chown(home, "rabbitmq", "rabbitmq")
            for path in home.iterdir():
                shutil.chown(path, "rabbitmq", "rabbitmq")
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": f"es_test_{uuid.uuid4().hex[:8]}@localhost",
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq"),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_DIST_PORT": str(dist),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(home / "feature_flags"),
        }
        node = subprocess.Popen(
            [server], env=env, cwd=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if node.poll() is not None or time.monotonic() > deadline:
                        pytest.skip(f"a RabbitMQ node of its own did not start (exit {node.poll()})")
                    time.sleep(0.2)
            yield f"amqp://guest:guest@127.0.0.1:{port}/"
        finally:
            _stop(node, env["RABBITMQ_NODENAME"])


def _stop(node: subprocess.Popen[bytes], name: str) -> None:
    """Stop the node and everything it started. As root, `rabbitmq-server` runs the node through `su`, in a
    session of its own that the script's process group does not reach: find its processes by their node name."""
    started = [node.pid, *_processes_of(name)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in started):
            time.sleep(0.2)
        if not any(_alive(pid) for pid in started):
            break
    node.wait()


def _processes_of(name: str) -> list[int]:
    marker = f"RABBITMQ_NODENAME={name}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().split(") ", 1)[-1][:1] != "Z"  # a zombie is gone


async def test_a_message_too_large_for_the_node_is_dead_lettered_and_the_rest_flow(
    store: EventStore, small_rabbitmq: str
) -> None:
    reader = RabbitReader(small_rabbitmq)
    await reader.create(["orders"])
    try:
        await Outbox([Route("orders", category="order")], source="/tests").declare(store)
        await store.append("order-big", [NewEvent("OrderPlaced", {"n": 0})])
        await store.append("order-big", [NewEvent("OrderPlaced", {"blob": "x" * (MAX_MESSAGE_SIZE + 1000)})])
        await store.append("order-big", [NewEvent("OrderPlaced", {"n": 2})])
        for stream in range(5):
            await store.append(f"order-{stream}", [NewEvent("OrderPlaced", {"n": n}) for n in range(3)])
        async with Relay(store, reader.settings, relay_settings(max_attempts=2)) as relay:
            await _wait_none_pending(store, timeout=60)
        assert (relay.stats.refused, relay.stats.dead) == (2, 1)
        delivered = await reader.read(17)
        # At least once: a refusal that closes the channel loses the confirms of messages RabbitMQ had
        # taken on it, and the relay sends those again. Each message counts once, at its first delivery.
        first: dict[str, CloudEvent] = {}
        for event in delivered:
            first.setdefault(event.id, event)
        events = list(first.values())
        assert len(events) == 17
        order = versions_by_subject(events)
        assert order["order-big"] == [0, 2]  # its later message went once it was dead, in order
        assert all(order[f"order-{s}"] == [0, 1, 2] for s in range(5))
        last_error = await store.pool.fetchval("SELECT last_error FROM outbox WHERE dead_at IS NOT NULL")
        assert "max size" in last_error or "PRECONDITION" in last_error, last_error
    finally:
        await reader.delete()
