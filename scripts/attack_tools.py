"""The parts scripts/attack.py is built from: processes, raw HTTP, readers, measurements.

Nothing here waits without a bound: every socket has a timeout, every wait a deadline, and the
worker's memory is watched by ``RssWatch``, which kills the worker above a guard so that an
attack that still works cannot take the machine with it.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.redis_server import RedisServer  # noqa: E402 - needs ROOT on sys.path
from tests.service import Service, free_port  # noqa: E402

__all__ = [
    "ROOT",
    "LogTail",
    "NdjsonReader",
    "ProcfileWorker",
    "RawResponse",
    "RedisServer",
    "RssWatch",
    "Service",
    "free_port",
    "percentile",
    "raw_request",
    "rss_mib",
    "wait_until",
]


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def percentile(values: Iterable[float], fraction: float) -> float:
    """The ``fraction`` percentile (nearest rank) of ``values``; NaN when there are none."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]


# -- memory -----------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """The resident memory of ``pid`` in MiB (VmRSS from /proc), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssWatch:
    """Sample a process's RSS in the background; SIGKILL it when it grows by more than ``guard``.

    The guard is what keeps an attack that still works (a worker filling its memory at 1 GB/s)
    from taking a shared machine down: the attack then reports the guard, not the machine's end.
    """

    def __init__(self, pid: int, guard_mib: float, interval: float = 0.05) -> None:
        self.pid = pid
        self.guard_mib = guard_mib
        self.interval = interval
        self.baseline = rss_mib(pid) or 0.0
        self.peak = self.baseline
        self.tripped = False
        self.started = time.monotonic()
        #: seconds from the start of the watch to the guard's kill
        self.tripped_after = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth(self) -> float:
        """Peak RSS above the baseline so far, in MiB."""
        return self.peak - self.baseline

    def describe(self) -> str:
        """ "RSS +N MiB", and the guard's kill if it came to that."""
        text = f"RSS +{self.growth:,.0f} MiB"
        if self.tripped:
            text += f" (guard hit after {self.tripped_after:.1f} s: worker killed)"
        return text

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_mib(self.pid)
            if now is None:
                return
            self.peak = max(self.peak, now)
            if now - self.baseline > self.guard_mib:
                self.tripped = True
                self.tripped_after = time.monotonic() - self.started
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                return


# -- processes --------------------------------------------------------------------------------


class ProcfileWorker:
    """The Procfile's ``worker:`` process (jobs with Redis), when the Procfile has one."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.command = procfile_command("worker")
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ProcfileWorker:
        if self.command is None:
            return self
        venv_bin = str(Path(sys.executable).parent)
        env = {**self.env, "PATH": venv_bin + os.pathsep + self.env.get("PATH", "")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # A session of its own: stop() ends the worker and whatever it forked, by group id.
        self.proc = subprocess.Popen(
            ["bash", "-c", "exec " + self.command],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        self.proc = None


def procfile_command(kind: str) -> str | None:
    """The command of the Procfile's ``kind:`` line, None without one."""
    path = ROOT / "Procfile"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == kind and command.strip():
            return command.strip()
    return None


class LogTail:
    """The part of a log file written after this object was made."""

    ENDED = re.compile(r"stream (\S+) ended: (.+?) after (\d+) events")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def text(self) -> str:
        with open(self.path, "rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace")

    def stream_ends(self, name: Callable[[str], bool]) -> list[tuple[str, str, int]]:
        """``(name, reason, events)`` of each "stream NAME ended" line whose name matches."""
        return [(m[1], m[2], int(m[3])) for m in self.ENDED.finditer(self.text()) if name(m[1])]


# -- raw HTTP ---------------------------------------------------------------------------------


@dataclass
class RawResponse:
    """A response read off a raw socket (``status`` 0 when none came)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""
    elapsed: float = 0.0

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def describe(self) -> str:
        if not self.status:
            return f"no answer ({self.error or 'closed'})"
        code = (self.json() or {}).get("error", {}).get("code") if self.body else None
        return f"{self.status}" + (f" {code}" if code else "")


def _read_response(sock: socket.socket, deadline: float) -> RawResponse:
    """Read one response (headers, then a Content-Length body or until close) by ``deadline``."""
    data = b""
    out = RawResponse()
    try:
        while b"\r\n\r\n" not in data:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            piece = sock.recv(65536)
            if not piece:
                out.error = "closed before an answer"
                return out
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        out.status = int(status_line.split()[1])
        for line in lines:
            name, _, value = line.partition(":")
            out.headers[name.strip().lower()] = value.strip()
        length = int(out.headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            piece = sock.recv(65536)
            if not piece:
                break
            body += piece
        out.body = body if length < 0 else body[:length]
    except (TimeoutError, OSError) as exc:
        out.error = type(exc).__name__
    return out


def raw_request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Iterable[bytes] = (),
    *,
    chunked: bool = False,
    timeout: float = 20.0,
) -> RawResponse:
    """Send a request on a raw socket (``chunked``: each piece as one chunk) and read the answer.

    A server that answers early and closes (a 413 before the body is in) makes the send fail:
    the answer it already sent is read all the same.
    """
    started = time.monotonic()
    deadline = started + timeout
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    send_error = ""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            answered = False
            for piece in body:
                # A server that answers before the body is in (413) gets no more of it: reading
                # its answer now beats a reset that could come with the rest.
                answered = bool(select.select([sock], [], [], 0)[0])
                if answered or time.monotonic() > deadline:
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked and not answered:
                sock.sendall(b"0\r\n\r\n")
        except OSError as exc:
            send_error = f"send failed: {type(exc).__name__}"
        response = _read_response(sock, deadline)
    response.elapsed = time.monotonic() - started
    if send_error and not response.status:
        response.error = send_error
    return response


# -- readers ----------------------------------------------------------------------------------


class NdjsonReader:
    """Read an NDJSON stream of the service in a thread; every decoded line lands in ``items``.

    No reconnection: what this reader sees is what the server sent on one connection.
    """

    def __init__(self, url: str, headers: dict[str, str] | None = None, read_timeout: float = 30):
        self.url = url
        self.headers = {"Accept": "application/x-ndjson", **(headers or {})}
        self.read_timeout = read_timeout
        self.items: list[Any] = []
        #: when each item arrived (time.monotonic()), index for index
        self.times: list[float] = []
        self.status = 0
        self.error = ""
        self.ended = threading.Event()
        self.connected = threading.Event()
        self._response: requests.Response | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ndjson-reader", daemon=True)

    def __enter__(self) -> NdjsonReader:
        self._thread.start()
        self.connected.wait(15)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing = True
        response = self._response
        if response is not None:
            try:
                response.raw.shutdown()  # wakes the read blocked in the thread
            except (AttributeError, OSError, ValueError, RuntimeError):
                pass
        self._thread.join(5)

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The envelopes of event type ``kind`` seen so far."""
        return [i for i in self.items if isinstance(i, dict) and i.get("event") == kind]

    def _run(self) -> None:
        try:
            response = requests.get(
                self.url, headers=self.headers, stream=True, timeout=(10, self.read_timeout)
            )
            self._response = response
            self.status = response.status_code
            self.connected.set()
            if response.status_code != 200:
                self.times.append(time.monotonic())
                self.items.append({"status": response.status_code, "body": response.text[:500]})
                return
            pending = b""
            while not self._closing:
                chunk = response.raw.read1(65536)
                if not chunk:
                    break
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.strip():
                        self.times.append(time.monotonic())
                        self.items.append(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - reported by the attack, never raised in a thread
            if not self._closing:
                self.error = f"{type(exc).__name__}: {exc}"[:200]
        finally:
            self.connected.set()
            self.ended.set()


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    """``data`` in pieces of ``size`` bytes."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


def service_env(**env: str) -> dict[str, str]:
    """The environment every attacked service gets, plus ``env``: quick shutdowns, short beats."""
    return {"GRACEFUL_TIMEOUT": "3", "STREAM_HEARTBEAT": "1", **env}
