"""The live log over server-sent events from a real server: filters, and resuming after the last id seen."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message

from eventstore import EventStore, NewEvent
from eventstore.embedded import free_port
from eventstore_admin.app import LiveLogResponse, LiveLogs
from eventstore_admin.errors import Unavailable
from tests.admin.conftest import ConsoleServer, settings_for


class Messages:
    """Server-sent events read off a streaming response, one (id, event, data) per message."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self) -> tuple[str | None, str, Any]:
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if "data" in fields:
                    return fields.get("id"), fields.get("event", "message"), orjson.loads(fields["data"])
                fields = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise AssertionError("the live log ended")


@pytest.fixture
async def store(shop_database: str) -> AsyncIterator[EventStore]:
    async with EventStore(shop_database) as s:
        yield s


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as c:
        yield c


async def test_new_events_arrive_filtered_and_a_reconnect_resumes_after_the_last_id(
    console_server: ConsoleServer, store: EventStore, http: httpx.AsyncClient
) -> None:
    category = f"live{uuid.uuid4().hex[:8]}"
    url = f"{console_server.url}/api/log"
    async with http.stream("GET", url, params={"category": category}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = Messages(response)
        await store.append("other-1", [NewEvent("Elsewhere", {})])
        first = await store.append(f"{category}-1", [NewEvent("Opened", {"n": 1}), NewEvent("Noted", {"n": 2})])
        last_id, kind, batch = await messages.next()
        while len(batch) < 2:  # the two events may come in one batch or two
            last_id, kind, more = await messages.next()
            batch += more
    assert kind == "events"
    assert [(e["stream_id"], e["version"], e["type"]) for e in batch] == [
        (f"{category}-1", 0, "Opened"), (f"{category}-1", 1, "Noted"),
    ]
    assert batch[1]["position"] == first.last_position and orjson.loads(batch[1]["data"]) == {"n": 2}
    assert last_id == f"{first.log_xid}.{first.last_position}"

    # Written while nobody listened: a reconnect with the last id gets exactly what came after it.
    later = await store.append(f"{category}-2", [NewEvent("Opened", {"n": 3})])
    async with http.stream("GET", url, params={"category": category}, headers={"last-event-id": last_id}) as again:
        resumed_id, _, resumed = await Messages(again).next()
    assert [e["position"] for e in resumed] == [later.last_position]
    assert resumed_id == f"{later.log_xid}.{later.last_position}"


async def test_types_filter_and_untrusted_data_travels_as_json_text(
    console_server: ConsoleServer, store: EventStore, http: httpx.AsyncClient
) -> None:
    category = f"live{uuid.uuid4().hex[:8]}"
    params = {"category": category, "types": "Wanted, AlsoWanted"}
    async with http.stream("GET", f"{console_server.url}/api/log", params=params) as response:
        messages = Messages(response)
        await store.append(f"{category}-1", [NewEvent("Unwanted", {}), NewEvent("Wanted", {"x": "<script>"})])
        _, _, batch = await messages.next()
    assert [e["type"] for e in batch] == ["Wanted"]
    assert orjson.loads(batch[0]["data"]) == {"x": "<script>"}


async def test_a_bad_position_is_refused_and_live_logs_are_limited(shop_database: str, http: httpx.AsyncClient) -> None:
    settings = settings_for(shop_database, port=free_port(), max_live_logs=1)
    with ConsoleServer(settings) as server:
        bad = await http.get(f"{server.url}/api/log", headers={"last-event-id": "12-x"})
        assert bad.status_code == 400
        async with http.stream("GET", f"{server.url}/api/log") as first:
            assert first.status_code == 200
            # Held in a name: a temporary's line iterator, once garbage collected, would close the
            # stream and free the slot that the second request must find taken.
            lines = first.aiter_lines()
            await lines.__anext__()  # the stream has started
            second = await http.get(f"{server.url}/api/log")
            assert second.status_code == 503 and "live logs are open" in second.json()["error"]


async def test_a_burst_of_requests_opens_no_more_live_logs_than_the_limit(shop_database: str) -> None:
    """All at once, before any body starts: each request is counted as it is admitted, not when it streams."""
    limit, burst = 3, 30
    statuses: list[int] = []
    everyone_answered = asyncio.Event()

    async def open_one(http: httpx.AsyncClient, url: str) -> None:
        async with http.stream("GET", url) as response:
            statuses.append(response.status_code)
            if len(statuses) == burst:
                everyone_answered.set()
            await everyone_answered.wait()  # the admitted stay open until every request has its answer

    settings = settings_for(shop_database, port=free_port(), max_live_logs=limit)
    with ConsoleServer(settings) as server:
        async with httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as http, asyncio.timeout(60):
            await asyncio.gather(*(open_one(http, f"{server.url}/api/log") for _ in range(burst)))
            assert sorted(statuses) == [200] * limit + [503] * (burst - limit)
            # Every client went away: each slot comes back, once.
            logs = server.console.live_logs
            while True:  # the server notices each client leave in its own time
                if logs.open <= 0:
                    break
                await asyncio.sleep(0.02)
            assert logs.open == 0
            async with http.stream("GET", f"{server.url}/api/log") as again:
                assert again.status_code == 200


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_a_live_log_whose_body_never_starts_gives_its_slot_back(spec_version: str) -> None:
    """The client is gone before the first byte: the body's generator never runs, so its `finally` cannot count."""
    logs = LiveLogs(1)
    started = False

    async def body() -> AsyncIterator[str]:
        nonlocal started
        started = True
        yield "retry: 2000\n\n"

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if spec_version == "2.4":
            raise OSError("the client closed the connection")
        await asyncio.Event().wait()  # the headers never get out; the disconnect ends the response

    response = LiveLogResponse(body(), logs.admit())
    with pytest.raises(Unavailable):
        logs.admit()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}}
    if spec_version == "2.4":  # no disconnect listener: the failed send tells the response
        with pytest.raises(ClientDisconnect):
            await response(scope, receive, send)
    else:
        await response(scope, receive, send)
    assert not started
    assert logs.open == 0
    release = logs.admit()
    release()
    release()  # a second release gives nothing back twice
    assert logs.open == 0


@pytest.mark.parametrize(
    "params",
    [{"types": "\x00"}, {"types": "Wanted, " + "T" * 256}, {"category": "c" * 256}, {"category": "order\x00"}],
    ids=["NUL type", "long type", "long category", "NUL category"],
)
async def test_bad_filters_are_refused_before_the_live_log_answers(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, params: dict[str, str]
) -> None:
    with caplog.at_level(logging.ERROR, logger="eventstore_admin"):
        async with asyncio.timeout(20):  # a filter let through would stream (in-process: never answer)
            response = await client.get("/api/log", params=params)
    assert response.status_code == 400, response.text[:300]
    assert "at most 255 characters, without NUL" in response.json()["error"]
    assert caplog.records == [], "a bad filter is the client's mistake, not an unexpected error"
