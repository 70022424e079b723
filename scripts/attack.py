"""Attack the real service and the clients the way a bad day in production would (issue 10).

    .venv/bin/python scripts/attack.py [--only NAME ...] [--scale small|full] [--list]

Starts what each attack needs itself, all on 127.0.0.1: ``gunicorn wsgi:app`` with gevent workers
on a free port (tests/service.py's ``Service``), a ``redis-server`` on another (tests/
redis_server.py's ``RedisServer``) and, with Redis, the Procfile's ``worker:`` when there is one.
Each attack is bounded in count, time (an alarm ends one that overruns) and memory (the worker is
killed above ``RSS_GUARD_MIB``), and adds rows to one table: what was tried, the figure measured,
what the contract (CONTRACT.md) expects, and ``held`` or ``FAILED``. The exit status is 1 when any
row failed. ``--scale small`` takes about 2 minutes on 2 cores, ``--scale full`` under 10.
The services' logs stay in the directory printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import requests
from attack_tools import (
    ROOT,
    LogTail,
    NdjsonReader,
    ProcfileWorker,
    RedisServer,
    RssWatch,
    Service,
    chunks,
    percentile,
    raw_request,
    service_env,
    wait_until,
)

#: a worker growing by more than this is killed: the attack has shown what it needed to
RSS_GUARD_MIB = 1536.0
#: growth of the worker's memory that counts as "bounded" for one attack (MiB)
RSS_BOUND_MIB = 256.0
#: events a stream may still produce after its client left or stopped reading (of 3,000,000)
EVENTS_BOUND = 100_000
#: the body limit of the service (CONTRACT: 1 MiB by default)
BODY_LIMIT = 1024 * 1024


@dataclass
class Row:
    """One line of the table."""

    attack: str
    tried: str
    measured: str
    expected: str
    held: bool


class AttackTimeout(Exception):
    """The attack overran its time budget (raised by the alarm in the main thread)."""


class Run:
    """What the attacks share: scale, a scratch directory, one redis-server, the services."""

    def __init__(self, scale: str) -> None:
        self.scale = scale
        self.tmp = Path(tempfile.mkdtemp(prefix="stream-attack-"))
        self._redis: RedisServer | None = None
        self._services: list[Service] = []
        self._workers: list[ProcfileWorker] = []

    def pick(self, full: Any, small: Any) -> Any:
        """The value for this run's scale."""
        return full if self.scale == "full" else small

    def redis(self) -> RedisServer:
        """The run's redis-server (started on first use)."""
        if self._redis is None:
            directory = self.tmp / "redis"
            directory.mkdir()
            self._redis = RedisServer(directory).start()
        return self._redis

    def service(self, *, redis: bool = False, **env: str) -> Service:
        """Start ``gunicorn wsgi:app`` (gevent workers, 127.0.0.1, a free port) with ``env``."""
        environment = service_env(**env)
        if redis:
            server = self.redis()
            # Each attack starts from an empty Redis: no logs or jobs left by the one before.
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
                conn.sendall(b"FLUSHALL\r\n")
                conn.recv(64)
            environment["REDIS_URL"] = server.url
            environment.setdefault("WEB_CONCURRENCY", "2")
            inherited = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PORT")}
            worker_env = {**inherited, **environment}
            log = self.tmp / f"procfile-worker-{len(self._workers)}.log"
            self._workers.append(ProcfileWorker(worker_env, log).start())
        svc = Service(self.tmp, environment).start(timeout=30)
        self._services.append(svc)
        return svc

    def stop_services(self) -> None:
        """Stop every service and Procfile worker started so far (bounded waits)."""
        while self._services:
            svc = self._services.pop()
            with contextlib.suppress(Exception):
                svc.stop(timeout=15)
        while self._workers:
            with contextlib.suppress(Exception):
                self._workers.pop().stop()

    def close(self) -> None:
        self.stop_services()
        if self._redis is not None:
            self._redis.stop()


def worker_pid(svc: Service) -> int:
    """The pid of the service's (first) worker, waiting for it to be up."""
    pids = wait_until(svc.worker_pids, 10)
    if not pids:
        raise RuntimeError("the service has no worker")
    return int(pids[0])


def publish(svc: Service, channel: str, value: Any, **headers: str) -> requests.Response:
    """POST one JSON value to a channel."""
    return requests.post(
        svc.url + f"/channels/{channel}",
        data=orjson.dumps(value),
        headers={"Content-Type": "application/json", **headers},
        timeout=30,
    )


def statuses(counts: dict[Any, int]) -> str:
    """``{201: 3, 500: 2}`` as "201 x3, 500 x2"."""
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=str)) or "none"


def mib(value: float) -> str:
    return f"{value:,.0f} MiB"


# -- 1. a client that leaves, a client that never reads --------------------------------------


def _read_and_leave(port: int, path: str, amount: int) -> int:
    """Read ``amount`` bytes of a response and close the connection; returns bytes read."""
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        while got < amount:
            piece = sock.recv(65536)
            if not piece:
                break
            got += len(piece)
    return got


def attack_leaving_reader(run: Run) -> list[Row]:
    """Issue item 1: a GET of 3,000,000 events of 1 KB whose client leaves or never reads."""
    rows = []
    path = "/events?count=3000000&interval=0&size=1000"
    clients = run.pick(3, 1)
    expected = f"each generator stops: <= {EVENTS_BOUND:,} events, RSS + <= {mib(RSS_BOUND_MIB)}"

    def is_events(name: str) -> bool:
        return "events" in name and "job" not in name and "channel" not in name

    svc = run.service(STREAM_WRITE_TIMEOUT="3")
    tail = LogTail(svc.log_path)
    with RssWatch(worker_pid(svc), RSS_GUARD_MIB) as watch:
        threads = [
            threading.Thread(target=_read_and_leave, args=(svc.port, path, 1 << 20), daemon=True)
            for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        wait_until(
            lambda: len(tail.stream_ends(is_events)) >= clients or watch.tripped,
            run.pick(60, 30),
        )
        time.sleep(0.5)  # RSS after the ends, not only before
    ends = tail.stream_ends(is_events)
    produced = max((events for _, _, events in ends), default=0)
    measured = (
        f"{len(ends)}/{clients} ended ({', '.join(f'{r} after {e:,}' for _, r, e in ends)}), "
        + watch.describe()
    )
    rows.append(
        Row(
            "1 leaving-reader",
            f"{clients} client(s) read 1 MB of GET {path} and close",
            measured,
            expected,
            len(ends) == clients
            and produced <= EVENTS_BOUND
            and not watch.tripped
            and watch.growth <= RSS_BOUND_MIB,
        )
    )
    run.stop_services()

    svc = run.service(STREAM_WRITE_TIMEOUT="3")
    tail = LogTail(svc.log_path)
    with RssWatch(worker_pid(svc), RSS_GUARD_MIB) as watch:
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", svc.port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            started = time.monotonic()
            wait_until(lambda: tail.stream_ends(is_events) or watch.tripped, run.pick(40, 25))
            waited = time.monotonic() - started
        finally:
            sock.close()
        time.sleep(0.5)
    ends = tail.stream_ends(is_events)
    produced = ends[0][2] if ends else 0
    measured = (
        f"{ends[0][1]} after {produced:,} events, {waited:.1f} s" if ends else "no end logged"
    ) + f", {watch.describe()}"
    rows.append(
        Row(
            "1 never-reads",
            f"GET {path}, never read, STREAM_WRITE_TIMEOUT=3",
            measured,
            f"cut off within ~3 s (<= 10 s); {expected}",
            bool(ends)
            and waited <= 10.0
            and produced <= EVENTS_BOUND
            and not watch.tripped
            and watch.growth <= RSS_BOUND_MIB,
        )
    )
    return rows


# -- 2. chunked bodies over the limit --------------------------------------------------------


def _values_after(svc: Service, channel: str, last_id: str, then: Any) -> list[Any]:
    """Every value of ``channel`` after ``last_id``, read until ``then`` (published now) arrives."""
    with NdjsonReader(svc.url + f"/channels/{channel}", {"Last-Event-ID": last_id}) as reader:
        publish(svc, channel, then)
        wait_until(lambda: any(i.get("data") == then for i in reader.items), 15)
        return [i.get("data") for i in reader.items if i.get("data") != then]


def attack_chunked_body(run: Run) -> list[Row]:
    """Issue item 2: NDJSON and JSON bodies over the 1 MiB limit, sent without Content-Length."""
    svc = run.service()
    channel = "attack-chunked"
    first = publish(svc, channel, {"marker": "before"}).json()["ids"][0]
    line = b'{"v":"' + b"x" * (1024 - 9) + b'"}\n'  # 1 KiB with its newline
    ndjson = raw_request(
        svc.port,
        "POST",
        f"/channels/{channel}",
        {"Content-Type": "application/x-ndjson"},
        chunks(line * (2 * BODY_LIMIT // len(line)), 16 * 1024),
        chunked=True,
    )
    leaked = _values_after(svc, channel, first, {"marker": "after"})
    item = b'"' + b"x" * 1020 + b'"'
    document = b"[" + b",".join([item] * (2 * BODY_LIMIT // len(item))) + b"]"
    single = raw_request(
        svc.port,
        "POST",
        f"/channels/{channel}",
        {"Content-Type": "application/json"},
        chunks(document, 16 * 1024),
        chunked=True,
    )
    ids = len((ndjson.json() or {}).get("ids", [])) if ndjson.status == 201 else 0
    return [
        Row(
            "2 chunked-ndjson",
            "chunked NDJSON publish: 2,048 lines of 1 KiB (2 MiB, limit 1 MiB)",
            f"{ndjson.describe()}"
            + (f" with {ids:,} ids" if ids else "")
            + f"; a resume from before it sees {len(leaked):,} of its values",
            "413, and nothing of it published (0 values)",
            ndjson.status == 413 and not leaked,
        ),
        Row(
            "2 chunked-json",
            "chunked JSON publish: one 2 MiB array",
            single.describe(),
            "413",
            single.status == 413,
        ),
    ]


# -- 3. one publish larger than the history and the subscriber's queue -----------------------


def _big_publish_one(run: Run, redis: bool) -> Row:
    from stream import Client

    count = 12_000
    svc = run.service(redis=redis)
    channel = f"attack-big-{'redis' if redis else 'memory'}"
    seen: list[tuple[str, Any]] = []
    failure: list[str] = []
    done = threading.Event()
    client = Client(svc.url, timeout=(5, 30))
    events = client.events(f"/channels/{channel}", reconnect=True)

    def follow() -> None:
        try:
            for event in events:
                data = orjson.loads(event.data) if event.event != "reset" else None
                seen.append((event.event, data))
                if isinstance(data, dict) and data.get("marker") == "end":
                    return
        except Exception as exc:  # noqa: BLE001 - a StreamReset is an answer too
            failure.append(type(exc).__name__)
        finally:
            done.set()

    threading.Thread(target=follow, daemon=True).start()
    # A second subscriber reads one connection without resuming, as curl would: its figure
    # shows what the server itself sent, before any resume of the client.
    raw = NdjsonReader(svc.url + f"/channels/{channel}", read_timeout=30).__enter__()

    def raw_values() -> int:
        return sum(1 for i in raw.items if isinstance(i.get("data"), dict) and "i" in i["data"])

    warm = 0

    def is_warm(data: Any) -> bool:
        return isinstance(data, dict) and data.get("marker") == "warm"

    def warmed() -> bool:
        nonlocal warm
        warm += 1
        publish(svc, channel, {"marker": "warm", "n": warm})
        return any(is_warm(d) for _, d in seen) and any(is_warm(i.get("data")) for i in raw.items)

    if not wait_until(warmed, 15, interval=0.2):
        raise RuntimeError("the subscribers never received a warm-up value")
    body = b"".join(b'{"i":%d}\n' % i for i in range(count))
    answer = requests.post(
        svc.url + f"/channels/{channel}",
        data=body,
        headers={"Content-Type": "application/x-ndjson"},
        timeout=60,
    )
    publish(svc, channel, {"marker": "end"})
    done.wait(run.pick(60, 30))
    events.close()
    wait_until(lambda: raw.ended.is_set() or raw.events("reset") or raw_values() >= count, 5)
    raw_state = "cut" if raw.ended.is_set() else "open"
    raw.close()
    values = sum(1 for kind, d in seen if kind == "message" and isinstance(d, dict) and "i" in d)
    resets = sum(1 for kind, _ in seen if kind == "reset") + failure.count("StreamReset")
    ended = "end marker seen" if seen and seen[-1][1] == {"marker": "end"} else "no end marker"
    other = [f for f in failure if f != "StreamReset"]
    return Row(
        f"3 big-publish {'redis' if redis else 'memory'}",
        f"one NDJSON publish of {count:,} values, a live subscriber (stream.Client), "
        + ("Redis" if redis else "in-process"),
        f"publish {answer.status_code}; subscriber got {values:,} values, {resets} reset(s), "
        f"{ended}"
        + (f", raised {', '.join(other)}" if other else "")
        + f" (one connection without resume: {raw_values():,} values, "
        f"{len(raw.events('reset'))} reset(s), {raw_state})",
        f"all {count:,} values or a reset (or a 4xx and none)",
        (answer.status_code == 201 and (values == count or resets > 0))
        or (400 <= answer.status_code < 500 and values == 0),
    )


def attack_big_publish(run: Run) -> list[Row]:
    """Issue item 3: a publish larger than the history and the queue, in process and on Redis."""
    rows = [_big_publish_one(run, redis=False)]
    run.stop_services()
    rows.append(_big_publish_one(run, redis=True))
    return rows


# -- 4. Redis out of memory -------------------------------------------------------------------


def _job_status(server: RedisServer, job_id: str) -> tuple[str, int]:
    """The job's status and its key's TTL, wherever in Redis the service keeps them."""
    import redis

    conn = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
    try:
        for key in conn.scan_iter(match=f"*{job_id}*", count=1000):
            kind = conn.type(key)
            text = b""
            if kind == b"string":
                text = conn.get(key) or b""
            elif kind == b"hash":
                text = b" ".join(v for v in conn.hgetall(key).values())
            if b"status" in text or kind == b"hash":
                status = "running" if b"running" in text or b"started" in text else "not running"
                return status, int(conn.ttl(key))
        return "gone (expired)", -2
    finally:
        conn.close()


def attack_redis_oom(run: Run) -> list[Row]:
    """Issue item 4: Redis refuses writes (maxmemory 1, noeviction) with a job running."""
    import redis

    server = run.redis()
    # A job waits this long for a failing broker before it gives up (shorter than the outage).
    give_up = 3
    svc = run.service(redis=True, STREAM_JOB_BROKER_TIMEOUT=str(give_up))
    conn = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
    job = requests.post(
        svc.url + "/jobs", json={"count": 100_000, "interval": 0.05, "size": 10}, timeout=10
    )
    job.raise_for_status()
    job_id = job.json()["id"]
    reader = NdjsonReader(svc.url + f"/jobs/{job_id}/events", read_timeout=60).__enter__()
    publishes: dict[str, int] = {}
    oom_window = run.pick(15.0, 12.0)

    def error_seen() -> float | None:
        """When the reader received an error event (monotonic time), None before."""
        for item, at in zip(list(reader.items), list(reader.times), strict=False):
            if isinstance(item, dict) and (item.get("event") == "error" or "error" in item):
                return at
        return None

    try:
        if not wait_until(lambda: reader.items, 15):
            raise RuntimeError(f"the job's reader got nothing: {reader.status} {reader.error}")
        conn.config_set("maxmemory-policy", "noeviction")
        conn.config_set("maxmemory", 1)
        oom_at = time.monotonic()
        for n in range(5):
            answer = publish(svc, "attack-oom", {"n": n})
            key = str(answer.status_code)
            if answer.status_code == 503 and "Retry-After" not in answer.headers:
                key += " without Retry-After"
            publishes[key] = publishes.get(key, 0) + 1
        health = requests.get(svc.url + "/healthz", timeout=10).status_code
        wait_until(lambda: error_seen() or reader.ended.is_set(), oom_window)
    finally:
        conn.config_set("maxmemory", 0)
    restored_at = time.monotonic()

    def lived_on() -> int:
        """Events of the job that reached the reader after the restore (it survived)."""
        return sum(1 for at in list(reader.times) if at > restored_at)

    wait_until(lambda: error_seen() or reader.ended.is_set() or lived_on(), run.pick(10.0, 5.0))
    error_at = error_seen()
    survived = lived_on()
    if error_at is not None:
        job_reader = f"reader got an error event {error_at - oom_at:.1f} s after the OOM"
    elif survived:
        job_reader = f"the job lived on: {survived} new events after the restore, no error"
    elif reader.ended.is_set():
        job_reader = f"the reader's stream ended without an error event ({reader.error or 'EOF'})"
    else:
        job_reader = f"no error event in {time.monotonic() - oom_at:.0f} s"
    reader.close()
    status, ttl = wait_until(
        lambda: (s := _job_status(server, job_id)) and (s[0] != "running" or s[1] > 0) and s,
        10,
    ) or _job_status(server, job_id)
    conn.close()
    stuck = status == "running" and ttl < 0
    return [
        Row(
            "4 redis-oom publish",
            "CONFIG SET maxmemory 1 (noeviction); 5 publishes, /healthz",
            f"publishes {statuses(publishes)}; /healthz {health}",
            "publishes 503 + Retry-After (never 500); /healthz 503",
            set(publishes) == {"503"} and health == 503,
        ),
        Row(
            "4 redis-oom job",
            f"the same for {oom_window:.0f} s, a job running, a reader following it, "
            f"STREAM_JOB_BROKER_TIMEOUT={give_up}",
            f"{job_reader}; job status {status}, TTL {ttl} s",
            "the job gives up: an error event for the reader; status not 'running' without expiry",
            error_at is not None and not stuck,
        ),
    ]


# -- 5. jobs: authorization and a bound -------------------------------------------------------


def attack_jobs(run: Run) -> list[Row]:
    """Issue item 5: POST /jobs without the token, then many 1 KB jobs at once."""
    token = "attack-token"
    svc = run.service(STREAM_PUBLISH_TOKEN=token)
    params = {"count": 10, "interval": 0, "size": 10}
    anonymous = requests.post(svc.url + "/jobs", json=params, timeout=10).status_code
    wrong = requests.post(
        svc.url + "/jobs", json=params, headers={"Authorization": "Bearer wrong"}, timeout=10
    ).status_code
    rows = [
        Row(
            "5 jobs-auth",
            "POST /jobs with STREAM_PUBLISH_TOKEN set: no Authorization, a wrong token",
            f"{anonymous}, {wrong}",
            "401, 401",
            anonymous == 401 and wrong == 401,
        )
    ]
    jobs = run.pick(300, 100)
    window = run.pick(20.0, 8.0)
    big = {"count": 10_000, "interval": 0.01, "size": 1000}
    answers: dict[str, int] = {}
    lock = threading.Lock()

    def post_jobs(n: int) -> None:
        with requests.Session() as session:
            for _ in range(n):
                try:
                    answer = session.post(
                        svc.url + "/jobs",
                        json=big,
                        headers={"Authorization": f"Bearer {token}"},
                        timeout=20,
                    )
                    key = str(answer.status_code)
                    if answer.status_code == 503 and "Retry-After" not in answer.headers:
                        key += " without Retry-After"
                except requests.RequestException as exc:
                    key = type(exc).__name__
                with lock:
                    answers[key] = answers.get(key, 0) + 1

    with RssWatch(worker_pid(svc), RSS_GUARD_MIB) as watch:
        posters = [
            threading.Thread(target=post_jobs, args=(jobs // 4,), daemon=True) for _ in range(4)
        ]
        for poster in posters:
            poster.start()
        for poster in posters:
            poster.join(60)
        time.sleep(window)
    measured = f"{statuses(answers)}; {watch.describe()} over {window:.0f} s"
    rows.append(
        Row(
            "5 jobs-bound",
            f"{jobs} jobs of 10,000 events of 1 KB (0.01 s apart) posted at once",
            measured,
            f"some 503 + Retry-After, nothing else but 202; RSS + <= {mib(2 * RSS_BOUND_MIB)}",
            set(answers) == {"202", "503"}
            and not watch.tripped
            and watch.growth <= 2 * RSS_BOUND_MIB,
        )
    )
    return rows


# -- 6. slow request bodies -------------------------------------------------------------------


def attack_slow_body(run: Run) -> list[Row]:
    """Issue item 6: many POSTs that send 2 bytes every 2 s; /healthz meanwhile."""
    import selectors

    body_timeout = 3.0
    count = run.pick(3000, 200)
    # The server's clock may start late for connections still in its accept queue: slack.
    bound = 2 * body_timeout + 4.0
    svc = run.service(STREAM_BODY_TIMEOUT=str(body_timeout))
    head = (
        b"POST /channels/attack-slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    answered: dict[socket.socket, tuple[float, bytes]] = {}
    health: list[float] = []
    health_failures: list[str] = []
    stop = threading.Event()

    def probe_health() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    session.get(svc.url + "/healthz", timeout=5).raise_for_status()
                    health.append(time.monotonic() - started)
                except requests.RequestException as exc:
                    health_failures.append(type(exc).__name__)
                stop.wait(0.25)

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    started = time.monotonic()
    deadline = started + bound + run.pick(30.0, 10.0)
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
            sock.sendall(head + b"{ ")
            sock.setblocking(False)
            opened[sock] = time.monotonic()
            selector.register(sock, selectors.EVENT_READ)
        next_drip = time.monotonic() + 2.0
        while len(answered) < count and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                answered[sock] = (time.monotonic() - opened[sock], data[:12])
                selector.unregister(sock)
            if time.monotonic() >= next_drip:
                next_drip += 2.0
                for sock in opened:
                    if sock not in answered:
                        with contextlib.suppress(OSError):
                            sock.send(b"  ")
    finally:
        stop.set()
        prober.join(10)
        for sock in opened:
            sock.close()
        selector.close()
    got_408 = [t for t, data in answered.values() if data.startswith(b"HTTP/1.1 408")]
    others = len(answered) - len(got_408)
    slowest = max(got_408, default=float("nan"))
    health_p99 = percentile(health, 0.99)
    health_max = max(health, default=float("nan"))
    return [
        Row(
            "6 slow-body",
            f"{count:,} POSTs sending 2 bytes every 2 s, STREAM_BODY_TIMEOUT=3",
            f"{len(got_408):,}/{count:,} got 408 (slowest {slowest:.1f} s), {others} other "
            f"answers, {count - len(answered):,} unanswered after "
            f"{time.monotonic() - started:.0f} s; /healthz p99 {health_p99 * 1000:.0f} ms, "
            f"max {health_max * 1000:.0f} ms, {len(health_failures)} failed",
            f"every one 408 within {bound:.0f} s; /healthz answers (max < 2 s)",
            len(got_408) == count and slowest <= bound and not health_failures and health_max < 2.0,
        )
    ]


# -- 7. relayed requests are not loopback -----------------------------------------------------


def attack_forwarded(run: Run) -> list[Row]:
    """Issue item 7: a publish from 127.0.0.1 that names another client address."""
    svc = run.service()
    tries = {
        "X-Forwarded-For": "8.8.8.8",
        "Forwarded": "for=8.8.8.8",
        "X-Real-IP": "8.8.8.8",
    }
    answers = {name: publish(svc, "attack-forwarded", {"n": 1}, **{name: value}).status_code
               for name, value in tries.items()}  # fmt: skip
    plain = publish(svc, "attack-forwarded", {"n": 0}).status_code
    job = requests.post(
        svc.url + "/jobs",
        json={"count": 1, "interval": 0},
        headers={"X-Forwarded-For": "8.8.8.8"},
        timeout=10,
    ).status_code
    measured = ", ".join(f"{name} {status}" for name, status in answers.items())
    return [
        Row(
            "7 forwarded",
            "publish from 127.0.0.1 naming 8.8.8.8 (no token); POST /jobs the same",
            f"{measured}; /jobs {job}; without the header {plain}",
            "403 each (201 without the header)",
            set(answers.values()) == {403} and job == 403 and plain == 201,
        )
    ]


# -- 8. a resume id ahead of the log ---------------------------------------------------------


def _resume_ahead_one(run: Run, redis: bool) -> Row:
    svc = run.service(redis=redis)
    channel = f"attack-ahead-{'redis' if redis else 'memory'}"
    publish(svc, channel, {"n": 0})  # the channel exists and has a log
    ahead = "9999999999999-0"
    patience = run.pick(8, 5)
    url = svc.url + f"/channels/{channel}"
    with NdjsonReader(url, {"Last-Event-ID": ahead}, read_timeout=20) as reader:
        if reader.status != 200:
            return Row(
                f"8 resume-ahead {'redis' if redis else 'memory'}",
                f"subscribe with Last-Event-ID: {ahead}, then publish",
                f"{reader.status}",
                "a reset (or a 4xx), then the new event",
                400 <= reader.status < 500,
            )
        n = 0

        def delivered() -> bool:
            nonlocal n
            n += 1
            publish(svc, channel, {"n": n})
            return any(i.get("event") == "message" for i in reader.items)

        wait_until(delivered, patience, interval=0.5)
        kinds = [i.get("event") for i in reader.items]
    reset_first = bool(kinds) and kinds[0] == "reset"
    values = kinds.count("message")
    return Row(
        f"8 resume-ahead {'redis' if redis else 'memory'}",
        f"subscribe with Last-Event-ID: {ahead}, then publish every 0.5 s until a value "
        f"arrives (<= {patience} s)",
        f"200; received {', '.join(kinds[:3]) or 'nothing'}"
        + (" ..." if len(kinds) > 3 else "")
        + f" ({values} values of {n} published)",
        "a reset (or a 4xx), then the new events",
        reset_first and values > 0,
    )


def attack_resume_ahead(run: Run) -> list[Row]:
    """Issue item 8: Last-Event-ID 9999999999999-0 (a replica whose clock is behind)."""
    rows = [_resume_ahead_one(run, redis=True)]
    run.stop_services()
    rows.append(_resume_ahead_one(run, redis=False))
    return rows


# -- 9. the clients against hostile servers ---------------------------------------------------


class StillRunning(Exception):
    """What ``_in_thread`` reports for a function still running at its deadline."""


def _in_thread(function: Callable[[], Any], timeout: float) -> tuple[Any, BaseException | None]:
    """Run ``function`` in a daemon thread for at most ``timeout`` s: (result, exception).

    A function still running at the deadline (a client asleep for 31 years) is left behind,
    a daemon that ends with the process, and reported as ``StillRunning``.
    """
    outcome: list[Any] = [None, StillRunning(f"still running after {timeout:.0f} s")]

    def target() -> None:
        try:
            outcome[:] = [function(), None]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome[:] = [None, exc]

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0], outcome[1]


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "no error"
    if isinstance(error, StillRunning):
        return str(error)
    return f"raised {type(error).__name__}"


def _consume(kind: str, base_url: str, path: str, mode: str, limit: int, **options: Any) -> Any:
    """Read ``path`` with the sync (``Client``) or async (``AsyncClient``) client: up to
    ``limit`` items of ``stream()`` or ``events()`` (``mode``); the client's errors propagate."""
    if kind == "sync":
        from stream import Client

        out: list[Any] = []
        with Client(base_url, **options) as client, getattr(client, mode)(path) as items:
            for item in items:
                out.append(item)
                if len(out) >= limit:
                    break
        return out

    async def consume() -> list[Any]:
        from stream.aio import AsyncClient

        out: list[Any] = []
        async with AsyncClient(base_url, **options) as client:
            async with getattr(client, mode)(path) as items:
                async for item in items:
                    out.append(item)
                    if len(out) >= limit:
                        break
        return out

    return asyncio.run(consume())


def _client_retry(kind: str, hint: int) -> Row:
    from tests.rawserver import SSE, Close, RawServer, Script

    cap = 2.0
    first = Script([b"retry: %d\nid: 1\ndata: {}\n\n" % hint, Close()], content_type=SSE)
    second = Script([b"id: 2\ndata: {}\n\n"], content_type=SSE)
    with RawServer([first, second]) as server:
        began = time.monotonic()
        _, error = _in_thread(
            lambda: _consume(
                kind, server.url, "/stream", "events", 2,
                backoff_max=cap, timeout=(5, 10), reconnect=True,
            ),
            cap + 3,
        )  # fmt: skip
        took = time.monotonic() - began
        reconnected = len(server.requests) >= 2
    return Row(
        f"9 client-retry {kind}",
        f"SSE server sends retry: {hint} then closes; backoff_max={cap:g}",
        (f"next attempt after {took:.1f} s" if reconnected else "no second attempt")
        + (f"; {_outcome(error)}" if error else ""),
        f"next attempt within the cap ({cap:g} s), no OverflowError",
        reconnected and error is None and took <= cap + 1.0,
    )


def _trickle_server(listener: socket.socket, stop: threading.Event) -> None:
    """Send a response one byte a second to whoever connects, until ``stop``."""
    listener.settimeout(0.1)
    response = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\r\n" + b"{}\n" * 20
    while not stop.is_set():
        try:
            sock, _ = listener.accept()
        except TimeoutError:
            continue
        with sock:
            with contextlib.suppress(OSError):
                sock.recv(65536)
                for byte in response:
                    if stop.wait(1.0):
                        break
                    sock.sendall(bytes([byte]))


def _client_trickle(kind: str) -> Row:
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        server = threading.Thread(target=_trickle_server, args=(listener, stop), daemon=True)
        server.start()
        began = time.monotonic()
        _, error = _in_thread(
            lambda: _consume(kind, url, "/events", "stream", 100, timeout=(2, 5), reconnect=False),
            12,
        )
        took = time.monotonic() - began
        stop.set()
        server.join(3)
    return Row(
        f"9 client-trickle {kind}",
        "server sends its response 1 byte/s; timeout=(2, 5)",
        f"{_outcome(error)} after {took:.1f} s"
        if not isinstance(error, StillRunning)
        else _outcome(error),
        "StreamTimeout within ~5 s (<= 10 s)",
        type(error).__name__ == "StreamTimeout" and took <= 10.0,
    )


def _client_utf8(kind: str) -> Row:
    from tests.rawserver import SSE, RawServer, Script

    with RawServer([Script([b'data: {"a": "\xff\xfe"}\n\n'], content_type=SSE)]) as server:
        values, error = _in_thread(
            lambda: _consume(kind, server.url, "/events", "stream", 10, reconnect=False), 10
        )
    return Row(
        f"9 client-utf8 {kind}",
        "SSE data with invalid UTF-8 (0xFF 0xFE)",
        _outcome(error) if error else f"delivered {values!r}",
        "DecodeError",
        type(error).__name__ == "DecodeError",
    )


def _client_redirect(kind: str) -> Row:
    from tests.rawserver import RawServer, Script

    with RawServer([Script([b'{"a":1}\n'], framing="length")]) as target:
        moved = f"http://localhost:{target.port}/moved"
        redirect = Script(
            [], status=302, content_type=None, framing="length", headers=[("Location", moved)]
        )
        with RawServer([redirect]) as origin:
            headers = {"X-Api-Key": "secret", "Authorization": "Bearer secret"}
            _, error = _in_thread(
                lambda: _consume(
                    kind, origin.url, "/start", "stream", 10, headers=headers, reconnect=False
                ),
                10,
            )
        sent = target.requests[0].headers if target.requests else {}
        carried = [name for name in ("x-api-key", "authorization") if name in sent]
    return Row(
        f"9 client-redirect {kind}",
        "302 from 127.0.0.1 to localhost (another host); X-Api-Key and Authorization set",
        (f"the other host got: {', '.join(carried) or 'neither'}" if target.requests
         else "not followed") + (f"; {_outcome(error)}" if error else ""),
        "neither header reaches the other host",
        bool(target.requests) and not carried,
    )  # fmt: skip


def attack_client(run: Run) -> list[Row]:
    """Issue item 9: retry hints, a trickling server, invalid UTF-8, a cross-host redirect."""
    checks: list[Callable[[], Row]] = []
    for kind in ("sync", "async"):
        checks += [functools.partial(_client_retry, kind, h) for h in (10**12, 10**20)]
        checks += [functools.partial(check, kind) for check in (_client_trickle, _client_utf8)]
        checks.append(functools.partial(_client_redirect, kind))
    # Each check has its own servers and bounds: run them side by side, not one after another.
    with concurrent.futures.ThreadPoolExecutor(len(checks)) as pool:
        return list(pool.map(lambda check: check(), checks, timeout=60))


# -- 10. one huge publish and everyone else's latency -----------------------------------------


def attack_publish_latency(run: Run) -> list[Row]:
    """Issue item 10: a 1 MiB NDJSON publish of 524,000 values on Redis; small ones meanwhile."""
    import redis

    svc = run.service(redis=True)
    server = run.redis()
    small: list[tuple[float, float, int]] = []  # (start, latency, status)
    pings: list[tuple[float, float]] = []
    stop = threading.Event()

    def publisher() -> None:
        # A new connection per publish: a kept-alive one would stay with the worker that parses
        # the big body, and measure that worker's CPU instead of Redis.
        n = 0
        while not stop.is_set():
            n += 1
            began = time.monotonic()
            try:
                status = requests.post(
                    svc.url + "/channels/attack-latency-small",
                    data=b'{"n":%d}' % n,
                    headers={"Content-Type": "application/json", "Connection": "close"},
                    timeout=30,
                ).status_code
            except requests.RequestException:
                status = 0
            small.append((began, time.monotonic() - began, status))
            stop.wait(0.01)

    def pinger() -> None:
        conn = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=30)
        with contextlib.closing(conn):
            while not stop.is_set():
                began = time.monotonic()
                conn.ping()
                pings.append((began, time.monotonic() - began))
                stop.wait(0.005)

    threads = [threading.Thread(target=publisher, daemon=True) for _ in range(2)]
    threads.append(threading.Thread(target=pinger, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    body = b"0\n" * 524_000
    began = time.monotonic()
    answer = requests.post(
        svc.url + "/channels/attack-latency-big",
        data=body,
        headers={"Content-Type": "application/x-ndjson"},
        timeout=120,
    )
    ended = time.monotonic()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(35)
    during = [lat for start, lat, _ in small if start <= ended and start + lat >= began]
    before = [lat for start, lat, _ in small if start + lat < began]
    failed = sum(1 for _, _, status in small if status != 201)
    stall = max((lat for start, lat in pings if start <= ended and start + lat >= began), default=0)
    p99 = percentile(during, 0.99)
    before_p99 = percentile(before, 0.99)
    return [
        Row(
            "10 publish-latency",
            f"one NDJSON publish of 524,000 values ({len(body):,} B) on Redis, "
            "small publishes every 10 ms from 2 clients",
            f"big publish {answer.status_code} in {ended - began:.2f} s; small publishes during "
            f"it: p99 {p99 * 1000:.0f} ms (n={len(during)}, before: {before_p99 * 1000:.0f} ms), "
            f"{failed} not 201; longest Redis PING {stall * 1000:.0f} ms",
            "small publishes p99 <= 500 ms; Redis never blocked > 250 ms",
            answer.status_code in (201, 413) and p99 <= 0.5 and stall <= 0.25 and not failed,
        )
    ]


# -- running ----------------------------------------------------------------------------------

#: name -> (attack, time budget in seconds at full scale, at small scale)
ATTACKS: dict[str, tuple[Callable[[Run], list[Row]], int, int]] = {
    "leaving-reader": (attack_leaving_reader, 150, 80),
    "chunked-body": (attack_chunked_body, 60, 40),
    "big-publish": (attack_big_publish, 150, 90),
    "redis-oom": (attack_redis_oom, 90, 90),
    "jobs": (attack_jobs, 150, 60),
    "slow-body": (attack_slow_body, 120, 60),
    "forwarded": (attack_forwarded, 40, 40),
    "resume-ahead": (attack_resume_ahead, 60, 60),
    "client": (attack_client, 180, 180),
    "publish-latency": (attack_publish_latency, 120, 120),
}


@contextlib.contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """Raise AttackTimeout in the main thread after ``seconds``."""

    def ring(signum: int, frame: Any) -> None:
        raise AttackTimeout(f"the attack overran its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_attack(run: Run, name: str) -> list[Row]:
    """One attack, its services stopped afterwards; an exception is a failed row."""
    function, full, small = ATTACKS[name]
    began = time.monotonic()
    try:
        with alarm(run.pick(full, small)):
            rows = function(run)
    except Exception as exc:  # noqa: BLE001 - an attack that breaks is reported, not fatal
        rows = [Row(name, "(the attack itself)", f"{type(exc).__name__}: {exc}"[:300], "", False)]
    finally:
        run.stop_services()
    print(f"# {name}: {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    for row in rows:
        print(f"#   {'held' if row.held else 'FAILED'}: {row.attack}: {row.measured}",
              file=sys.stderr, flush=True)  # fmt: skip
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (paste it into the README's reliability section)."""
    lines = [
        "| attack | tried | measured | contract expects | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        cells = [row.attack, row.tried, row.measured, row.expected]
        cells = [cell.replace("|", "\\|") for cell in cells]
        lines.append("| " + " | ".join(cells) + f" | {'held' if row.held else 'FAILED'} |")
    return "\n".join(lines)


def write_results(path: str, rows: list[Row], summary: str, args: argparse.Namespace) -> None:
    """The table as a Markdown page: when, on which commit, with which command."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    only = f" --only {' '.join(args.only)}" if args.only else ""
    command = f"scripts/attack.py --scale {args.scale}{only}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(path).write_text(
        "# Attacks on the service, and what held\n\n"
        f"Written by `{command} --write {path}` on {when}, commit {commit}, on a shared "
        f"{os.cpu_count()}-core machine. Every attack runs against gunicorn with gevent "
        "workers and redis-server on loopback; the README's reliability section says what "
        "each one tries.\n\n" + table(rows) + f"\n\n{summary}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(ATTACKS), metavar="NAME",
                        help=f"run only these attacks: {', '.join(ATTACKS)}")  # fmt: skip
    parser.add_argument("--scale", choices=("small", "full"), default="small")
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs when all held")
    parser.add_argument("--write", metavar="FILE",
                        help="also write the table, with the date and commit, to FILE "
                             "(the committed figures live in bench/ATTACKS.md)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.list:
        for name, (function, _, _) in ATTACKS.items():
            print(f"{name:16} {(function.__doc__ or '').strip()}")
        return 0
    run = Run(args.scale)
    began = time.monotonic()
    rows: list[Row] = []
    try:
        for name in args.only or list(ATTACKS):
            rows += run_attack(run, name)
    finally:
        run.close()
    failed = [row for row in rows if not row.held]
    summary = (
        f"{len(rows) - len(failed)} held, {len(failed)} FAILED; scale {args.scale}, "
        f"{time.monotonic() - began:.0f} s"
    )
    print(table(rows))
    print(f"\n{summary}")
    if args.write:
        write_results(args.write, rows, summary, args)
    if failed or args.keep_logs:
        print(f"logs: {run.tmp}")
    else:
        shutil.rmtree(run.tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
