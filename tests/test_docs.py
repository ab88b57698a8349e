"""The code in the README and in docs/ runs, so the docs cannot rot.

Every ```python block of a page runs, in order, in one namespace, against a database of its own (its
URL is `EVENTSTORE_DATABASE_URL`, as in production) and the test brokers (`KAFKA_BOOTSTRAP_SERVERS`,
`NATS_URL`).
Top-level `await` is allowed, as in an async REPL. A block fenced as ```python notest is shown only.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from eventstore.embedded import DATABASE_URL_ENV
from outbox.embedded import BOOTSTRAP_ENV, NATS_ENV

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python[ \t]*(?P<tag>\w*)\n(?P<code>.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, code) of each block that runs."""
    text = page.read_text()
    return [
        (text.count("\n", 0, m.start()) + 2, m["code"])
        for m in _BLOCK.finditer(text)
        if m["tag"] != "notest"
    ]


def test_every_docs_page_has_code_that_runs() -> None:
    names = {p.name for p in PAGES}
    pages = {"getting-started.md", "aggregates.md", "projections.md", "outbox.md", "operations.md", "contracts.md"}
    pages.add("decisions.md")
    assert pages <= names
    assert all(blocks(p) for p in PAGES), [p.name for p in PAGES if not blocks(p)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
async def test_the_code_of_the_page_runs(
    page: Path, database_url: str, kafka: str, nats_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(DATABASE_URL_ENV, database_url)
    monkeypatch.setenv(BOOTSTRAP_ENV, kafka)
    monkeypatch.setenv(NATS_ENV, nats_url)
    monkeypatch.chdir(tmp_path)
    module = type(sys)(f"docs_{page.stem.replace('-', '_')}")  # classes defined in a page need a module
    sys.modules[module.__name__] = module
    namespace: dict[str, Any] = module.__dict__
    try:
        for line, code in blocks(page):
            tree = ast.parse(code, filename=str(page))
            ast.increment_lineno(tree, line - 1)
            compiled = compile(tree, str(page), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(compiled, namespace)
            if result is not None:
                await result
    finally:
        del sys.modules[module.__name__]
