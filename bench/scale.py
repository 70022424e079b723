"""Scenarios at scale: many open streams, big fan-outs, publishers during the fan-out.

- ``open_streams`` (scenario 6): 5,000 and 10,000 slow streams on ONE worker, against the seed's
  async peer (FastAPI on uvicorn), both measured in the same run: lag p50/p99, memory per open
  stream, the time to open them all.
- ``fanout_scale`` (scenario 7): 10,000 subscribers of one channel, in process (one worker)
  and on Redis with one, two and four workers, against an async fan-out peer
  (bench/peers/fanout_asgi.py on uvicorn): publish-to-delivery lag, what was lost, the
  publisher's response time (the fan-out's own POSTs, and a probe POSTing to another channel
  every 20 ms throughout).

The load generators are several bench/loadclient.py processes (the subscribers split evenly),
so that one client process is not what limits the figures; their CPU is reported. Everything
is bounded in time: each load generator has a timeout, each server a start timeout.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench import servers
from bench.common import (
    PY,
    ROOT,
    Server,
    children,
    cpu_seconds,
    median,
    percentile,
    rss_kib,
    run_delay_seconds,
)
from bench.report import Goal, Section, ms

#: load generator processes: the machine has 2 cores, the servers need them too
LOAD_PROCS = 2


def _pids(server: Server) -> list[int]:
    """Every process that serves requests (gunicorn's workers, or the server itself)."""
    assert server.proc is not None
    if not server.forks_worker:
        return [server.proc.pid]
    server.worker_pid()  # waits until every worker is up
    return sorted(children(server.proc.pid))


def spread_load(
    server: Server,
    path: str,
    conns: int,
    expect: int,
    *,
    timeout: float,
    no_end: bool = False,
    procs: int = LOAD_PROCS,
    on_ready: Callable[[], None] | None = None,
    connect_concurrency: int = 128,
) -> dict[str, Any]:
    """``conns`` streams from ``procs`` load generators; merged lags, RSS, CPU of both sides."""
    pids = _pids(server)
    idle = sum(rss_kib(p) for p in pids)
    peak = idle
    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    shares = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    clients = []
    for i, share in enumerate(shares):
        argv = [PY, "-m", "bench.loadclient", server.url + path, "--conns", str(share)]
        argv += ["--expect", str(expect), "--timeout", str(timeout), "--dump", str(tmp / f"{i}")]
        argv += ["--connect-concurrency", str(max(1, connect_concurrency // procs))]
        if no_end:
            # Subscriptions never end: every client stays until the others are served too.
            argv += ["--no-end", "--linger", "5"]
        clients.append(subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    done = threading.Event()
    ready = threading.Barrier(procs + 1)
    results: list[dict[str, Any]] = [{} for _ in clients]
    started = time.monotonic()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, sum(rss_kib(p) for p in pids))
            except (OSError, RuntimeError):
                return
            done.wait(0.1)

    def read(index: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        announced = False
        for line in proc.stdout:
            if line.strip() == "READY" and not announced:
                announced = True
                try:
                    ready.wait(timeout)
                except threading.BrokenBarrierError:
                    pass
            elif line.startswith("{"):
                results[index] = json.loads(line)
        if not announced:  # never got every header: do not hold the others forever
            ready.abort()

    threads = [threading.Thread(target=sample, daemon=True)]
    threads += [
        threading.Thread(target=read, args=(i, c), daemon=True) for i, c in enumerate(clients)
    ]
    for t in threads:
        t.start()
    ready_at: tuple[float, float] | None = None
    try:
        try:
            ready.wait(timeout)
            ready_at = (
                time.monotonic(),
                sum(cpu_seconds(p) for p in pids),
                sum(run_delay_seconds(p) for p in pids),
            )
            if on_ready is not None:
                on_ready()
        except threading.BrokenBarrierError:
            pass
        for c in clients:
            c.wait(timeout + 30)
        server_cpu_end = sum(cpu_seconds(p) for p in pids)
        server_wait_end = sum(run_delay_seconds(p) for p in pids)
    finally:
        done.set()
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        for t in threads:
            t.join(10)
    lags: list[float] = []
    for i in range(procs):
        try:
            lags += json.loads((tmp / f"{i}").read_text())
        except (OSError, ValueError):
            pass
        (tmp / f"{i}").unlink(missing_ok=True)
    tmp.rmdir()
    lags.sort()
    wall = time.monotonic() - started
    out: dict[str, Any] = {
        "conns": conns,
        "completed": sum(r.get("completed", 0) for r in results),
        "outcomes": [r.get("outcomes") for r in results],
        "events": len(lags),
        "lag_p50_ms": percentile(lags, 0.50),
        "lag_p99_ms": percentile(lags, 0.99),
        "lag_max_ms": lags[-1] if lags else math.nan,
        "ramp_seconds": max((r.get("ramp_seconds", math.nan) for r in results), default=math.nan),
        "idle_kib": idle,
        "peak_kib": peak,
        "kib_per_stream": (peak - idle) / conns,
        "load_cpu_seconds": [r.get("cpu_seconds", math.nan) for r in results],
        "wall_seconds": wall,
    }
    if os.environ.get("BENCH_KEEP_LAGS"):  # for a closer look at one run's distribution
        out["lags"] = lags
    if ready_at is not None:
        span = max(1e-9, time.monotonic() - ready_at[0])
        out["server_cpu_after_open"] = (server_cpu_end - ready_at[1]) / span
        # Runnable but not running: the workers waited for a CPU (more processes than cores).
        out["server_run_wait_after_open"] = (server_wait_end - ready_at[2]) / span
    # A load generator's CPU as a share of one core while the events flowed (all open to the
    # last one served): under 100% it waited for the server at times.
    out["load_cpu_share"] = [r.get("busy_cpu_share", math.nan) for r in results]
    return out


# -- scenario 6: many open slow streams on one worker ----------------------------------------


def open_streams(cfg: Any) -> tuple[Section, list[Goal], dict[str, Any]]:
    counts = [5000] if cfg.quick else [5000, 10_000]
    events = 10 if cfg.quick else 15
    peers: list[tuple[str, Callable[[], Server]]] = [
        ("project", servers.project_bench),
        ("seed", servers.seed),
    ]
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for n in counts:
        raw[str(n)] = {name: [] for name, _ in peers}
        for rep in range(cfg.reps):
            for name, factory in peers:
                with factory() as server:
                    r = spread_load(
                        server,
                        f"/stamped?count={events}&interval=1",
                        n,
                        events,
                        timeout=events + 120,
                        connect_concurrency=256,
                    )
                raw[str(n)][name].append(r)
                print(
                    f"  [6] {n} streams run {rep + 1}: {name}: {r['completed']}/{n}, p99 "
                    f"{r['lag_p99_ms']:.1f} ms, {r['kib_per_stream']:.1f} KiB/stream, open in "
                    f"{r['ramp_seconds']:.1f} s, load CPU "
                    f"{', '.join(f'{100 * s:.0f}%' for s in r['load_cpu_share'])}",
                    flush=True,
                )
    section = Section(
        "6. Open slow streams on ONE worker, against the async peer",
        [
            "streams",
            "server",
            "complete (per run)",
            "lag p50 ms",
            "lag p99 ms",
            "p99 / peer's",
            "KiB per open stream",
            "s to open all",
            "server CPU once open",
            "load generators' CPU",
        ],
        notes=[
            f"Each stream: {events} events 1 s apart (`/stamped?count={events}&interval=1`), "
            "every event carrying the server's `time.time()`; lag = arrival minus it, every "
            "event counted (those sent while thousands of connections were still arriving "
            f"included). Clients: {LOAD_PROCS} bench/loadclient.py processes (asyncio + uvloop, "
            "raw sockets), the streams split evenly, at most 256 connects in flight in all. "
            "project = `stream_response` in bench/peers/project_bench.py under the repository's "
            "gunicorn.conf.py (gevent, one worker); peer = the seed's FastAPI "
            "`StreamingResponse` on uvicorn (uvloop, httptools). A fresh server per run. Memory: "
            "peak VmRSS minus idle VmRSS, divided by the streams. Load generators' CPU: each "
            "process's CPU from all streams open to the last one served (100% = one core; "
            "below it, it waited for the server).",
        ],
    )
    goals: list[Goal] = []
    for n in counts:
        per_run_ratio = [
            p["lag_p99_ms"] / max(1e-9, s["lag_p99_ms"])
            for p, s in zip(raw[str(n)]["project"], raw[str(n)]["seed"], strict=True)
        ]
        for name, _ in peers:
            rs = raw[str(n)][name]
            section.rows.append(
                [
                    f"{n:,}",
                    name,
                    ", ".join(f"{r['completed']}/{n}" for r in rs),
                    ms(median([r["lag_p50_ms"] for r in rs])),
                    ms(median([r["lag_p99_ms"] for r in rs])),
                    f"{median(per_run_ratio):.2f}" if name == "project" else "1",
                    f"{median([r['kib_per_stream'] for r in rs]):.1f}",
                    f"{median([r['ramp_seconds'] for r in rs]):.1f}",
                    f"{100 * median([r.get('server_cpu_after_open', math.nan) for r in rs]):.0f}%",
                    " / ".join(
                        f"{100 * median([r['load_cpu_share'][i] for r in rs]):.0f}%"
                        for i in range(LOAD_PROCS)
                    ),
                ]
            )
        if n == 5000:
            rs = raw[str(n)]["project"]
            p99 = median([r["lag_p99_ms"] for r in rs])
            peer99 = median([r["lag_p99_ms"] for r in raw[str(n)]["seed"]])
            kb = median([r["kib_per_stream"] for r in rs]) * 1.024
            goals += [
                Goal(
                    "5,000 slow streams, one worker: all complete",
                    "all, every run",
                    ", ".join(f"{r['completed']}/{n}" for r in rs),
                    all(r["completed"] == n for r in rs),
                ),
                Goal(
                    "5,000 slow streams: lag p99 (ramp included) at most the async peer's "
                    "and at most 100 ms",
                    "<= peer, <= 100 ms",
                    f"{ms(p99)} ms (peer {ms(peer99)} ms; per-run ratio "
                    f"{median(per_run_ratio):.2f})",
                    p99 <= 100 and median(per_run_ratio) <= 1.0,
                ),
                Goal(
                    "5,000 slow streams: memory per open stream",
                    "<= 25 KB",
                    f"{kb:.1f} KB",
                    kb <= 25,
                ),
            ]
    return section, goals, raw


# -- scenario 7: fan-out to 10,000 subscribers -------------------------------------------------


def _project(name: str, workers: int, redis_url: str | None, max_streams: int) -> Server:
    env = {
        "STREAM_HEARTBEAT": "15",
        "WEB_CONCURRENCY": str(workers),
        "STREAM_MAX_STREAMS": str(max_streams),
    }
    if redis_url is not None:
        env["REDIS_URL"] = redis_url
    return Server(
        name,
        lambda p: [PY, "-m", "gunicorn", "wsgi:app", "--bind", f"127.0.0.1:{p}"],
        env=env,
        forks_worker=True,
        workers=workers,
    )


def _fanout_peer() -> Server:
    return Server(
        "fanout-asgi",
        lambda p: [
            PY,
            "-m",
            "uvicorn",
            "bench.peers.fanout_asgi:app",
            *servers.UVICORN,
            "--port",
            str(p),
        ],
    )


def _post_timed(session: Any, url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    r = session.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=10)
    elapsed = (time.perf_counter() - t0) * 1000.0
    r.raise_for_status()
    return elapsed


def fanout_run(server: Server, subs: int, events: int, rate: float, label: str) -> dict[str, Any]:
    """One run: ``subs`` subscribers, ``events`` publishes at ``rate``/s, a probe publisher."""
    import requests

    channel = f"scale-{os.getpid()}-{label}-{time.monotonic_ns()}"
    publish_ms: list[float] = []
    probe_ms: list[float] = []
    stop_probe = threading.Event()
    failures: list[str] = []

    def publish_all() -> None:
        session = requests.Session()
        period = 1.0 / rate
        next_at = time.perf_counter()
        try:
            for i in range(events):
                body = orjson.dumps({"i": i, "t": time.time()})
                publish_ms.append(_post_timed(session, f"{server.url}/channels/{channel}", body))
                next_at += period
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
        except Exception as exc:  # noqa: BLE001 - reported with the run's figures
            failures.append(repr(exc))
        finally:
            stop_probe.set()

    def probe() -> None:
        # Another channel, nobody subscribed: what any publisher waits while the fan-out runs.
        session = requests.Session()
        url = f"{server.url}/channels/{channel}-probe"
        while not stop_probe.wait(0.02):
            try:
                probe_ms.append(_post_timed(session, url, b'{"probe":true}'))
            except Exception as exc:  # noqa: BLE001
                failures.append(repr(exc))
                return

    threads = [threading.Thread(target=publish_all), threading.Thread(target=probe)]
    result = spread_load(
        server,
        f"/channels/{channel}",
        subs,
        events,
        timeout=events / rate + 90,  # (the load generators linger 5 s within it)
        no_end=True,
        on_ready=lambda: [t.start() for t in threads],
        connect_concurrency=128,
    )
    for t in threads:
        if t.ident is not None:
            t.join(60)
    result["publish_p50_ms"] = percentile(publish_ms, 0.5)
    result["publish_p99_ms"] = percentile(publish_ms, 0.99)
    result["probe_p50_ms"] = percentile(probe_ms, 0.5)
    result["probe_p99_ms"] = percentile(probe_ms, 0.99)
    result["probe_count"] = len(probe_ms)
    result["publish_ms"] = publish_ms
    result["failures"] = failures
    result["expected_events"] = subs * events
    return result


def fanout_scale(cfg: Any) -> tuple[Section, list[Goal], dict[str, Any]]:
    subs = 2000 if cfg.quick else 10_000
    events, rate = (10, 1.0) if cfg.quick else (15, 1.0)
    runs: dict[str, list[dict[str, Any]]] = {}
    order = ["peer", "memory", "redis1", "redis2", "redis4"]
    labels = {
        "peer": "async peer (Starlette on uvicorn, 1 process)",
        "memory": "project, in-process broker, 1 worker",
        "redis1": "project, Redis, 1 worker",
        "redis2": "project, Redis, 2 workers",
        "redis4": "project, Redis, 4 workers",
    }

    def record(key: str, server: Server) -> None:
        for rep in range(cfg.reps):
            r = fanout_run(server, subs, events, rate, key)
            runs.setdefault(key, []).append(r)
            print(
                f"  [7] {key} run {rep + 1}: {r['events']}/{r['expected_events']} delivered, "
                f"p50 {r['lag_p50_ms']:.1f} ms, p99 {r['lag_p99_ms']:.1f} ms; publish p50/p99 "
                f"{r['publish_p50_ms']:.1f}/{r['publish_p99_ms']:.1f} ms, probe "
                f"{r['probe_p50_ms']:.1f}/{r['probe_p99_ms']:.1f} ms; load CPU "
                f"{', '.join(f'{100 * s:.0f}%' for s in r['load_cpu_share'])}"
                + (f"; failures {r['failures'][:2]}" if r["failures"] else ""),
                flush=True,
            )

    max_streams = subs + 2000
    with _fanout_peer() as server:
        record("peer", server)
    with _project("scale-memory", 1, None, max_streams) as server:
        record("memory", server)
    with servers.redis_server() as redis_url:
        for workers in (1, 2, 4):
            with _project(f"scale-redis{workers}", workers, redis_url, max_streams) as server:
                record(f"redis{workers}", server)
    section = Section(
        f"7. Fan-out to {subs:,} subscribers, and the publishers meanwhile",
        [
            "server",
            "delivered / expected (per run)",
            "lag p50 ms",
            "lag p99 ms",
            "p99 / peer's",
            "publish p50 / p99 ms",
            "probe publish p50 / p99 ms",
            "server CPU",
            "server's wait for a CPU",
            "load generators' CPU",
        ],
        notes=[
            f"{subs:,} NDJSON subscribers of one channel (`GET /channels/<name>`) from "
            f"{LOAD_PROCS} bench/loadclient.py processes; once all are open, {events} events "
            f"published one per `POST /channels/<name>` at {rate:g}/s, each carrying the "
            "publisher's `time.time()`; lag = arrival minus that. *publish*: the response time "
            "of those POSTs; *probe*: a second publisher POSTing to another channel (no "
            "subscriber) every 20 ms throughout, i.e. what any publisher waits while a fan-out "
            "runs. Redis: a local redis-server (no persistence), `REDIS_URL` set, subscribers "
            "spread over the workers by the kernel's accept. Server CPU: all workers together, "
            "from all-open to the end (100% = one core); server's wait for a CPU: the time the "
            "workers were runnable but no core was free, over the same span (the kernel's "
            "run-queue delay, /proc/<pid>/schedstat; 100% = one process waiting throughout): "
            "what more processes than cores cost, in a publisher's wait too; load generators' "
            "CPU: each process's CPU from all open to the last event served (100% = one core). "
            "The async peer "
            "keeps no log and no "
            "ids (bench/peers/fanout_asgi.py): a lower bound of the work, not a like-for-like "
            "service.",
        ],
    )
    peer = runs["peer"]
    for key in order:
        rs = runs[key]
        ratios = [
            r["lag_p99_ms"] / max(1e-9, p["lag_p99_ms"]) for r, p in zip(rs, peer, strict=True)
        ]
        section.rows.append(
            [
                labels[key],
                ", ".join(f"{r['events']}/{r['expected_events']}" for r in rs),
                ms(median([r["lag_p50_ms"] for r in rs])),
                ms(median([r["lag_p99_ms"] for r in rs])),
                "1" if key == "peer" else f"{median(ratios):.2f}",
                f"{ms(median([r['publish_p50_ms'] for r in rs]))} / "
                f"{ms(median([r['publish_p99_ms'] for r in rs]))}",
                f"{ms(median([r['probe_p50_ms'] for r in rs]))} / "
                f"{ms(median([r['probe_p99_ms'] for r in rs]))}",
                f"{100 * median([r.get('server_cpu_after_open', math.nan) for r in rs]):.0f}%",
                f"{100 * median([r.get('server_run_wait_after_open', math.nan) for r in rs]):.0f}%",
                " / ".join(
                    f"{100 * median([r['load_cpu_share'][i] for r in rs]):.0f}%"
                    for i in range(LOAD_PROCS)
                ),
            ]
        )
    r2, r1 = runs["redis2"], runs["redis1"]
    p99_2 = median([r["lag_p99_ms"] for r in r2])
    p99_1 = median([r["lag_p99_ms"] for r in r1])
    lost = [r["expected_events"] - r["events"] for r in r2]
    project = [r for key in order[1:] for r in runs[key]]
    pub99 = max(max(r["publish_p99_ms"], r["probe_p99_ms"]) for r in project)
    worst_per_row = ", ".join(
        f"{labels[key].removeprefix('project, ')} "
        f"{ms(max(max(r['publish_p99_ms'], r['probe_p99_ms']) for r in runs[key]))}"
        for key in order[1:]
    )
    goals = [
        Goal(
            f"Fan-out to {subs:,}, Redis, 2 workers: nothing lost",
            "0 lost, every run",
            ", ".join(str(n) for n in lost),
            all(n == 0 for n in lost),
        ),
        Goal(
            f"Fan-out to {subs:,}, Redis, 2 workers: lag p99",
            "<= 500 ms",
            f"{ms(p99_2)} ms",
            p99_2 <= 500,
        ),
        Goal(
            f"Fan-out to {subs:,}, Redis: two workers faster than one",
            "p99 (2 workers) < p99 (1 worker)",
            f"{ms(p99_2)} ms against {ms(p99_1)} ms",
            p99_2 < p99_1,
        ),
        Goal(
            "A publish answered during the fan-out (every project row, fan-out POSTs and probe)",
            "p99 <= 20 ms",
            f"worst p99 {ms(pub99)} ms (worst per row, ms: {worst_per_row})",
            pub99 <= 20,
        ),
    ]
    return section, goals, {"runs": runs}
