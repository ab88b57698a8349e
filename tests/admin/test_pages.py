"""The pages on the shop's data: what they show, and that untrusted text shows as text, never as markup."""

from __future__ import annotations

import re
import uuid

import asyncpg
import httpx

from eventstore import asyncpg_dsn
from eventstore_admin.backend import Backend
from eventstore_admin.security import Redactor
from tests.admin.conftest import PASSWORD
from tests.admin.workload import DEAD_LETTER_ERROR, XSS_STREAM

RAW_MARKUP = ("<script>window", "<img src=x", "<b>the broker", "<tag>")


def assert_no_raw_markup(html: str) -> None:
    for raw in RAW_MARKUP:
        assert raw not in html, f"unescaped {raw!r} in the page"


async def test_a_stream_shows_each_event_with_pretty_json(client: httpx.AsyncClient) -> None:
    page = await client.get("/stream", params={"id": "order-o0001"})
    assert page.status_code == 200
    text = page.text
    for event_type in ("OrderPlaced", "PaymentCaptured", "OrderShipped"):
        assert event_type in text
    assert "&#34;customer&#34;: &#34;customer-1&#34;" in text  # indented JSON, escaped for HTML
    assert "&#34;schema_version&#34;: 1" in text  # the metadata
    assert re.search(r"v0</span>\s*<span class=\"type\">OrderPlaced", text)


async def test_event_data_that_looks_like_markup_is_shown_as_text(client: httpx.AsyncClient) -> None:
    page = await client.get("/stream", params={"id": XSS_STREAM})
    assert page.status_code == 200
    assert_no_raw_markup(page.text)
    assert "&lt;script&gt;window.__xss = &#39;script&#39;&lt;/script&gt;" in page.text
    assert "&lt;img src=x onerror=" in page.text
    first = re.search(r'href="/event\?position=(\d+)"', page.text)
    assert first is not None
    single = await client.get("/event", params={"position": first.group(1)})
    assert single.status_code == 200
    assert_no_raw_markup(single.text)
    assert XSS_STREAM in single.text


async def test_a_failed_projection_shows_its_error_and_failing_event_as_text(client: httpx.AsyncClient) -> None:
    page = await client.get("/projections")
    assert page.status_code == 200
    assert_no_raw_markup(page.text)
    row = page.text[page.text.index('data-projection="notes"'):]
    row = row[: row.index("</tr>")]
    assert 'data-state="failed"' in row
    assert "ValueError: cannot file the note please fail &lt;script&gt;" in row
    assert re.search(r'href="/event\?position=\d+">failing event: NoteAdded #\d+', row)
    for name in ("order_summary", "product_sales", "stock_levels"):
        assert f'data-projection="{name}"' in page.text
    status = (await client.get("/api/projections", params={"fresh": "1"})).json()
    notes = next(p for p in status["projections"] if p["name"] == "notes")
    assert notes["state"] == "failed" and notes["lag_events"] > 0 and notes["lag_seconds"] > 0
    assert "<script>" in notes["last_error"]  # JSON carries the text as it is; scripts show it with textContent


async def test_the_outbox_shows_topics_relay_slots_and_dead_letters(client: httpx.AsyncClient) -> None:
    page = await client.get("/outbox")
    assert page.status_code == 200
    assert_no_raw_markup(page.text)
    assert "shop.orders" in page.text
    assert "MessageSizeTooLargeError: &lt;b&gt;the broker refused it&lt;/b&gt;" in page.text
    assert page.text.count('class="slot free"') == 64  # no relay runs
    status = (await client.get("/api/outbox")).json()
    (topic,) = status["topics"]
    assert topic["topic"] == "shop.orders" and topic["pending"] > 0 and topic["dead"] >= 1
    assert topic["oldest_pending_age"] > 0
    assert DEAD_LETTER_ERROR not in page.text


async def test_no_page_shows_the_database_password(client: httpx.AsyncClient) -> None:
    pages = ["/streams", "/stream?id=order-o0001", "/log", "/projections", "/outbox", "/login", "/nowhere",
             "/api/projections", "/api/outbox", "/stream?id=missing"]
    for path in pages:
        response = await client.get(path)
        assert PASSWORD not in response.text, path
    header = (await client.get("/streams")).text
    assert ":***@" in header


async def test_errors_read_from_the_database_never_show_its_password(
    client: httpx.AsyncClient, shop_database: str
) -> None:
    """Runners and relays write their errors to the database, and those may quote the URL the console uses too."""
    leak = f"OperationalError: cannot reach {shop_database} (password {PASSWORD})"
    shown = "OperationalError: cannot reach *** (password ***)"
    name = f"leaky_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(asyncpg_dsn(shop_database))
    message_id = None
    try:
        await conn.execute(
            "INSERT INTO projection_checkpoints (name, mode, version, generation, tables, status, last_error)"
            " VALUES ($1, 'async', 1, 1, '{}', 'failed', $2)",
            name, leak,
        )
        await conn.execute(
            "INSERT INTO projection_rebuilds (name, generation, version, tables, last_error)"
            " VALUES ($1, 2, 1, '{}', $2)",
            name, leak,
        )
        message_id = await conn.fetchval(
            "UPDATE outbox SET dead_at = now(), attempts = 5, last_error = $1"
            " WHERE id = (SELECT min(id) FROM outbox WHERE dead_at IS NULL AND published_at IS NULL) RETURNING id",
            leak,
        )
        for path in ["/projections", "/api/projections?fresh=1", "/api/projections", "/outbox", "/api/outbox"]:
            response = await client.get(path)
            assert response.status_code == 200 and PASSWORD not in response.text, path
        projections = (await client.get("/projections")).text
        row = projections[projections.index(f'data-projection="{name}"'):]
        assert shown in row[: row.index("</tr>")]
        status = (await client.get("/api/projections", params={"fresh": "1"})).json()
        assert next(p for p in status["projections"] if p["name"] == name)["last_error"] == shown
        outbox = (await client.get("/outbox")).text
        row = outbox[outbox.index(f'data-message="{message_id}"'):]
        assert shown in row[: row.index("</tr>")]
        # The rebuild's recorded error is not on a page today; it is cleaned all the same.
        async with Backend(shop_database, redact=Redactor.for_settings(shop_database, None)) as backend:
            view = next(v for v in await backend.projections() if v.name == name)
        assert view.rebuild is not None and view.rebuild.error == shown
    finally:
        await conn.execute("DELETE FROM projection_checkpoints WHERE name = $1", name)
        if message_id is not None:
            await conn.execute(
                "UPDATE outbox SET dead_at = NULL, attempts = 0, last_error = NULL WHERE id = $1", message_id
            )
        await conn.close()


async def test_missing_things_answer_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/stream", params={"id": "nobody-here"})).status_code == 404
    assert (await client.get("/event", params={"position": "999999999"})).status_code == 404
    assert (await client.get("/nowhere")).status_code == 404
    missing = await client.get("/api/projections/nope/rebuild")
    assert missing.status_code == 404 and "error" in missing.json()


async def test_the_log_page_and_charts_data(client: httpx.AsyncClient) -> None:
    page = await client.get("/log", params={"category": "order", "types": "OrderPlaced"})
    assert page.status_code == 200
    assert 'value="order"' in page.text and 'value="OrderPlaced"' in page.text
    await client.get("/api/projections", params={"fresh": "1"})  # a sample now, whatever the sampler's timing
    lag = (await client.get("/api/projections/lag")).json()
    assert lag["times"]
    assert set(lag["events"]) >= {"order_summary", "notes"}
    assert len(lag["events"]["notes"]) == len(lag["times"])
