"""The scenarios. Each returns a report Section and the goals it measures.

Every figure is the median over ``cfg.reps`` runs; every ratio is the median of the per-run
ratios, both sides measured in the same run (interleaved, same servers, same machine state).
"""

from __future__ import annotations

import codecs
import gc
import json
import math
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from bench import servers
from bench.common import (
    PY,
    ROOT,
    Server,
    bench_cert,
    cpu_seconds,
    median,
    percentile,
    rss_kib,
    wait_for,
)
from bench.peers import SEED_MESSAGES
from bench.report import Goal, Section, ms, rate, ratio


@dataclass
class Config:
    quick: bool
    reps: int
    n_project: int  # events per stream for this project (scenario 1)
    n_peer: int  # for the seed and the naive Flask peer
    n_sse_peer: int  # for FastAPI's SSE (about 10k events/s here: 1M would take minutes)
    latency_events: int  # per run, 25 ms apart
    conns: int  # concurrent slow streams
    slow_count: int  # events per slow stream, 1 s apart
    decode_n: int
    fanout_subs: int
    fanout_events: int
    fanout_rate: float  # publishes per second

    @classmethod
    def make(cls, quick: bool, reps: int) -> Config:
        if quick:
            return cls(True, reps, 200_000, 50_000, 10_000, 40, 5000, 10, 300_000, 1000, 60, 50.0)
        return cls(
            False, reps, 1_000_000, 200_000, 40_000, 400, 5000, 15, 1_000_000, 1000, 200, 50.0
        )


def _events(n: int) -> list[dict[str, Any]]:
    last = n - 1
    return [
        {"event_id": i, "data": SEED_MESSAGES[i % 4], "is_last_event": i == last} for i in range(n)
    ]


def ndjson_bytes(n: int) -> bytes:
    return b"".join(orjson.dumps(e, option=orjson.OPT_APPEND_NEWLINE) for e in _events(n))


def sse_bytes(n: int) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in _events(n))


# -- measuring one transfer -------------------------------------------------------------------


def curl_rate(url: str, n: int) -> float:
    """Events/s of ``curl -sN URL > /dev/null``, timed by curl over the whole transfer (``-k``:
    the TLS rows' certificate is self-signed)."""
    r = subprocess.run(
        [
            "curl",
            "-sNk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{time_total}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    code, size, total = r.stdout.split()
    if code != "200" or int(size) < n * 40:
        raise RuntimeError(f"curl {url}: status {code}, {size} bytes for {n} events")
    return n / float(total)


def client_run(kind: str, url: str, *, stamped: bool = False) -> dict[str, Any]:
    """Run a natural client (bench/clients.py) in a process of its own; its JSON result."""
    argv = [PY, "-m", "bench.clients", kind, url] + (["--stamped"] if stamped else [])
    r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"client {kind} {url} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def client_rate(kind: str, url: str, n: int) -> float:
    out = client_run(kind, url)
    if out["events"] != n:
        raise RuntimeError(f"client {kind} {url}: {out['events']} events, expected {n}")
    return n / out["seconds"]


def orjson_ceiling(n: int) -> float:
    """Build and encode each event dict in-process, the way a server's producer must."""
    dumps = orjson.dumps
    nl = orjson.OPT_APPEND_NEWLINE
    msgs = SEED_MESSAGES
    last = n - 1
    start = time.perf_counter()
    for i in range(n):
        dumps({"event_id": i, "data": msgs[i % 4], "is_last_event": i == last}, option=nl)
    return n / (time.perf_counter() - start)


def socket_ceiling(payload: bytes, n: int) -> float:
    """A pre-built NDJSON buffer through loopback TCP: sendall in a thread, recv_into here."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def send() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(payload)

        sender = threading.Thread(target=send)
        sender.start()
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        total = 0
        with socket.create_connection(("127.0.0.1", port)) as reader:
            start = time.perf_counter()
            while total < len(payload):
                got = reader.recv_into(view)
                if not got:
                    break
                total += got
            seconds = time.perf_counter() - start
        sender.join()
    return n / seconds


# -- scenario 1: one stream's throughput ------------------------------------------------------


def throughput(cfg: Config) -> tuple[Section, list[Goal], dict[str, Any]]:
    project, project_kind = servers.project_events()
    seed, naive, fsse = servers.seed(), servers.flask_naive(), servers.fastapi_sse()
    cert, key = bench_cert()
    project_tls, seed_tls = servers.project_tls(cert, key), servers.seed_tls(cert, key)
    np_, nq, ns = cfg.n_project, cfg.n_peer, cfg.n_sse_peer
    payload = ndjson_bytes(np_)
    runs: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}
    started: list[Server] = []
    try:
        for s in (project, seed, naive, fsse, project_tls, seed_tls):
            started.append(s.start())
        p_nd = f"{project.url}/events?count={np_}&interval=0"
        p_sse = p_nd + "&format=sse"
        seed_q = f"{seed.url}/events?count={nq}&interval=0"
        naive_q = f"{naive.url}/events?count={nq}&interval=0"
        fsse_q = f"{fsse.url}/events?count={ns}&interval=0"
        tls_p = f"{project_tls.url}/events?count={np_}&interval=0"
        tls_seed = f"{seed_tls.url}/events?count={nq}&interval=0"
        measures: list[tuple[str, int, Callable[[], float]]] = [
            ("project NDJSON, curl", np_, lambda: curl_rate(p_nd, np_)),
            ("project SSE, curl", np_, lambda: curl_rate(p_sse, np_)),
            (
                "project NDJSON, stream.client.Client",
                np_,
                lambda: client_rate("project", p_nd, np_),
            ),
            (
                "project SSE, stream.client.Client",
                np_,
                lambda: client_rate("project-sse", p_sse, np_),
            ),
            ("seed (FastAPI StreamingResponse), curl", nq, lambda: curl_rate(seed_q, nq)),
            (
                "seed, requests iter_lines + json.loads",
                nq,
                lambda: client_rate("requests", seed_q, nq),
            ),
            ("naive Flask generator, curl", nq, lambda: curl_rate(naive_q, nq)),
            (
                "naive Flask, requests iter_lines + json.loads",
                nq,
                lambda: client_rate("requests", naive_q, nq),
            ),
            ("FastAPI EventSourceResponse, curl", ns, lambda: curl_rate(fsse_q, ns)),
            (
                "FastAPI EventSourceResponse, httpx-sse + json.loads",
                ns,
                lambda: client_rate("httpx-sse", fsse_q, ns),
            ),
            (
                "project NDJSON over TLS (gunicorn --certfile), curl",
                np_,
                lambda: curl_rate(tls_p, np_),
            ),
            ("seed over TLS (uvicorn --ssl-certfile), curl", nq, lambda: curl_rate(tls_seed, nq)),
            ("ceiling: orjson encoding alone (in-process)", np_, lambda: orjson_ceiling(np_)),
            (
                "ceiling: raw bytes through a loopback socket",
                np_,
                lambda: socket_ceiling(payload, np_),
            ),
        ]
        sizes = {name: n for name, n, _ in measures}
        # warm every server up once (imports, first-request paths) before anything is timed
        for s in (project, seed, naive, fsse, project_tls, seed_tls):
            curl_rate(f"{s.url}/events?count=2000&interval=0", 0)
        for rep in range(cfg.reps):
            for name, _, measure in measures:
                runs.setdefault(name, []).append(measure())
                print(f"  [1] run {rep + 1}: {name}: {rate(runs[name][-1])} events/s", flush=True)
    finally:
        for s in started:
            s.stop()

    def per_run(a: str, b: str) -> float:
        return median([x / y for x, y in zip(runs[a], runs[b], strict=True)])

    r_client = per_run(
        "project NDJSON, stream.client.Client", "seed, requests iter_lines + json.loads"
    )
    r_curl = per_run("project NDJSON, curl", "seed (FastAPI StreamingResponse), curl")
    r_ceiling = per_run("project NDJSON, curl", "ceiling: orjson encoding alone (in-process)")
    r_sse = per_run("project SSE, curl", "FastAPI EventSourceResponse, curl")
    r_sse_client = per_run(
        "project SSE, stream.client.Client", "FastAPI EventSourceResponse, httpx-sse + json.loads"
    )
    r_naive = per_run("project NDJSON, curl", "naive Flask generator, curl")
    r_tls = per_run(
        "project NDJSON over TLS (gunicorn --certfile), curl",
        "seed over TLS (uvicorn --ssl-certfile), curl",
    )
    section = Section(
        "1. One stream's throughput (events/s)",
        ["server, reader", "events per stream", "events/s (median)", "runs"],
        notes=[
            f"Project server: {project_kind}. Servers all one worker/process on 127.0.0.1; "
            "readers in processes of their own (curl: `time_total`; Python clients: request "
            "sent to last value decoded).",
            f"Stream sizes: this project {np_:,} events; the seed and the naive Flask peer "
            f"{nq:,}; FastAPI's SSE {ns:,} (it runs at about 10k events/s here, so 1M events would "
            "take minutes per run). Rates are steady-state, so the sizes do not bias them much.",
            "TLS rows: each server terminates TLS itself with the same self-signed certificate "
            "(gunicorn `--certfile/--keyfile`, uvicorn `--ssl-certfile/--ssl-keyfile`); under "
            "TLS this project's writer sends every byte through gunicorn's own write path.",
            "FastAPI SSE peer: the installed FastAPI has `fastapi.sse.EventSourceResponse` "
            "(so sse-starlette is not measured).",
        ],
    )
    for name, values in runs.items():
        section.rows.append(
            [name, f"{sizes[name]:,}", rate(median(values)), ", ".join(rate(v) for v in values)]
        )
    section.rows.append(
        ["**ratio** project Client / seed's requests client", "", ratio(r_client), ""]
    )
    section.rows.append(["**ratio** project curl / seed curl", "", ratio(r_curl), ""])
    section.rows.append(["**ratio** project curl / orjson-alone ceiling", "", ratio(r_ceiling), ""])
    section.rows.append(["**ratio** project SSE curl / FastAPI SSE curl", "", ratio(r_sse), ""])
    section.rows.append(
        ["ratio project SSE Client / FastAPI SSE httpx-sse", "", ratio(r_sse_client), ""]
    )
    section.rows.append(["ratio project curl / naive Flask curl", "", ratio(r_naive), ""])
    section.rows.append(["ratio project TLS curl / seed TLS curl", "", ratio(r_tls), ""])
    goals = [
        Goal(
            "throughput: stream.Client / seed via its own client",
            ">= 10x",
            ratio(r_client),
            r_client >= 10,
        ),
        Goal("throughput: via curl / seed server via curl", ">= 10x", ratio(r_curl), r_curl >= 10),
        Goal(
            "throughput: via curl / orjson-alone ceiling",
            ">= 0.5",
            ratio(r_ceiling),
            r_ceiling >= 0.5,
        ),
        Goal("SSE via curl / FastAPI SSE via curl", ">= 10x", ratio(r_sse), r_sse >= 10),
    ]
    return section, goals, {"runs": runs}


# -- scenario 2: the delay each event waits ---------------------------------------------------


def latency(cfg: Config) -> tuple[Section, list[Goal], dict[str, Any]]:
    k = cfg.latency_events
    peers: list[tuple[str, Callable[[], Server], str, str]] = [
        ("project NDJSON (stream_response, gunicorn+gevent)", servers.project_bench, "project", ""),
        (
            "project SSE (stream_response, gunicorn+gevent)",
            servers.project_bench,
            "project-sse",
            "&format=sse",
        ),
        ("seed (FastAPI StreamingResponse, uvicorn)", servers.seed, "requests", ""),
        ("naive Flask generator (gunicorn+gevent)", servers.flask_naive, "requests", ""),
        ("FastAPI EventSourceResponse (uvicorn)", servers.fastapi_sse, "httpx-sse", ""),
    ]
    section = Section(
        "2. The delay each event waits (write to delivery), events 25 ms apart",
        ["server (client)", "p50 ms", "p99 ms", "max ms", "per-run p99 ms"],
        notes=[
            f"Each event carries the server's `time.time()` taken when it is yielded; the natural "
            f"client records arrival minus that. {k} events per run, {cfg.reps} runs; p50/p99 "
            "are the medians of the per-run percentiles. Bench-only `/stamped` endpoints "
            "(bench/peers/); the project's is `stream.server.stream_response` under the project's "
            "gunicorn.conf.py.",
        ],
    )
    raw: dict[str, Any] = {}
    project_p99 = math.nan
    for name, factory, kind, extra in peers:
        p50s, p99s, maxes = [], [], []
        with factory() as server:
            url = f"{server.url}/stamped?count={k}&interval=0.025{extra}"
            client_run(kind, f"{server.url}/stamped?count=5&interval=0.01{extra}", stamped=True)
            for rep in range(cfg.reps):
                lags = client_run(kind, url, stamped=True)["lags_ms"]
                if len(lags) != k:
                    raise RuntimeError(f"{name}: {len(lags)} events, expected {k}")
                p50s.append(percentile(lags, 0.5))
                p99s.append(percentile(lags, 0.99))
                maxes.append(max(lags))
                print(
                    f"  [2] run {rep + 1}: {name}: p50 {p50s[-1]:.2f} ms, p99 {p99s[-1]:.2f} ms",
                    flush=True,
                )
        raw[name] = {"p50": p50s, "p99": p99s, "max": maxes}
        section.rows.append(
            [
                f"{name} ({kind})",
                ms(median(p50s)),
                ms(median(p99s)),
                ms(median(maxes)),
                ", ".join(ms(v) for v in p99s),
            ]
        )
        if kind == "project":
            project_p99 = median(p99s)
    goals = [
        Goal(
            "coalescing delay p99 at 25 ms intervals (project NDJSON)",
            "<= 2 ms",
            f"{ms(project_p99)} ms",
            project_p99 <= 2.0,
        )
    ]
    return section, goals, raw


# -- scenario 3: 5,000 concurrent slow streams on one worker -----------------------------------


def _load(
    server: Server,
    path: str,
    conns: int,
    expect: int,
    timeout: float,
    no_end: bool = False,
    on_ready: Callable[[], None] | None = None,
    connect_concurrency: int | None = None,
) -> tuple[dict[str, Any], int, int]:
    """Run bench/loadclient.py against ``server``; its result, idle RSS and peak RSS (KiB)."""
    pid = server.worker_pid()
    idle = rss_kib(pid)
    argv = [
        PY,
        "-m",
        "bench.loadclient",
        server.url + path,
        "--conns",
        str(conns),
        "--expect",
        str(expect),
        "--timeout",
        str(timeout),
    ] + (["--no-end"] if no_end else [])
    if connect_concurrency is not None:
        argv += ["--connect-concurrency", str(connect_concurrency)]
    peak = idle
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, rss_kib(pid))
            except (OSError, RuntimeError):
                return
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result: dict[str, Any] = {}
    ready_at: tuple[float, float] | None = None
    try:
        for line in proc.stdout:
            if line.strip() == "READY":
                ready_at = (time.monotonic(), cpu_seconds(pid))
                if on_ready is not None:
                    on_ready()
            elif line.startswith("{"):
                result = json.loads(line)
                if ready_at is not None:
                    # the worker's CPU use from "all streams open" to the client's end
                    result["cpu_after_open"] = (cpu_seconds(pid) - ready_at[1]) / max(
                        1e-9, time.monotonic() - ready_at[0]
                    )
        proc.wait(timeout + 30)
    finally:
        done.set()
        sampler.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not result:
        raise RuntimeError(f"load client against {server.name} gave no result")
    return result, idle, peak


def concurrency(cfg: Config) -> tuple[Section, list[Goal], dict[str, Any]]:
    n, count = cfg.conns, cfg.slow_count
    peers: list[tuple[str, Callable[[], Server]]] = [
        ("project (stream_response, gunicorn+gevent, 1 worker)", servers.project_bench),
        ("seed (FastAPI StreamingResponse, uvicorn, 1 process)", servers.seed),
    ]
    raw: dict[str, Any] = {name: [] for name, _ in peers}
    for rep in range(cfg.reps):
        for name, factory in peers:
            # a fresh server per run: idle RSS of a process that already served 5,000 streams
            # holds freed-but-kept memory and would understate the cost per stream
            with factory() as server:
                client_run("requests", f"{server.url}/stamped?count=3&interval=0.01", stamped=True)
                result, idle, peak = _load(
                    server, f"/stamped?count={count}&interval=1", n, count, timeout=count + 90
                )
            result["idle_kib"], result["peak_kib"] = idle, peak
            result["kib_per_stream"] = (peak - idle) / n
            raw[name].append(result)
            print(
                f"  [3] run {rep + 1}: {name}: {result['completed']}/{n} complete, "
                f"max open {result['max_open']}, p99 lag {result['lag_p99_ms']:.1f} ms "
                f"(steady {result['steady_p99_ms']:.1f} ms, "
                f"open in {result['ramp_seconds']:.1f} s, "
                f"CPU once open {100 * result.get('cpu_after_open', math.nan):.0f}%), "
                f"{result['kib_per_stream']:.1f} KiB/stream",
                flush=True,
            )
    section = Section(
        f"3. {n:,} concurrent slow streams on ONE worker",
        [
            "server",
            "complete (per run)",
            "max open at once",
            "lag p50 ms",
            "lag p99 ms",
            "steady p50 / p99 ms",
            "KiB per open stream",
            "idle / peak RSS MiB",
            "s to open all",
            "worker CPU once open",
            "wall s",
        ],
        notes=[
            f"Each stream: {count} events 1 s apart (`/stamped?count={count}&interval=1`), every "
            "event carrying the server's `time.time()`. Client: one separate process, asyncio + "
            "uvloop over raw sockets (bench/loadclient.py), at most 256 connects in flight. Lag = "
            "arrival minus the event's timestamp. Memory: peak VmRSS of the serving process "
            "while the streams are open minus its VmRSS idle (after one warm-up request), "
            f'divided by {n:,}. A fresh server per run. "steady": only the events that '
            "arrived once every stream was open (the lag columns before it count all events, "
            'those sent while the worker was still accepting connections included); "s to '
            'open all": from the first connect to the last response headers; "worker CPU once '
            "open\": the serving process's CPU use (100% = one core) from then to the end.",
        ],
    )
    project_name = peers[0][0]
    for name, _ in peers:
        rs = raw[name]
        section.rows.append(
            [
                name,
                ", ".join(f"{r['completed']}/{n}" for r in rs),
                f"{median([r['max_open'] for r in rs]):.0f}",
                ms(median([r["lag_p50_ms"] for r in rs])),
                ms(median([r["lag_p99_ms"] for r in rs])),
                f"{ms(median([r['steady_p50_ms'] for r in rs]))} / "
                f"{ms(median([r['steady_p99_ms'] for r in rs]))}",
                f"{median([r['kib_per_stream'] for r in rs]):.1f}",
                f"{median([r['idle_kib'] for r in rs]) / 1024:.0f} / "
                f"{median([r['peak_kib'] for r in rs]) / 1024:.0f}",
                f"{median([r['ramp_seconds'] for r in rs]):.1f}",
                f"{100 * median([r.get('cpu_after_open', math.nan) for r in rs]):.0f}%",
                f"{median([r['seconds'] for r in rs]):.1f}",
            ]
        )
    rs = raw[project_name]
    all_done = all(r["completed"] == n for r in rs)
    p99 = median([r["lag_p99_ms"] for r in rs])
    steady99 = median([r["steady_p99_ms"] for r in rs])
    per = median([r["kib_per_stream"] for r in rs])
    kb = per * 1.024
    goals = [
        Goal(
            f"{n:,} streams, one worker: all complete",
            "all, every run",
            ", ".join(f"{r['completed']}/{n}" for r in rs),
            all_done,
        ),
        Goal(
            f"{n:,} streams: p99 lag (all events, the connection ramp included)",
            "<= 250 ms",
            f"{ms(p99)} ms (once all open: {ms(steady99)} ms)",
            p99 <= 250,
        ),
        Goal(
            f"{n:,} streams: memory per open stream",
            "<= 25 KB",
            f"{kb:.1f} KB ({per:.1f} KiB)",
            kb <= 25,
        ),
    ]
    return section, goals, raw


# -- scenario 4: sans-I/O decoding ------------------------------------------------------------


def _chunks(data: bytes, size: int = 64 * 1024) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def decode_project_ndjson(chunks: list[bytes]) -> int:
    from stream.ndjson import NDJSONDecoder

    decoder = NDJSONDecoder()
    n = 0
    for c in chunks:
        n += len(decoder.feed(c))
    return n + len(decoder.flush())


def decode_naive_ndjson(chunks: list[bytes]) -> int:
    """``json.loads`` per ``splitlines()`` line, carrying an unfinished last line."""
    n = 0
    tail = b""
    for c in chunks:
        lines = (tail + c).splitlines(keepends=True)
        tail = lines.pop() if lines and not lines[-1].endswith(b"\n") else b""
        for line in lines:
            if line.strip():
                json.loads(line)
                n += 1
    return n


def decode_project_sse(chunks: list[bytes]) -> int:
    from stream.sse import SSEDecoder

    decoder = SSEDecoder()
    n = 0
    for c in chunks:
        n += len(decoder.feed(c))
    return n + len(decoder.flush())


def decode_httpx_sse(chunks: list[bytes]) -> int:
    """httpx-sse's own path: incremental UTF-8 text, its SSELineDecoder, SSEDecoder per line."""
    from httpx_sse._decoders import SSEDecoder, SSELineDecoder

    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    lines = SSELineDecoder()
    decoder = SSEDecoder()
    n = 0
    for c in chunks:
        for line in lines.decode(text.decode(c)):
            if decoder.decode(line.rstrip("\n")) is not None:
                n += 1
    for line in lines.flush():
        if decoder.decode(line) is not None:
            n += 1
    return n


def decoding(cfg: Config) -> tuple[Section, list[Goal], dict[str, Any]]:
    n = cfg.decode_n
    nd = _chunks(ndjson_bytes(n))
    sse = _chunks(sse_bytes(n))
    measures: list[tuple[str, Callable[[list[bytes]], int], list[bytes]]] = [
        ("project NDJSONDecoder (values)", decode_project_ndjson, nd),
        ("naive json.loads per splitlines() line", decode_naive_ndjson, nd),
        ("project SSEDecoder (Events)", decode_project_sse, sse),
        ("httpx-sse SSELineDecoder + SSEDecoder (ServerSentEvents)", decode_httpx_sse, sse),
    ]
    runs: dict[str, list[float]] = {}
    small = {id(nd): _chunks(ndjson_bytes(2000)), id(sse): _chunks(sse_bytes(2000))}
    for _, fn, chunks in measures:
        fn(small[id(chunks)])  # warm up: imports, first-call paths
    for rep in range(cfg.reps):
        for name, fn, chunks in measures:
            # each decoder starts from the same heap, not with its predecessor's garbage
            gc.collect()
            start = time.perf_counter()
            got = fn(chunks)
            seconds = time.perf_counter() - start
            if got != n:
                raise RuntimeError(f"{name}: {got} events, expected {n}")
            runs.setdefault(name, []).append(n / seconds)
            print(f"  [4] run {rep + 1}: {name}: {rate(runs[name][-1])} events/s", flush=True)

    def per_run(a: str, b: str) -> float:
        return median([x / y for x, y in zip(runs[a], runs[b], strict=True)])

    r_nd = per_run(measures[0][0], measures[1][0])
    r_sse = per_run(measures[2][0], measures[3][0])
    section = Section(
        "4. Sans-I/O decoding (events/s, one core, in-process)",
        ["decoder", "events/s (median)", "runs"],
        notes=[
            f"{n:,} small events, the same bytes for each side, fed in 64 KiB chunks. SSE "
            "decoders yield events with the data text (no JSON parsing on either side); the "
            "NDJSON decoders yield parsed values."
        ],
    )
    for name, values in runs.items():
        section.rows.append([name, rate(median(values)), ", ".join(rate(v) for v in values)])
    section.rows.append(["**ratio** project NDJSON / naive json.loads", ratio(r_nd), ""])
    section.rows.append(["**ratio** project SSE / httpx-sse", ratio(r_sse), ""])
    v_nd, v_sse = median(runs[measures[0][0]]), median(runs[measures[2][0]])
    goals = [
        Goal(
            "decoding NDJSON",
            ">= 1.5M events/s",
            f"{rate(v_nd)}/s ({ratio(r_nd)} naive)",
            v_nd >= 1.5e6,
        ),
        Goal(
            "decoding SSE",
            ">= 500k events/s",
            f"{rate(v_sse)}/s ({ratio(r_sse)} httpx-sse)",
            v_sse >= 5e5,
        ),
    ]
    return section, goals, {"runs": runs}


# -- scenario 5: fan-out ----------------------------------------------------------------------
# "fan-out: publish-to-delivery for 1,000 subscribers", against `gunicorn wsgi:app` twice: the
# in-process broker (one worker) and Redis Streams (a throwaway redis-server, two workers).


def _open_streams(url: str, workers: int) -> int:
    """Open streams over all workers: /healthz on new connections until each pid answered."""
    import requests

    seen: dict[int, int] = {}
    for _ in range(50 * workers):
        body = requests.get(url + "/healthz", headers={"Connection": "close"}, timeout=5).json()
        seen[body["pid"]] = body.get("open_streams", 0)
        if len(seen) >= workers:
            break
    return sum(seen.values())


def _fanout_runs(
    cfg: Config, server: Server, label: str, connect_concurrency: int | None = None
) -> list[dict[str, Any]]:
    import requests

    subs, k = cfg.fanout_subs, cfg.fanout_events
    raw: list[dict[str, Any]] = []
    for rep in range(cfg.reps):
        channel = f"bench-fanout-{os.getpid()}-{label}-{rep}"
        session = requests.Session()

        def publish_all(session: requests.Session = session, channel: str = channel) -> None:
            wait_for(lambda: _open_streams(server.url, server.workers) >= subs, 30)
            period = 1.0 / cfg.fanout_rate
            next_at = time.perf_counter()
            for i in range(k):
                body = orjson.dumps({"i": i, "t": time.time()})
                r = session.post(
                    f"{server.url}/channels/{channel}",
                    data=body,
                    headers={"Content-Type": "application/json"},
                    timeout=10,
                )
                r.raise_for_status()
                next_at += period
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)

        publisher = threading.Thread(target=publish_all)
        result, _, _ = _load(
            server,
            f"/channels/{channel}",
            subs,
            k,
            timeout=k / cfg.fanout_rate + 60,
            no_end=True,
            on_ready=publisher.start,
            connect_concurrency=connect_concurrency,
        )
        if publisher.is_alive():
            publisher.join(30)
        raw.append(result)
        print(
            f"  [5] {label} run {rep + 1}: {result['completed']}/{subs} got all {k}; p50 "
            f"{result['lag_p50_ms']:.1f} ms, p99 {result['lag_p99_ms']:.1f} ms",
            flush=True,
        )
    return raw


def fanout(cfg: Config) -> tuple[Section, list[Goal], dict[str, Any]]:
    subs, k = cfg.fanout_subs, cfg.fanout_events
    section = Section(
        f"5. Fan-out: publish-to-delivery for {subs:,} subscribers",
        ["server", "delivered (per run)", "p50 ms", "p99 ms", "max ms", "per-run p99 ms"],
        notes=[
            f"{subs:,} NDJSON subscribers on one channel (`GET /channels/<name>`, bench/"
            f"loadclient.py, one process); once all are open, {k} events are published one "
            f"per `POST /channels/<name>` at {cfg.fanout_rate:g}/s, each carrying the "
            "publisher's `time.time()` taken just before the POST; lag = arrival minus that. "
            "Redis: a local redis-server (no persistence), `REDIS_URL` set, two gunicorn "
            "workers, subscribers spread over both by the kernel's accept and opened 32 at a time "
            "(256 for the in-process broker)."
        ],
    )
    if not servers.service_importable():
        section.notes.append(
            "**Not run**: app.py does not import yet (stream/broker/ has not "
            "landed). `python -m bench --only 5` runs it once it has."
        )
        return section, [], {}
    runs: dict[str, list[dict[str, Any]]] = {}
    with servers.project_service() as server:
        runs["memory"] = _fanout_runs(cfg, server, "memory")
    with servers.redis_server() as redis_url:
        with servers.project_service_redis(redis_url, workers=2) as server:
            # Subscribes 32 at a time: 256 at once against cold workers open a Redis connection
            # per subscribe and some get 503 (docs/scaling.md, "Bursts of subscribes").
            runs["redis"] = _fanout_runs(cfg, server, "redis", connect_concurrency=32)
    labels = {
        "memory": "project, in-process broker, 1 worker",
        "redis": "project, Redis broker, 2 workers",
    }
    for key, raw in runs.items():
        # A run where no event arrived (every subscribe refused) has no lag: left out of medians.
        timed = [r for r in raw if not math.isnan(r["lag_p50_ms"])] or raw
        section.rows.append(
            [
                labels[key],
                ", ".join(f"{r['completed']}/{subs}" for r in raw),
                ms(median([r["lag_p50_ms"] for r in timed])),
                ms(median([r["lag_p99_ms"] for r in timed])),
                ms(median([r["lag_max_ms"] for r in timed])),
                ", ".join(ms(r["lag_p99_ms"]) for r in raw),
            ]
        )
        if len(timed) < len(raw):
            section.notes.append(
                f"{labels[key]}: {len(raw) - len(timed)} run(s) delivered nothing (subscribes "
                "refused with 503, see docs/scaling.md); medians over the other runs."
            )
    return section, [], {"runs": runs}
