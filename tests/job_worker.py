"""The job worker as the ``Procfile`` starts it (``worker:``), for tests that run jobs on Redis.

``JobWorker`` runs the ``worker:`` line of the repository's ``Procfile`` (its program started
with this interpreter, ``python -m dramatiq ...``) in a session of its own, so a test can stop it
as a platform does: SIGTERM to every process of the group, or SIGKILL to all of them.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.service import ROOT, wait_for

#: what the worker logs once a worker process is ready
READY = "Worker process is ready for action"


def procfile_command(kind: str) -> list[str]:
    """The command of the ``Procfile``'s ``kind:`` line, as arguments."""
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == kind:
            return shlex.split(command)
    raise AssertionError(f"the Procfile has no {kind}: line")


def queue_env(redis_url: str, **extra: str) -> dict[str, str]:
    """Settings for a web and its workers on a queue of their own (tests never share jobs)."""
    return {
        "REDIS_URL": redis_url,
        "STREAM_JOB_QUEUE": "test-" + secrets.token_hex(4),
        **extra,
    }


class JobWorker:
    """The ``worker:`` process type: its master and worker processes, in a session of their own."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PORT")}
        self.env = {**inherited, **env}
        self.log_path = tmp / f"worker-{secrets.token_hex(3)}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> JobWorker:
        """Start the worker and wait until its worker processes are ready."""
        program, *args = procfile_command("worker")
        assert program == "dramatiq", program
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", program, *args],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self.ready, timeout)
        return self

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the worker exited with {self.proc.returncode}:\n{self.log()}")
        return READY in self.log()

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every process of the worker, as a platform stopping it does."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the worker's master to exit; its exit code."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM to the group, then wait; SIGKILL if it does not exit in ``timeout``."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL to every process of the worker (no shutdown at all), and reap the master."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], JobWorker]]:
    """A factory for job workers (env: their settings), all killed at the test's end."""
    started: list[JobWorker] = []

    def start(env: dict[str, str]) -> JobWorker:
        worker = JobWorker(tmp_path, env)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        if worker.proc is not None and worker.proc.poll() is None:
            worker.kill()
