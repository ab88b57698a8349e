"""Browsing streams: newest first, by category and prefix, with keyset pages that cover every stream once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from eventstore import EventStore, NewEvent
from eventstore_admin import backend as backend_module
from eventstore_admin.backend import Backend, successor
from eventstore_admin.errors import ConsoleError
from tests.admin.conftest import console_client, settings_for
from tests.conftest import _admin, with_database

# Interleaved creation order: a-0000, b-0000, a-0001, a-0002, b-0001, ...
STREAMS = [f"{'b' if i % 3 == 1 else 'a'}-{i:04d}" for i in range(130)]


async def _fill(url: str) -> None:
    async with EventStore(url) as store, store.unit_of_work() as uow:
        for stream_id in STREAMS:
            await uow.append(stream_id, [NewEvent("Created", {"id": stream_id})])
        # A later event of an old stream does not make it newer: streams are ordered by creation.
        await uow.append(STREAMS[0], [NewEvent("Touched", {})])


@pytest.fixture(scope="module")
def streams_database(server_url: str, template_database: str) -> Iterator[str]:
    """Read by every test here, changed by none."""
    name = f"es_streams_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"'))
    url = with_database(server_url, name)
    try:
        asyncio.run(_fill(url))
        yield url
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
async def backend(streams_database: str) -> AsyncIterator[Backend]:
    async with Backend(streams_database) as b:
        yield b


async def walk(backend: Backend, limit: int, **filters: str) -> tuple[list[str], list[str]]:
    """Every page older and older, then from the oldest page back newer and newer."""
    older: list[str] = []
    page = await backend.search_streams(limit=limit, **filters)
    assert page.newer is None, "the first page has nothing newer"
    pages = [page]
    while page.older is not None:
        page = await backend.search_streams(before=page.older, limit=limit, **filters)
        pages.append(page)
    for p in pages:
        older.extend(s.stream_id for s in p.streams)
    newer: list[str] = [s.stream_id for s in page.streams]
    while page.newer is not None:
        page = await backend.search_streams(after=page.newer, limit=limit, **filters)
        newer = [s.stream_id for s in page.streams] + newer
    return older, newer


async def test_pages_cover_every_stream_once_newest_first(backend: Backend) -> None:
    older, newer = await walk(backend, limit=17)
    assert older == list(reversed(STREAMS))
    assert newer == older


async def test_a_category_pages_alone(backend: Backend) -> None:
    older, newer = await walk(backend, limit=10, category="b")
    assert older == [s for s in reversed(STREAMS) if s.startswith("b-")]
    assert newer == older


@pytest.mark.parametrize("walk_window", [backend_module.PREFIX_WALK, 3], ids=["walking", "by range"])
async def test_a_prefix_pages_the_same_whether_found_walking_or_by_range(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, walk_window: int
) -> None:
    monkeypatch.setattr(backend_module, "PREFIX_WALK", walk_window)
    expected = [s for s in reversed(STREAMS) if s.startswith("a-00")]
    older, newer = await walk(backend, limit=7, prefix="a-00")
    assert older == expected
    assert newer == expected
    older, _ = await walk(backend, limit=7, prefix="a-00", category="a")
    assert older == expected
    assert (await backend.search_streams(prefix="a-00", category="b")).streams == []
    assert (await backend.search_streams(prefix="zz")).streams == []


async def test_a_stream_lists_newest_by_creation_with_its_version(backend: Backend) -> None:
    page = await backend.search_streams(prefix=STREAMS[0])
    assert [(s.stream_id, s.version) for s in page.streams] == [(STREAMS[0], 1)]
    assert page.older is None and page.newer is None


async def test_filters_postgresql_cannot_store_are_refused(backend: Backend) -> None:
    with pytest.raises(ConsoleError):
        await backend.search_streams(prefix="a\x00")
    with pytest.raises(ConsoleError):
        await backend.search_streams(category="x" * 300)


def test_successor_is_the_first_string_past_a_prefix() -> None:
    assert successor("order-") == "order."
    assert successor("a\U0010ffff") == "b"
    assert successor("\U0010ffff") is None
    assert successor("x\ud7ff") == "x\ue000"
    assert successor("é") == "ê"


async def test_the_streams_page_links_its_pages(streams_database: str) -> None:
    async with console_client(settings_for(streams_database, token=None)) as client:
        first = await client.get("/streams", params={"category": "a"})
        assert first.status_code == 200
        assert STREAMS[-1] in first.text and 'rel="next"' in first.text and 'rel="prev"' not in first.text
        refused = await client.get("/streams", params={"prefix": "a\x00"})
        assert refused.status_code == 400
        assert (await client.get("/stream", params={"id": "a-0000"})).text.count('class="event"') == 2


async def test_a_prefix_is_searched_as_typed_spaces_and_all(shop_database: str) -> None:
    """Stream ids may start (or end) with spaces, so none are stripped; only an empty box means no prefix."""
    tag = f"zeta{uuid.uuid4().hex[:8]}"
    spaced, plain = f" {tag}-1", f"{tag}-2"
    async with EventStore(shop_database) as store:
        await store.append(spaced, [NewEvent("Created", {})])
        await store.append(plain, [NewEvent("Created", {})])
    async with Backend(shop_database) as backend:

        async def found(prefix: str) -> list[str]:
            return [s.stream_id for s in (await backend.search_streams(prefix=prefix)).streams]

        assert await found(f" {tag}") == [spaced]
        assert await found(tag) == [plain]
        assert await found(f"{tag}-2 ") == []
        assert spaced in await found(" ") and plain not in await found(" ")
        assert (await found(""))[:2] == [plain, spaced]  # what an empty box sends: every stream, newest first
    async with console_client(settings_for(shop_database, token=None)) as client:
        page = await client.get("/streams", params={"prefix": f" {tag}"})
        assert page.status_code == 200
        assert f'value=" {tag}"' in page.text  # the box keeps the space for the next search
        assert f">{spaced}</a>" in page.text and plain not in page.text
