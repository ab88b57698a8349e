"""The console in a real browser (Debian's Chromium, headless, driven by Playwright) on the shop's data.

Skipped, with the reason, where /usr/bin/chromium is missing (`apt-get install -y chromium` as root; `.ci/run`
does it). Every page is also checked for errors in the browser's console: a Content-Security-Policy
violation shows there.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from eventstore import EventStore, NewEvent
from tests.admin.conftest import TOKEN, ConsoleServer
from tests.admin.workload import XSS_IMG, XSS_SCRIPT, XSS_STREAM, dead_at, kill_a_message, xss_event

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason=f"no Chromium at {CHROMIUM}: install it (as root: apt-get install -y chromium) to run the browser tests",
    ),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[dev]'")
Browser = sync_api.Browser
Page = sync_api.Page
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, console_server: ConsoleServer) -> Iterator[Page]:
    context = browser.new_context(base_url=console_server.url, viewport={"width": 1400, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    yield page
    context.close()
    assert problems == [], "errors in the browser's console"


def blocking(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from a test: Playwright's sync API keeps a loop of its own running here."""
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        return worker.submit(asyncio.run, coroutine).result()


def sign_in(page: Page) -> None:
    page.goto("/login")
    page.fill('input[name="token"]', TOKEN)
    page.click('form.login button[type="submit"]')
    page.wait_for_url("**/projections")
    expect(page.locator(".badge.operator")).to_be_visible()


def no_injection(page: Page) -> None:
    assert page.evaluate("window.__xss") is None, "event data ran as script"
    assert page.locator("main img").count() == 0, "event data became an element"


def test_browse_to_a_stream_and_see_an_event(page: Page) -> None:
    page.goto("/streams")
    page.fill('input[name="category"]', "order")
    page.fill('input[name="prefix"]', "order-o0001")
    page.click('form.filters button[type="submit"]')
    page.click("text=order-o0001")
    page.wait_for_url(re.compile(r"/stream\?id=order-o0001"))
    placed = page.locator("article.event").filter(has_text="OrderPlaced")
    expect(placed.locator("pre.data")).to_contain_text('"customer": "customer-1"')
    expect(placed.locator(".version")).to_have_text("v0")
    placed.locator("a.position").click()
    expect(page.locator("h1")).to_contain_text("Event #")
    expect(page.locator("pre.metadata")).to_contain_text('"schema_version": 1')


def test_event_data_that_looks_like_markup_shows_as_text(page: Page) -> None:
    page.goto(f"/stream?id={XSS_STREAM}")
    first = page.locator("article.event").first
    expect(first.locator("pre.data")).to_contain_text(XSS_SCRIPT)
    expect(first.locator("pre.data")).to_contain_text('"<tag>"')
    expect(first.locator("pre.metadata")).to_contain_text("onerror")
    expect(page.locator("article.event").nth(1).locator("pre.data")).to_contain_text(XSS_IMG.replace('"', '\\"'))
    no_injection(page)
    page.goto("/projections")  # the failed projection's error quotes the event
    expect(page.locator('tr[data-projection="notes"] [data-field="last_error"]')).to_contain_text("<script>")
    no_injection(page)


def test_the_live_log_shows_new_events_as_text(page: Page, shop_database: str) -> None:
    category = f"live{uuid.uuid4().hex[:8]}"
    page.goto(f"/log?category={category}")
    expect(page.locator("#log-state")).to_have_text("following")

    async def append() -> None:
        async with EventStore(shop_database) as store:
            await store.append("elsewhere-1", [NewEvent("NotForThisLog", {})])
            await store.append(f"{category}-1", [xss_event(), xss_event(XSS_IMG)])

    blocking(append())
    rows = page.locator("#log-rows tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(1).locator("td.data")).to_contain_text(XSS_SCRIPT)
    expect(rows.nth(0).locator("td.data")).to_contain_text("onerror")
    expect(rows.nth(0).locator("td.type")).to_have_text("NoteAdded")
    expect(page.locator("#log-count")).to_have_text("2")
    no_injection(page)


def test_watch_a_projection_rebuild_finish(page: Page) -> None:
    sign_in(page)
    row = page.locator('tr[data-projection="order_summary"]')
    generation = int(row.locator('[data-field="generation"]').inner_text())
    expect(page.locator("#chart-events canvas")).to_have_count(1)  # the lag chart is drawn

    row.locator('button[data-kind="reset"]').click()  # asks first; cancelling does nothing
    expect(page.locator("#confirm-text")).to_contain_text("Reset order_summary?")
    page.locator('#confirm button[value="cancel"]').click()
    expect(page.locator("#confirm")).not_to_be_visible()

    row.locator('button[data-kind="rebuild"]').click()
    expect(page.locator("#confirm-text")).to_contain_text("Rebuild order_summary from the start of the log?")
    page.click("#confirm-ok")
    progress = row.locator(".progress")
    expect(progress).to_be_visible()
    expect(progress).to_have_class(re.compile(r"\bfinished\b"))
    expect(progress.locator(".progress-text")).to_contain_text(re.compile(r"rebuilt from [\d,]+ events"))
    expect(row.locator('[data-field="generation"]')).to_have_text(str(generation + 1))


def test_retry_a_dead_letter(page: Page, shop_database: str) -> None:
    message_id = blocking(kill_a_message(shop_database))
    sign_in(page)
    page.goto("/outbox")
    row = page.locator(f'tr[data-message="{message_id}"]')
    row.locator("button", has_text="Retry").click()
    expect(page.locator("#confirm-text")).to_contain_text(f"Retry message {message_id}")
    page.click("#confirm-ok")
    expect(row).to_have_count(0)
    expect(page.locator("#flash")).to_contain_text(f"message {message_id} is back in line")
    assert blocking(dead_at(shop_database, message_id)) is None
