"""End to end: streams that hold up (disconnects, slow consumers, shutdown, limits).

Each test starts its own service (gunicorn+gevent on loopback) so that signals and limits do not
disturb the others; every loop is bounded in count and time.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from collections.abc import Callable

import orjson
import pytest
import requests

from tests.job_worker import JobWorker, queue_env, start_worker
from tests.service import Service, wait_for

__all__ = ["start_worker"]  # the fixture

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def metrics(service: Service) -> dict[str, float]:
    return service.metrics()


def open_raw(service: Service, path: str, headers: str = "") -> socket.socket:
    """Send a GET on a raw socket and wait for the status line and first bytes."""
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n".encode())
    first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200"), first[:200]
    return sock


def test_thousand_dropped_streams_release_everything(
    start_service: Callable[..., Service],
) -> None:
    svc = start_service({"STREAM_HEARTBEAT": "1"})
    # Warm up (first requests allocate caches, greenlet pools), then take the baseline.
    for _ in range(20):
        open_raw(svc, "/events?count=100&interval=5").close()
    wait_for(lambda: metrics(svc)["stream_open_streams"] == 0, timeout=5)
    base = metrics(svc)
    rounds, per_round = 10, 100
    for _ in range(rounds):
        socks = [open_raw(svc, "/channels/drop?format=sse") for _ in range(per_round // 2)]
        socks += [open_raw(svc, "/events?count=1000&interval=5") for _ in range(per_round // 2)]
        for i, s in enumerate(socks):
            # Abrupt drops: half send RST (linger 0) instead of FIN.
            if i % 2:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
    start = time.monotonic()
    wait_for(lambda: metrics(svc)["stream_open_streams"] == 0, timeout=1 + 3)
    released = time.monotonic() - start
    after = wait_for(
        lambda: (
            (m := metrics(svc))["process_open_fds"] <= base["process_open_fds"]
            and m["stream_greenlets"] <= base["stream_greenlets"]
            and m
        ),
        timeout=5,
    )
    assert (
        after["stream_disconnects_total"] - base["stream_disconnects_total"] == rounds * per_round
    )
    print(f"1000 dropped streams released {released:.2f} s after the last drop")


def test_sigterm_with_hundred_open_streams_ends_each_cleanly(
    start_service: Callable[..., Service],
) -> None:
    svc = start_service({"GRACEFUL_TIMEOUT": "10"})
    results: list[bytes] = []
    lock = threading.Lock()
    ready = threading.Barrier(101, timeout=30)

    def reader(fmt: str) -> None:
        with requests.get(
            svc.url + f"/channels/shutdown?format={fmt}", stream=True, timeout=(5, 30)
        ) as resp:
            body = resp.raw.read1(65536)
            ready.wait()
            # Read to the end: a proper end of the chunked body, or an error if it is cut.
            try:
                while chunk := resp.raw.read1(65536):
                    body += chunk
                outcome = b"clean:" + body
            except Exception as exc:  # noqa: BLE001 - any cut is a failure reported below
                outcome = b"cut:" + repr(exc).encode()
        with lock:
            results.append(outcome)

    threads = [
        threading.Thread(target=reader, args=("sse" if i % 2 else "ndjson",)) for i in range(100)
    ]
    for t in threads:
        t.start()
    ready.wait()
    assert metrics(svc)["stream_open_streams"] == 100
    start = time.monotonic()
    code = svc.stop(signal.SIGTERM, timeout=10 + 5)
    elapsed = time.monotonic() - start
    for t in threads:
        t.join(10)
    assert code == 0
    assert elapsed < 10 + 5
    assert len(results) == 100
    assert all(r.startswith(b"clean:") for r in results), [r for r in results if r[:4] == b"cut:"]
    sse = [r for r in results if b":\n" in r and b"retry:" in r]
    assert len(sse) == 50  # every SSE client got the reconnection hint first
    assert "ended 100 open streams" in svc.log()
    print(f"SIGTERM with 100 open streams: master exited in {elapsed:.2f} s")


def test_stalled_subscriber_is_cut_off_and_others_get_everything(
    start_service: Callable[..., Service],
) -> None:
    # A short history, so that what the log retains does not hide what the subscribers hold.
    svc = start_service(
        {"STREAM_QUEUE_SIZE": "500", "STREAM_WRITE_TIMEOUT": "3", "STREAM_HISTORY_LENGTH": "100"}
    )
    # The stalled client: a tiny receive buffer, and it never reads after the headers.
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", svc.port))
    stalled.sendall(b"GET /channels/big HTTP/1.1\r\nHost: t\r\n\r\n")
    assert stalled.recv(1024).startswith(b"HTTP/1.1 200")

    received: list[int] = []
    done = threading.Event()

    def good_reader() -> None:
        tail = b""
        with requests.get(svc.url + "/channels/big", stream=True, timeout=(5, 30)) as resp:
            while not done.is_set():
                chunk = resp.raw.read1(1 << 20)
                if not chunk:
                    break
                *lines, tail = (tail + chunk).split(b"\n")
                for line in lines:
                    if line:
                        received.append(orjson.loads(line)["data"]["n"])
                if len(received) >= total:
                    return

    pad = "x" * 10_000
    per_request, total = 20, 2000  # 2,000 events of 10 KB: 20 MB
    t = threading.Thread(target=good_reader)
    t.start()
    wait_for(lambda: metrics(svc)["stream_open_streams"] == 2, timeout=5)
    worker = svc.worker_pids()[0]
    rss_before = _rss(worker)
    rss_peak = rss_half = rss_before
    for start in range(0, total, per_request):
        if start == total // 2:
            rss_half = rss_peak
        body = b"\n".join(
            orjson.dumps({"n": n, "pad": pad}) for n in range(start, start + per_request)
        )
        resp = requests.post(
            svc.url + "/channels/big",
            data=body,
            headers={"Content-Type": "application/x-ndjson"},
            timeout=10,
        )
        assert resp.status_code == 201
        rss_peak = max(rss_peak, _rss(worker))
    t.join(60)
    done.set()
    assert received == list(range(total))
    m = wait_for(lambda: (m := metrics(svc))["stream_slow_consumer_drops_total"] >= 1 and m, 10)
    assert m["stream_slow_consumer_drops_total"] == 1
    growth = (rss_peak - rss_before) / 1e6
    late_growth = (rss_peak - rss_half) / 1e6
    print(
        f"stalled subscriber: worker RSS grew {growth:.1f} MB while 20 MB was published "
        f"({late_growth:.1f} MB during the second 10 MB)"
    )
    # Bounded: the stalled subscriber holds at most its queue (500 x 10 KB) and one write
    # buffer; what it misses is not kept for it, so the second half adds next to nothing.
    assert growth < 15, f"worker RSS grew {growth:.1f} MB"
    assert late_growth < 4, f"worker RSS grew {late_growth:.1f} MB in the second half"
    stalled.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_too_many_streams_get_503_with_retry_after(start_service: Callable[..., Service]) -> None:
    svc = start_service({"STREAM_MAX_STREAMS": "3"})
    socks = [open_raw(svc, "/channels/full") for _ in range(3)]
    resp = requests.get(svc.url + "/channels/full", timeout=5)
    assert resp.status_code == 503
    assert resp.headers["Retry-After"]
    assert resp.json()["error"]["code"] == "too_many_streams"
    for s in socks:
        s.close()
    wait_for(lambda: requests.get(svc.url + "/events?interval=0", timeout=5).status_code == 200)


def test_max_lifetime_ends_streams_and_clients_resume(
    start_service: Callable[..., Service],
) -> None:
    svc = start_service({"STREAM_MAX_LIFETIME": "1"})
    start = time.monotonic()
    resp = requests.get(svc.url + "/channels/life", timeout=10)
    assert resp.status_code == 200
    assert 0.9 < time.monotonic() - start < 5


def test_a_web_shutdown_leaves_a_job_in_flight_running(
    start_service: Callable[..., Service],
    start_worker: Callable[[dict[str, str]], JobWorker],
    redis_url: str,
) -> None:
    from stream import Client

    env = queue_env(redis_url, WEB_CONCURRENCY="1")
    svc = start_service(env)
    start_worker(env)
    job = requests.post(svc.url + "/jobs", json={"count": 30, "interval": 0.1}, timeout=5).json()
    with Client(svc.url) as client, client.stream(job["events_url"]) as events:
        assert next(iter(events))["event_id"] == 0
    assert svc.stop(signal.SIGTERM, timeout=15) == 0
    # The job runs in the worker: the web's shutdown did not interrupt it.
    import redis

    r = redis.Redis.from_url(redis_url)
    meta = orjson.loads(r.get(f"stream:meta:job:{job['id']}") or b"null")
    assert meta["status"] in ("running", "done"), meta
    # Another web service on the same Redis reads all of it, then its end.
    other = start_service(env)
    with Client(other.url) as client:
        seen = [value["event_id"] for value in client.stream(job["events_url"])]
    assert seen == list(range(30))
