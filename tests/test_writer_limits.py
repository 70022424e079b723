"""A stream's generator stops, in bounded time and memory, whenever its client leaves or is cut off.

The attack of issue 10 item 1 against the real service (gunicorn + gevent): one GET of
``/events?count=3000000&interval=0&size=1000`` (3 GB if produced to its end) whose client reads
1 MB and leaves, or never reads at all, or is still connected when the worker stops. Each time the
worker must stop producing after a bounded number of events (what the socket buffers and the
writer's 256 KiB buffer hold, a few thousand 1 KB events) and its memory must stay bounded.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.service import Service, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ATTACK = b"GET /events?count=3000000&interval=0&size=1000 HTTP/1.1\r\nHost: t\r\n\r\n"
#: events produced past what the client received: socket buffers (a few MB on loopback) plus the
#: writer's buffer, in 1 KB events; 3,000,000 when the producer runs to its end
MAX_EVENTS = 50_000
#: growth of the worker's peak RSS allowed (the full attack is 3 GB)
MAX_RSS_GROWTH = 200 * 1024 * 1024


def rss(pid: int) -> int:
    """The process's peak resident set size so far, in bytes (/proc/<pid>/status, VmHWM).

    The peak, not the current size: a buffer freed by the time the stream ended still counts.
    """
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def ended(svc: Service, reason: str) -> Callable[[], int | None]:
    """A condition: the events count of the first "stream events ended: <reason>" log line."""
    pattern = re.compile(rf"stream events ended: {reason} after (\d+) events")

    def condition() -> int | None:
        match = pattern.search(svc.log())
        return int(match.group(1)) if match else None

    return condition


def worker(svc: Service) -> int:
    (pid,) = svc.worker_pids()
    return pid


def read_at_least(sock: socket.socket, size: int, timeout: float = 30.0) -> int:
    received = 0
    deadline = time.monotonic() + timeout
    while received < size:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(65536)
        assert chunk, "the server closed the stream early"
        received += len(chunk)
    return received


def test_a_client_that_reads_1mb_and_leaves_stops_the_generator(
    start_service: Callable[..., Service],
) -> None:
    svc = start_service()
    pid = worker(svc)
    before = rss(pid)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        sock.sendall(ATTACK)
        read_at_least(sock, 1024 * 1024)
    events = wait_for(ended(svc, "disconnect"), timeout=15)
    growth = rss(pid) - before
    print(f"events produced: {events}; worker peak RSS growth: {growth / 2**20:.1f} MiB")
    assert 1000 <= events < MAX_EVENTS
    assert growth < MAX_RSS_GROWTH
    assert requests.get(svc.url + "/healthz", timeout=5).status_code == 200


def test_a_client_that_half_closes_stops_the_generator(
    start_service: Callable[..., Service],
) -> None:
    # The client reads 1 MB, then sends its FIN and goes on reading: no write fails, the
    # worker notices the FIN alone, stops the generator and ends the body after what it holds.
    svc = start_service()
    pid = worker(svc)
    before = rss(pid)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        sock.sendall(ATTACK)
        received = read_at_least(sock, 1024 * 1024)
        sock.shutdown(socket.SHUT_WR)
        tail = b""
        while chunk := sock.recv(65536):
            received += len(chunk)
            tail = (tail + chunk)[-16:]
    assert tail.endswith(b"\r\n0\r\n\r\n")  # the body ended properly (the last chunk)
    events = wait_for(ended(svc, "disconnect"), timeout=15)
    growth = rss(pid) - before
    print(
        f"events produced: {events}; received: {received} bytes; worker peak RSS growth: ", end=""
    )
    print(f"{growth / 2**20:.1f} MiB")
    assert 1000 <= events < MAX_EVENTS
    assert received < MAX_EVENTS * 1100
    assert growth < MAX_RSS_GROWTH


def test_a_client_that_never_reads_is_cut_off_and_stops_the_generator(
    start_service: Callable[..., Service],
) -> None:
    svc = start_service({"STREAM_WRITE_TIMEOUT": "3"})
    pid = worker(svc)
    before = rss(pid)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        sock.sendall(ATTACK)
        # Connected and silent: the writer's sends block until the write timeout cuts it off.
        events = wait_for(ended(svc, "disconnect"), timeout=20)
        growth = rss(pid) - before
    print(f"events produced: {events}; worker peak RSS growth: {growth / 2**20:.1f} MiB")
    assert 0 < events < MAX_EVENTS
    assert growth < MAX_RSS_GROWTH
    assert requests.get(svc.url + "/healthz", timeout=5).status_code == 200


def test_a_worker_that_stops_stops_a_fast_generator(
    start_service: Callable[..., Service],
) -> None:
    # The client read 1 MB and then stopped reading (still connected) when the worker stops:
    # the generator must stop at once, not run on while the last write waits for the client.
    svc = start_service({"STREAM_WRITE_TIMEOUT": "3"})
    pid = worker(svc)
    before = rss(pid)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10) as sock:
        sock.sendall(ATTACK)
        read_at_least(sock, 1024 * 1024)
        stopping = ThreadPoolExecutor(1)
        stopped = stopping.submit(svc.stop, signal.SIGTERM, 20)
        events = wait_for(ended(svc, "shutdown"), timeout=20)
        growth = rss(pid) - before
    print(f"events produced: {events}; worker peak RSS growth: {growth / 2**20:.1f} MiB")
    assert 1000 <= events < MAX_EVENTS
    assert growth < MAX_RSS_GROWTH
    assert stopped.result(timeout=25) == 0
    stopping.shutdown()
