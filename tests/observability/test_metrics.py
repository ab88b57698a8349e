"""The /metrics endpoints of real processes (`--metrics-port`), scraped over HTTP and parsed with
the Prometheus client's own parser, after a known workload."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from eventstore import EventStore, InvalidArgument, NewEvent, serve_metrics
from tests.observability.app import deposit

ROOT = Path(__file__).resolve().parents[2]
EVENTSTORE = Path(sys.executable).with_name("eventstore")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """An `eventstore` command with `--metrics-port`, and a scraper of its endpoint."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.log = log

    async def scrape(self) -> Samples:
        async with httpx.AsyncClient() as client:
            response = await client.get(self.url, timeout=5)
        response.raise_for_status()
        samples: Samples = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    async def until(self, check: Callable[[Samples], bool], what: str, seconds: float = 20) -> Samples:
        """Scrape until `check` holds (the endpoint may not listen yet at first)."""
        samples: Samples = {}
        try:
            async with asyncio.timeout(seconds):
                while True:
                    if self.process.returncode is not None:
                        raise AssertionError(f"the process exited: {self.log.read_text()[-2000:]}")
                    try:
                        samples = await self.scrape()
                    except httpx.TransportError:
                        samples = {}
                    if samples and check(samples):
                        return samples
                    await asyncio.sleep(0.1)
        except TimeoutError:
            shown = "\n".join(f"{k[0]}{dict(k[1])} {v}" for k, v in sorted(samples.items(), key=str)
                              if not k[0].startswith(("python_", "process_")))
            raise AssertionError(f"not within {seconds}s: {what}\n{shown}\n{self.log.read_text()[-2000:]}") from None


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels` (0 when there is none)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) <= 1, f"{name}{labels} is ambiguous: {found}"
    return found[0] if found else 0.0


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[..., asyncio.Future[Process]]]:
    started: list[asyncio.subprocess.Process] = []

    async def start(database_url: str, *command: str) -> Process:
        port = free_port()
        log = tmp_path / f"{command[0]}-{len(started)}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                str(EVENTSTORE), "--database-url", database_url, *command, "--metrics-port", str(port),
                cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=asyncio.subprocess.STDOUT,
            )
        started.append(process)
        return Process(process, port, log)

    yield start  # type: ignore[misc]
    for process in started:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def test_runner_metrics_lag_falls_to_zero_and_a_failure_shows(
    store: EventStore, database_url: str, spawn: Callable[..., asyncio.Future[Process]]
) -> None:
    for n in range(30):
        await store.append(f"account-{n % 3}", [deposit(f"a{n % 3}", n)])
    runner = await spawn(
        database_url, "projections", "run", "--app", "tests.observability.app:APP", "--poll-interval", "0.1",
        "--lease-interval", "0.1", "--batch-size", "10",
    )
    ok = {"projection_name": "obs_deposits"}
    samples = await runner.until(
        lambda s: value(s, "projection_events_total", **ok) == 30 and value(s, "projection_lag", **ok) == 0,
        "obs_deposits handled all 30 events and its lag fell to 0",
    )
    assert value(samples, "projection_lag_age_seconds", **ok) == 0
    assert value(samples, "projection_state", **ok, projection_status="running") == 1
    assert value(samples, "projection_batch_duration_seconds_count", **ok) >= 3  # batches of 10
    assert value(samples, "projection_failures_total", **ok) == 0

    # A poisoned event stops obs_picky there: one failure, the failed state, and lag that stays.
    await store.append("account-0", [deposit("a0", 1, poison=True), deposit("a0", 2)])
    picky = {"projection_name": "obs_picky"}
    samples = await runner.until(
        lambda s: value(s, "projection_failures_total", **picky) == 1
        and value(s, "projection_state", **picky, projection_status="failed") == 1
        and value(s, "projection_events_total", **ok) == 32,
        "obs_picky failed at the poisoned event while obs_deposits went on",
    )
    assert value(samples, "projection_lag", **picky) == 2
    assert value(samples, "projection_lag_age_seconds", **picky) > 0
    assert value(samples, "projection_state", **picky, projection_status="running") == 0
    assert value(samples, "projection_lag", **ok) == 0


async def test_relay_metrics_backlog_drains_and_a_dead_letter_is_counted(
    outbox_store: EventStore, database_url: str, kafka: str, topic: str, spawn: Callable[..., asyncio.Future[Process]]
) -> None:
    async with outbox_store.unit_of_work() as uow:
        for n in range(40):
            await uow.append(f"order-{n % 4}", [NewEvent("OrderPlaced", {"n": n})])
    # Over --max-request-size: the broker side refuses it; with --max-attempts 1 it is dead at once.
    await outbox_store.append("order-big", [NewEvent("OrderPlaced", {"blob": "x" * 5000})])
    # Before any relay runs, the admin process reports the backlog of the topic.
    admin = await spawn(database_url, "admin", "--port", str(free_port()))
    samples = await admin.until(
        lambda s: value(s, "outbox_messages_pending", messaging_destination_name=topic) == 41,
        "the admin process reports 41 pending messages",
    )
    assert value(samples, "outbox_messages_oldest_pending_age_seconds", messaging_destination_name=topic) > 0

    relay = await spawn(
        database_url, "--kafka", kafka, "outbox", "relay", "--relay-id", "observed", "--lease-ttl", "6",
        "--send-timeout", "1", "--poll-interval", "0.2", "--max-attempts", "1", "--max-request-size", "4096",
    )
    on_topic = {"messaging_destination_name": topic}
    samples = await relay.until(
        lambda s: value(s, "outbox_messages_pending", **on_topic) == 0
        and value(s, "outbox_messages_published_total", **on_topic) == 40
        and value(s, "outbox_messages_dead_total", **on_topic) == 1
        and value(s, "outbox_relay_lease_renewals_total", outbox_relay_id="observed", outbox_result="renewed") >= 1,
        "the backlog drained: 40 published, 1 dead letter, leases renewed",
    )
    assert value(samples, "outbox_messages_dead_letters", **on_topic) == 1
    assert value(samples, "outbox_messages_oldest_pending_age_seconds", **on_topic) == 0
    assert value(samples, "outbox_messages_retried_total", **on_topic) == 0
    assert value(samples, "outbox_publish_latency_seconds_count", **on_topic) == 40
    assert value(samples, "outbox_publish_latency_seconds_sum", **on_topic) > 0
    assert value(samples, "outbox_relay_slots", outbox_relay_id="observed") == 64
    assert value(samples, "outbox_relay_batch_duration_seconds_count", outbox_relay_id="observed") >= 1


def test_a_bad_or_busy_metrics_port_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgument, match="from 0 to 65535"):
        serve_metrics(70000)
    for host in (None, 5, "", "local\x00host"):
        with pytest.raises(InvalidArgument, match="metrics host"):
            serve_metrics(0, host=host)  # type: ignore[arg-type]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(InvalidArgument, match=r"cannot serve metrics on 127\.0\.0\.1"):
            serve_metrics(taken.getsockname()[1])


async def test_the_relay_command_refuses_a_busy_metrics_port(database_url: str, kafka: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        process = await asyncio.create_subprocess_exec(
            str(EVENTSTORE), "--database-url", database_url, "--kafka", kafka, "outbox", "relay",
            "--metrics-port", str(taken.getsockname()[1]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            _, err = await process.communicate()
    assert process.returncode == 2
    assert "cannot serve metrics on 127.0.0.1" in err.decode() and "Traceback" not in err.decode()
