"""The Grafana dashboard asks only for metrics that exist, under the names the docs list."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_SUFFIXES = ("_bucket", "_count", "_sum")


def documented() -> set[str]:
    text = (ROOT / "docs" / "observability.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+)`", text, re.MULTILINE)) | set(
        re.findall(r"`([a-z_]+_total)`", text)
    )


def test_every_metric_the_dashboard_queries_is_documented() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana" / "eventstore.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(expressions) >= 25
    queried = set()
    for expression in expressions:
        expression = re.sub(r"by \([^)]*\)|\{[^}]*\}", "", expression)  # label names are not metrics
        for name in re.findall(r"\b((?:eventstore|aggregate|projection|outbox)_[a-z_]+)", expression):
            for suffix in _SUFFIXES:
                name = name.removesuffix(suffix)
            queried.add(name)
    names = documented()
    assert queried - names == set()
    assert {"projection_lag", "outbox_messages_pending", "outbox_publish_latency_seconds"} <= queried
