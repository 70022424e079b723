"""Start the real service (``gunicorn wsgi:app`` with gevent workers) on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    condition: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.02,
    sleep: Callable[[float], Any] = time.sleep,
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

    ``sleep``: ``gevent.sleep`` where the condition waits on greenlets of this thread."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception as exc:  # the condition may raise while the thing starts
            last_error = exc
        else:
            if result:
                return result
        sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last error: {last_error!r})")


class Service:
    """One gunicorn master with its workers, started from the repository root."""

    def __init__(
        self,
        tmp: Path,
        env: dict[str, str] | None = None,
        port: int | None = None,
        app: str = "wsgi:app",
    ):
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PORT")}
        defaults = {"STREAM_HEARTBEAT": "1", "GRACEFUL_TIMEOUT": "10"}
        self.env = {**inherited, **defaults, **(env or {})}
        self.log_path = tmp / f"gunicorn-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Service:
        """Start gunicorn (bound to 127.0.0.1 only) and wait until /healthz answers."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", self.app, "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.healthy, timeout)
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        return requests.get(self.url + "/healthz", timeout=1).status_code == 200

    def worker_pids(self) -> list[int]:
        """The worker processes' pids (children of the master)."""
        assert self.proc is not None
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the master and wait for it to exit; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise
        finally:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics as a name -> value mapping (labels kept in the name)."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def url_for(self, path: str) -> str:
        return self.url + path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with the in-process broker and a 1 s heartbeat, shared by a test module."""
    svc = Service(tmp_path_factory.mktemp("service")).start()
    yield svc
    svc.stop()


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """A factory for services a test configures itself (env), stopped at the test's end."""
    started: list[Service] = []

    def start(
        env: dict[str, str] | None = None, port: int | None = None, app: str = "wsgi:app"
    ) -> Service:
        svc = Service(tmp_path, env, port, app).start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        try:
            svc.stop(timeout=20)
        except subprocess.TimeoutExpired:
            pass
