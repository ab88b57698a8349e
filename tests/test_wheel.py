"""The framework installs like a library: its wheel, in a fresh virtual environment, beside an application.

The wheel is built from a clean copy of the sources (a `build/` folder left in a working tree would
leak stale modules into it) and installed, not editable, with its dependencies in a new venv. The
dependencies come from a wheelhouse packed from this venv's own installed distributions, so nothing
is downloaded. Then: the wheel installs only the framework's own top-level modules, and from a
directory holding an application's own `migrations/` package (the usual Alembic layout), `eventstore
migrate` and the demo run against a fresh database and a Kafka-protocol broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path
from typing import NamedTuple

import asyncpg
import httpx
import pytest
from packaging.requirements import Requirement

from eventstore import asyncpg_dsn
from eventstore.embedded import free_port
from eventstore_app import migrate
from eventstore_migrations import target_metadata
from tests.conftest import _admin, with_database

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]
# Installed name -> the repository folder it is built from (pyproject's package-dir).
PACKAGES = {
    "eventstore": "eventstore",
    "eventstore_app": "eventstore_app",
    "eventstore_admin": "eventstore_admin",
    "eventstore_cli": "eventstore_cli",
    "eventstore_contracts": "eventstore_contracts",
    "aggregates": "aggregates",
    "projections": "projections",
    "outbox": "outbox",
    "eventstore_migrations": "migrations",
    "eventstore_examples": "examples",
}
# Names an application typically has of its own: the framework must not install any of them.
APPLICATION_NAMES = ("migrations", "examples", "benchmarks", "tests")
# What a package ships: modules, type markers, the Alembic template, the admin console's pages and assets.
PACKAGE_FILES = (".py", ".typed", ".mako", ".html", ".css", ".js", ".LICENSE")
EXTRAS = ("http",)  # installed too, so `uvicorn eventstore_examples.http_api:api` can be checked
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis", ".eventstore"
)


class Installed(NamedTuple):
    venv: Path
    wheel: Path
    seconds: dict[str, float]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.venv / "bin" / name

    def dist_info(self) -> Path:
        site = run(self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
        (found,) = Path(site).glob("eventstore-*.dist-info")
        return found


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would point a child at this venv or pip's config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    return env


def run(*command: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout}\n{result.stderr}"
    return result


# -- a wheelhouse from the installed distributions ---------------------------------------------------


def requirements_of(wheel: Path, extras: tuple[str, ...]) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        requires = Parser().parsestr(archive.read(metadata).decode()).get_all("Requires-Dist") or []
    return [r for r in map(Requirement, requires) if wanted(r, ("", *extras))]


def wanted(requirement: Requirement, extras: tuple[str, ...]) -> bool:
    marker = requirement.marker
    return marker is None or any(marker.evaluate({"extra": extra}) for extra in extras)


def closure(requirements: list[Requirement]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that satisfy `requirements`, with their own requirements, recursively."""
    found: dict[str, importlib.metadata.Distribution] = {}
    todo = list(requirements)
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement = todo.pop()
        key = (re.sub(r"[-_.]+", "-", requirement.name).lower(), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = found.setdefault(key[0], importlib.metadata.distribution(requirement.name))
        assert requirement.specifier.contains(dist.version, prereleases=True), (
            f"this venv has {key[0]} {dist.version}, the wheel needs {requirement}: reinstall the dev extra"
        )
        extras = ("", *requirement.extras)
        todo.extend(r for r in map(Requirement, dist.requires or []) if wanted(r, extras))
    return found


def repack(dist: importlib.metadata.Distribution, wheelhouse: Path) -> Path:
    """A wheel of an installed distribution: its files in site-packages, its tags, a fresh RECORD.

    Files installed outside site-packages (console scripts, C headers) are left out: pip writes the
    scripts again from the entry points, and nothing here needs headers.
    """
    wheel_info = Parser().parsestr(dist.read_text("WHEEL") or "")
    tags = [tag.split("-") for tag in wheel_info.get_all("Tag") or []]
    tag = "-".join(".".join(dict.fromkeys(parts)) for parts in zip(*tags, strict=True))
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()
    target = wheelhouse / f"{name}-{dist.version}-{tag}.whl"
    files = [
        f
        for f in dist.files or []
        if not str(f).startswith("..")
        and "__pycache__" not in f.parts
        and f.name not in ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
    ]
    record: list[str] = []
    info_dir = ""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for file in files:
            data = Path(str(dist.locate_file(file))).read_bytes()
            archive.writestr(str(file), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{file},sha256={digest},{len(data)}")
            if file.parts[0].endswith(".dist-info"):
                info_dir = file.parts[0]
        record.append(f"{info_dir}/RECORD,,")
        archive.writestr(f"{info_dir}/RECORD", "\n".join(record) + "\n")
    return target


# -- the installed wheel -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    work = tmp_path_factory.mktemp("wheel")
    seconds: dict[str, float] = {}
    started = time.monotonic()
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", work, source)
    (wheel,) = work.glob("eventstore-*.whl")
    seconds["build"] = time.monotonic() - started

    started = time.monotonic()
    wheelhouse = work / "wheelhouse"
    wheelhouse.mkdir()
    for dist in closure(requirements_of(wheel, EXTRAS)).values():
        repack(dist, wheelhouse)
    seconds["wheelhouse"] = time.monotonic() - started

    started = time.monotonic()
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    # This venv's pip installs into the new one (--python): no network, no pip of its own to set up.
    run(
        sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-index",
        "--find-links", wheelhouse, f"eventstore[{','.join(EXTRAS)}] @ {wheel.as_uri()}",
    )  # fmt: skip
    seconds["install"] = time.monotonic() - started
    return Installed(venv, wheel, seconds)


@pytest.fixture
def application_dir(tmp_path: Path) -> Path:
    """A directory laid out like an application: its own Alembic `migrations/` and an `examples/` package."""
    for package in ("migrations", "examples"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "migrations" / "env.py").write_text(
        "raise SystemExit(\"the application's own migrations/env.py ran instead of the framework's\")\n"
    )
    return tmp_path


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    """A database of this test's own, with no tables at all."""
    name = f"es_wheel_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(server_url, name)
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def tables(url: str) -> set[str]:
    async def fetch() -> set[str]:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        finally:
            await conn.close()
        return {row["tablename"] for row in rows}

    return asyncio.run(fetch())


def test_the_wheel_installs_only_the_frameworks_own_modules(installed: Installed) -> None:
    print(f"\nwheel: {', '.join(f'{step} {s:.1f} s' for step, s in installed.seconds.items())}")
    info = installed.dist_info()
    record = [line.split(",")[0] for line in (info / "RECORD").read_text().splitlines()]
    ours = [p for p in record if not p.startswith("..") and not p.split("/")[0].endswith(".dist-info")]
    assert {p.split("/")[0] for p in ours} == set(PACKAGES)
    assert set((info / "top_level.txt").read_text().split()) == set(PACKAGES)

    # Every source file of every package, the package data included, and nothing else.
    shipped = {p for p in ours if "__pycache__" not in p}
    sources = {
        f"{installed_as}/{path.relative_to(ROOT / folder).as_posix()}"
        for installed_as, folder in PACKAGES.items()
        for path in (ROOT / folder).rglob("*")
        if path.suffix in PACKAGE_FILES and "__pycache__" not in path.parts
    }
    assert shipped == sources
    assert {"eventstore_migrations/script.py.mako", "eventstore_migrations/env.py"} <= shipped
    typed = {p.split("/")[0] for p in shipped if p.endswith("/py.typed")}
    assert typed >= {"eventstore", "eventstore_app", "eventstore_contracts", "aggregates", "projections", "outbox"}

    found = run(
        installed.python, "-c",
        f"import importlib.util; print([n for n in {APPLICATION_NAMES!r} if importlib.util.find_spec(n)])",
        cwd=installed.venv,
    )  # fmt: skip
    assert found.stdout.strip() == "[]"


def test_migrate_beside_an_applications_own_migrations(
    installed: Installed, application_dir: Path, empty_database: str
) -> None:
    out = run(installed.script("eventstore"), "--database-url", empty_database, "migrate", cwd=application_dir)
    assert set(target_metadata().tables) | {"alembic_version"} == tables(empty_database), out.stdout
    # From Python too, where the working directory comes first on sys.path and would shadow a top-level
    # `migrations` of the framework's: the application's env.py would run (and exit), not ours.
    code = f"from eventstore_app import migrate; migrate({empty_database!r}); print('migrated')"
    assert run(installed.python, "-c", code, cwd=application_dir).stdout.strip() == "migrated"


def test_the_demo_runs_from_the_installed_wheel(
    installed: Installed, application_dir: Path, empty_database: str, kafka: str
) -> None:
    started = time.monotonic()
    out = run(
        installed.script("eventstore"), "--database-url", empty_database, "--kafka", kafka,
        "demo", "--customers", "20", "--concurrency", "8",
        cwd=application_dir, timeout=600,
    )  # fmt: skip
    print(f"\ndemo from the wheel: {time.monotonic() - started:.1f} s")
    assert "all checks passed" in out.stdout, out.stdout


def test_the_http_example_serves_from_the_installed_wheel(
    installed: Installed, application_dir: Path, empty_database: str
) -> None:
    migrate(empty_database)
    port = free_port()
    env = clean_env() | {"EVENTSTORE_DATABASE_URL": empty_database}
    command = [str(installed.script("uvicorn")), "eventstore_examples.http_api:api", "--port", str(port)]
    with subprocess.Popen(
        command, cwd=application_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as server:
        try:
            status = wait_for_http(f"http://127.0.0.1:{port}/carts/nobody", server)
        finally:
            server.terminate()
            _, log = server.communicate(timeout=30)
    assert status == 404, log
    assert "Application shutdown complete" in log


def wait_for_http(url: str, server: subprocess.Popen[str], timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"uvicorn exited with status {server.returncode}")
        with contextlib.suppress(httpx.TransportError):
            return httpx.get(url, timeout=5).status_code
        time.sleep(0.2)
    pytest.fail(f"nothing answered at {url} within {timeout} s")
