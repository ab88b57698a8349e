"""Run every benchmark and print one table: `python -m benchmarks [--json FILE] [--only NAME]`.

Each module in `MODULES` exposes `async def run(server_url: str) -> list[Result]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.common import Result
from eventstore.embedded import database_url

MODULES = ("benchmarks.appends", "benchmarks.server", "benchmarks.aggregates", "benchmarks.replay", "benchmarks.relay")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--only", action="append", help="run only these modules (e.g. appends)")
    args = parser.parse_args()
    modules = [m for m in MODULES if not args.only or m.rsplit(".", 1)[1] in args.only]
    results: list[Result] = []
    console = Console()
    with database_url() as url:
        for name in modules:
            module = importlib.import_module(name)
            console.print(f"running {name} ...")
            results.extend(asyncio.run(module.run(url)))
    table = Table(title=f"{platform.node()} {platform.machine()}, {datetime.now(UTC):%Y-%m-%d}")
    columns = (
        "benchmark", "ours", "peer (eventsourcing)", "limit (raw asyncpg)", "unit", "client CPU µs/event (ours / limit)"
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("benchmark", "unit") else "right")
    for r in results:
        cpu = "" if r.cpu is None else f"{_fmt(r.cpu)} / {_fmt(r.limit_cpu)}"
        table.add_row(r.name, _fmt(r.ours), _fmt(r.peer), _fmt(r.limit), r.unit, cpu)
    console.print(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    r.name: {"ours": r.ours, "peer": r.peer, "limit": r.limit, "unit": r.unit, "cpu_us": r.cpu,
                             "limit_cpu_us": r.limit_cpu}
                    for r in results
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
