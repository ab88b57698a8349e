"""`eventstore schemas ...` and `eventstore asyncapi`: the real command, as a process or in this one."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import jsonschema
import pytest
from rich.console import Console

from eventstore import EventStore, NewEvent
from eventstore_cli import main
from eventstore_contracts import Contracts, schema_folder, verify_stored
from eventstore_examples.shop.app import APP
from eventstore_examples.shop.demo import run_demo
from tests.contracts import apps

ROOT = Path(__file__).parents[2]
SHOP = "eventstore_examples.shop.app:APP"
SHOP_LOCK = ROOT / "examples" / "shop" / "eventstore.schemas.lock"
ASYNCAPI_SCHEMA = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.schema.json"


def eventstore(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTSTORE_DATABASE_URL", "EVENTSTORE_APP")}
    env["COLUMNS"] = "250"
    return subprocess.run(
        [sys.executable, "-m", "eventstore_cli", *args], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=ROOT,
    )


def one_line(text: str) -> str:
    return " ".join(text.split())


def in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The command's own parser and handler in this process (a new interpreter per step costs a second)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, one_line(err)


def test_check_passes_on_the_committed_shop_lock() -> None:
    done = eventstore("schemas", "check", "--app", SHOP, "--lock", str(SHOP_LOCK))
    assert done.returncode == 0, done.stderr
    assert "11 event types and 1 topics match" in done.stdout


def test_check_fails_naming_type_and_field_of_a_breaking_change() -> None:
    done = eventstore("schemas", "check", "--app", "tests.contracts.apps:RETYPED", "--lock", str(SHOP_LOCK))
    assert done.returncode == 1
    errors = one_line(done.stderr)
    assert "breaking: OrderPlaced v1 field 'total': type changed from integer to string" in errors
    assert "(breaks stored events)" in errors and "(breaks consumers of shop.orders (backward" in errors
    assert "Traceback" not in done.stderr


def test_a_new_version_with_an_upcaster_is_locked_one_without_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = tmp_path / "eventstore.schemas.lock"
    shutil.copy(SHOP_LOCK, lock)
    code, _, err = in_process(capsys, "schemas", "check", "--app", "tests.contracts.apps:ITEM_ADDED_V2_NO_UPCASTER",
                              "--lock", str(lock))
    assert code == 1 and "ItemAdded v1: no upcaster lifts v1 to v2" in err
    code, _, err = in_process(capsys, "schemas", "lock", "--app", "tests.contracts.apps:ITEM_ADDED_V2_NO_UPCASTER",
                              "--lock", str(lock))
    assert code == 2 and "--force" in err
    assert lock.read_text() == SHOP_LOCK.read_text(), "a refused lock changes nothing"

    code, _, err = in_process(capsys, "schemas", "check", "--app", "tests.contracts.apps:ITEM_ADDED_V2",
                              "--lock", str(lock))
    assert code == 1 and "not locked: ItemAdded v2 is new" in err and "breaking" not in err
    code, _, err = in_process(capsys, "schemas", "lock", "--app", "tests.contracts.apps:ITEM_ADDED_V2",
                              "--lock", str(lock))
    assert code == 0, err
    assert set(json.loads(lock.read_text())["events"]["ItemAdded"]) == {"1", "2"}
    code, _, err = in_process(capsys, "schemas", "check", "--app", "tests.contracts.apps:ITEM_ADDED_V2",
                              "--lock", str(lock))
    assert code == 0, err


def test_a_malformed_lock_is_one_line_with_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lock = tmp_path / "eventstore.schemas.lock"
    lock.write_text('{\n  "format": 1,\n  "events": {\n    "OrderPlaced": {"1": {}},\n  }\n}\n')
    code, _, err = in_process(capsys, "schemas", "check", "--app", SHOP, "--lock", str(lock))
    assert code == 2 and f"{lock}:5: not JSON" in err


def test_export_writes_a_schema_per_version_that_validates_the_payloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = in_process(capsys, "schemas", "export", str(tmp_path / "schemas"), "--app", SHOP,
                              "--lock", str(SHOP_LOCK))
    assert code == 0, err
    files = sorted(p.relative_to(tmp_path / "schemas").as_posix() for p in (tmp_path / "schemas").rglob("*.json"))
    assert files == sorted(f"{name}/v1.json" for name in APP.registry.event_types)
    schema = json.loads((tmp_path / "schemas" / "OrderPlaced" / "v1.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$id"] == Contracts.of(APP).schema_id("OrderPlaced", 1)
    assert schema["$id"] == "urn:eventstore:examples.shop:OrderPlaced:v1"
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"customer": "c1", "lines": [{"sku": "s", "quantity": 1, "price": 5}], "total": 5})
    assert not validator.is_valid({"customer": "c1", "lines": [{"sku": "s", "quantity": "1", "price": 5}], "total": 5})


def test_export_keeps_types_named_with_dots_inside_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out" / "schemas"
    code, _, err = in_process(capsys, "schemas", "export", str(target), "--app", "tests.contracts.apps:DOTS",
                              "--lock", str(tmp_path / "none.lock"))
    assert code == 0, err
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    assert written == ["out/schemas/%2E./v1.json", "out/schemas/%2E/v1.json", "out/schemas/%2Ehidden/v1.json"]
    assert sorted(unquote(folder.name) for folder in target.iterdir()) == [".", "..", ".hidden"]
    assert schema_folder("Order/Placed") == "Order%2FPlaced" and schema_folder("a.b") == "a.b"


@pytest.mark.parametrize("command", [("schemas", "check"), ("schemas", "lock"), ("asyncapi",)])
def test_an_event_class_without_a_json_schema_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    lock = tmp_path / "eventstore.schemas.lock"
    shutil.copy(SHOP_LOCK, lock)
    code, _, err = in_process(capsys, *command, "--app", "tests.contracts.apps:NO_SCHEMA", "--lock", str(lock))
    path = ROOT / "tests" / "contracts" / "apps.py"
    assert code == 2 and "Traceback" not in err
    assert f"error: Hooked at {path}:" in err
    assert "(event type 'Hooked') has no JSON Schema: Cannot generate a JsonSchema for core_schema.Callable" in err
    assert lock.read_text() == SHOP_LOCK.read_text()


def test_asyncapi_document_is_valid_asyncapi_3(tmp_path: Path) -> None:
    output = tmp_path / "asyncapi.json"
    done = eventstore("asyncapi", "--app", SHOP, "--lock", str(SHOP_LOCK), "-o", str(output),
                      "--server", "production=kafka.example.com:9092")
    assert done.returncode == 0, done.stderr
    document = json.loads(output.read_text())
    validator = jsonschema.Draft7Validator(json.loads(ASYNCAPI_SCHEMA.read_text()))
    assert list(validator.iter_errors(document)) == []
    assert document["asyncapi"] == "3.0.0"
    assert list(document["channels"]) == ["shop.orders"]


async def test_verify_stored_walks_the_demo_database(database_url: str, kafka: str) -> None:
    report = await run_demo(database_url, kafka, Console(file=io.StringIO()), customers=30, concurrency=8)
    assert report.ok

    passed = await asyncio.to_thread(eventstore, "--database-url", database_url, "schemas", "verify-stored",
                                     "--app", SHOP)
    assert passed.returncode == 0, passed.stderr
    assert "all" in passed.stdout and "stored events load" in passed.stdout
    for name in ("ProductListed", "OrderPlaced", "PaymentCaptured", "ItemAdded", "CartCheckedOut"):
        assert name in passed.stdout

    # A new version with an upcaster reads every stored v1 event; without one, none of them.
    async with EventStore(database_url) as store:
        lifted = await verify_stored(store, apps.ITEM_ADDED_V2.registry)
        assert lifted.ok and lifted.events > 0
        items = [v for v in lifted.versions if v.event_type == "ItemAdded"]
        assert [(v.schema_version, v.failed) for v in items] == [(1, 0)] and items[0].events > 0
        broken = await verify_stored(store, apps.ITEM_ADDED_V2_NO_UPCASTER.registry)
        assert [(v.event_type, v.schema_version, v.failed == v.events) for v in broken.failures] == [
            ("ItemAdded", 1, True)
        ]
        assert "no upcaster from v1 to v2" in (broken.failures[0].first_failure or "")
        # A payload the current class refuses (written past the typed API).
        await store.append("order-bad", [NewEvent("OrderPlaced", {"customer": "c", "lines": [], "total": "lots"},
                                                  {"schema_version": 1})])
    failed = await asyncio.to_thread(eventstore, "--database-url", database_url, "schemas", "verify-stored",
                                     "--app", SHOP)
    assert failed.returncode == 1
    assert "1 of" in failed.stderr and "no longer load" in failed.stderr
    assert "order-bad" in one_line(failed.stdout) and "total" in failed.stdout


def test_an_event_type_registered_twice_is_one_line_naming_both_classes(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, errors = in_process(capsys, "schemas", "check", "--app", "tests.contracts.duplicate_app:APP",
                                 "--lock", str(SHOP_LOCK))
    assert code == 2
    path = ROOT / "tests" / "contracts" / "duplicate_app.py"
    assert "DuplicateEventType: event type 'Counted' is registered twice" in errors
    assert f"Counted ({path}:9)" in errors and f"CountedAsText ({path}:13)" in errors
