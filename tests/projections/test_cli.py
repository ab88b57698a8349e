"""`eventstore projections ...` against a real database, run the way the console script runs it."""

from __future__ import annotations

import pytest

from eventstore import START, EventStore
from projections import ProjectionAdmin
from tests.projections.app import PROJECTIONS, assert_ledger_exactly_once, fill
from tests.projections.conftest import Cli

APP = "tests.projections.app:APP"


async def test_run_status_rebuild_reset_resume(store: EventStore, cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    await store.wait_until_visible(await fill(store, accounts=4, rounds=10))

    assert await cli("status", "--app", APP) == 0
    out = capsys.readouterr().out
    assert "ledger" in out and "stream_counts" in out and out.count("not started") == 3

    assert await cli("run", "--app", APP, "--until-caught-up", "--batch-size", "50") == 0
    out = capsys.readouterr().out
    assert "running ledger, stream_counts as" in out and "caught up" in out
    assert await assert_ledger_exactly_once(store) == 120

    assert await cli("status") == 0  # no --app: what the database records
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert "stopped" in lines["ledger"] and " 0 " in lines["ledger"].replace("│", " ")
    assert "totals" not in lines  # inline: never started by a runner or an application here

    assert await cli("rebuild", "ledger", "--app", APP, "--batch-size", "7") == 0
    out = capsys.readouterr().out
    assert "rebuilt ledger: 120 events in" in out and "the new tables are live" in out
    assert await assert_ledger_exactly_once(store) == 120

    assert await cli("reset", "ledger", "--app", APP) == 0
    assert "reset ledger: its tables are empty; a runner replays it from the start" in capsys.readouterr().out
    statuses = {s.name: s for s in await ProjectionAdmin(store, PROJECTIONS).status()}
    assert (statuses["ledger"].generation, statuses["ledger"].checkpoint, statuses["ledger"].lag) == (3, START, 120)

    assert await cli("resume", "ledger") == 0
    assert "ledger had not failed; nothing to resume" in capsys.readouterr().out

    assert await cli("drop", "ledger") == 0
    assert "dropped ledger: its tables, checkpoint and guard are gone" in capsys.readouterr().out
    assert "ledger" not in {s.name for s in await ProjectionAdmin(store, []).status()}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["rebuild", "nope", "--app", APP], "unknown projection 'nope' (declared: ledger, stream_counts, totals)"),
        (["reset", "nope", "--app", APP], "error: unknown projection 'nope'"),
        (["resume", "nope"], "error: unknown projection 'nope'"),
        (["drop", "nope"], "error: unknown projection 'nope'"),
        (["rebuild", "ledger"], "error: no application: pass --app module:attribute or set EVENTSTORE_APP"),
        (["run", "--app", "tests.projections.nothing_here:X"], "cannot import 'tests.projections.nothing_here'"),
        (["run", "--app", "tests.projections.app:NOTHING"], "'tests.projections.app' has no attribute 'NOTHING'"),
        (["run", "--app", "tests.projections.app:PROJECTIONS"], "expected an eventstore_app.Application, got list"),
        (["run", "--app", "tests.projections.app"], "--app must look like module:attribute"),
        (["run", "--app", APP, "--only", "totals"], "no asynchronous projections to run"),
        (["run", "--app", APP, "--only", "ledgr"], "unknown projection 'ledgr'"),
    ],
)
async def test_mistakes_are_one_line_errors(
    cli: Cli, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert await cli(*argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
