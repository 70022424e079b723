"""Shared pieces: free ports, servers started as subprocesses, medians, RSS, percentiles."""

from __future__ import annotations

import math
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LOGS = BENCH / ".logs"
PY = sys.executable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``condition`` until truthy; raise after ``timeout`` seconds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception as exc:  # the server may not listen yet
            last = exc
        else:
            if result:
                return result
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s (last error: {last!r})")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, int(round(q * len(ordered) + 0.5)) - 1))
    return ordered[index]


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_delay_seconds(pid: int) -> float:
    """Time a process's threads were runnable but waited for a CPU (/proc/<pid>/schedstat).

    NaN where the kernel keeps no scheduler statistics.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return math.nan


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class Server:
    """One server process (uvicorn, or a gunicorn master with one worker) on a free port."""

    def __init__(
        self,
        name: str,
        argv: Callable[[int], list[str]],
        *,
        health: str = "/healthz",
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        forks_worker: bool = False,
        workers: int = 1,
        scheme: str = "http",
    ) -> None:
        self.name = name
        self.scheme = scheme  # "https": the server has a self-signed certificate (bench_cert)
        self._argv = argv
        self.health = health
        # The caller's env may set REDIS_URL; the bench's own environment never leaks in.
        inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PORT")}
        self.env = {**inherited, **(env or {})}
        self.cwd = cwd
        self.forks_worker = forks_worker
        self.workers = workers
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        LOGS.mkdir(exist_ok=True)
        self.port = free_port()
        self._log = open(LOGS / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            self._argv(self.port),
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, by its id
        )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = (LOGS / f"{self.name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            context = ssl._create_unverified_context() if self.scheme == "https" else None
            with urllib.request.urlopen(self.url + self.health, timeout=2, context=context) as r:
                return r.status == 200

        try:
            wait_for(up, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def worker_pid(self) -> int:
        """The process that serves requests: gunicorn's (only) worker, or the server itself."""
        assert self.proc is not None
        if not self.forks_worker:
            return self.proc.pid
        master = self.proc.pid

        def all_up() -> list[int] | None:
            pids = children(master)
            return pids if len(pids) == self.workers else None

        pids = wait_for(all_up, 10)
        # With several workers (Redis fan-out), RSS and CPU are sampled on the first one.
        return int(sorted(pids)[0])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
        self.proc = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bench_cert() -> tuple[str, str]:
    """A self-signed certificate and key for 127.0.0.1 (made once, kept with the logs)."""
    LOGS.mkdir(exist_ok=True)
    cert, key = LOGS / "bench-cert.pem", LOGS / "bench-key.pem"
    if not cert.exists() or not key.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30"]
            + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return str(cert), str(key)
