"""`eventstore admin` as a user starts it: the real command, a real port."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from eventstore.embedded import free_port


def admin(database_url: str, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTSTORE_ADMIN_TOKEN", "EVENTSTORE_APP")}
    return subprocess.Popen(
        [sys.executable, "-m", "eventstore_cli", "--database-url", database_url, "admin", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def test_the_command_serves_read_only_on_loopback_and_stops_on_sigterm(shop_database: str) -> None:
    port = free_port()
    process = admin(shop_database, "--port", str(port), "--app", "tests.admin.app:APP")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/projections", timeout=5)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read() if process.stdout else ""
                assert time.monotonic() < deadline, "the console did not start"
                time.sleep(0.2)
        assert page.status_code == 200
        assert "read-only" in page.text and "data-action" not in page.text
        assert 'data-projection="order_summary"' in page.text
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=20)
    assert process.returncode == 0, output
    assert f"admin console on http://127.0.0.1:{port}/ (read-only)" in output


def test_a_short_token_is_refused_before_listening(shop_database: str) -> None:
    process = admin(shop_database, "--port", str(free_port()), "--token", "too-short")
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "at least 16 characters" in output
