"""Many concurrent streams from one process: ``python -m bench.loadclient URL --conns N ...``.

asyncio (uvloop) over raw sockets, no HTTP library: the client must not be the bottleneck of
the 5,000-stream scenario. Each connection sends one GET, then scans what arrives for the
events' ``"t"`` (the server's ``time.time()`` when it yielded or published the event) and
records arrival time minus ``t``. A connection is complete when it has ``K`` events and, unless
``--no-end`` (subscriptions never end), the body ended properly (chunked terminator or EOF).

Prints ``READY`` on stdout once every connection has its response headers, then one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from urllib.parse import urlsplit

# `"t":123.45` (orjson) or `"t": 123.45` (json.dumps); the terminator makes a number cut by the
# end of a read wait for the next one.
T_RE = re.compile(rb'"t": ?([0-9]+\.[0-9]+)[,}]')


async def one(
    host: str,
    port: int,
    target: str,
    expect: int,
    need_end: bool,
    accept: str,
    gate: asyncio.Semaphore,
    state: dict[str, int],
    lags: list[float],
    steady: list[float],
    headers_done: asyncio.Event,
    total: int,
    linger: float = 0.0,
) -> str:
    now = time.time
    async with gate:  # bound the connects in flight (listen backlogs are 2048 here)
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            return f"connect:{type(exc).__name__}"
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: {accept}\r\n"
            f"Connection: close\r\n\r\n".encode()
        )
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                data = await reader.read(65536)
                if not data:
                    return "eof-in-headers"
                buf += data
        except OSError as exc:
            return f"read:{type(exc).__name__}"
    head, _, buf = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        return "status:" + head.split(b"\r\n", 1)[0].decode(errors="replace")
    state["open"] += 1
    state["headers"] += 1
    state["max_open"] = max(state["max_open"], state["open"])
    if state["headers"] == total:
        headers_done.set()
    got = 0
    ended = False
    try:
        while True:
            arrived = now()
            pos = 0
            for m in T_RE.finditer(buf):
                lag = (arrived - float(m.group(1))) * 1000.0
                lags.append(lag)
                if headers_done.is_set():
                    steady.append(lag)
                got += 1
                pos = m.end()
            if pos:
                buf = buf[pos:]
            if got >= expect and (not need_end or buf.endswith(b"0\r\n\r\n")):
                ended = True
                break
            data = await reader.read(65536)
            if not data:
                ended = got >= expect
                break
            buf = buf[-64:] + data if len(buf) > 64 else buf + data
        if ended:
            state["done"] += 1
            if state["done"] == total:  # the load generator's busy span ends here
                state["cpu_done"] = time.process_time()
                state["t_done"] = time.perf_counter()
        if ended and linger > 0:
            # Stay connected (without reading) so that thousands of streams closing at once do
            # not compete with the last events still being written to the other connections.
            await asyncio.sleep(linger)
    except OSError as exc:
        return f"read:{type(exc).__name__}"
    finally:
        state["open"] -= 1
        writer.close()
    return "ok" if ended else f"short:{got}"


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = url.path + ("?" + url.query if url.query else "")
    gate = asyncio.Semaphore(args.connect_concurrency)
    state: dict[str, float] = {"open": 0, "max_open": 0, "headers": 0, "done": 0}
    lags: list[float] = []
    steady: list[float] = []  # lags of events that arrived once every stream was open
    headers_done = asyncio.Event()
    ramp = float("nan")

    async def announce() -> None:
        nonlocal ramp
        await headers_done.wait()
        ramp = time.perf_counter() - start
        state["cpu_ready"], state["t_ready"] = time.process_time(), time.perf_counter()
        sys.stdout.write("READY\n")
        sys.stdout.flush()

    announcer = asyncio.ensure_future(announce())
    start = time.perf_counter()
    tasks = [
        one(
            host,
            port,
            target,
            args.expect,
            not args.no_end,
            args.accept,
            gate,
            state,
            lags,
            steady,
            headers_done,
            args.conns,
            args.linger,
        )
        for _ in range(args.conns)
    ]
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks), args.timeout)
    except TimeoutError:
        results = ["timeout"]
    announcer.cancel()
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r] = outcomes.get(r, 0) + 1
    lags.sort()
    steady.sort()

    def q(p: float, values: list[float] = lags) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    return {
        "lags": lags,
        "conns": args.conns,
        "completed": outcomes.get("ok", 0),
        "outcomes": outcomes,
        "max_open": state["max_open"],
        "events": len(lags),
        "lag_p50_ms": q(0.50),
        "lag_p99_ms": q(0.99),
        "lag_max_ms": lags[-1] if lags else float("nan"),
        "steady_events": len(steady),
        "steady_p50_ms": q(0.50, steady),
        "steady_p99_ms": q(0.99, steady),
        "ramp_seconds": ramp,
        "seconds": time.perf_counter() - start,
        # the load generator's own CPU (user + system), so a report can show it was no bottleneck
        "cpu_seconds": time.process_time(),
        # its CPU share (1.0 = one core) from all streams open to the last one served: how
        # close it came to being the bottleneck while the events flowed
        "busy_cpu_share": (state["cpu_done"] - state["cpu_ready"])
        / max(1e-9, state["t_done"] - state["t_ready"])
        if "cpu_done" in state and "cpu_ready" in state
        else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--conns", type=int, default=5000)
    parser.add_argument("--expect", type=int, required=True, help="events per connection")
    parser.add_argument("--no-end", action="store_true", help="do not wait for the body's end")
    parser.add_argument("--accept", default="application/x-ndjson")
    parser.add_argument("--connect-concurrency", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--linger", type=float, default=0.0, help="s to stay open once done")
    parser.add_argument("--dump", help="write every lag (ms) to this file as a JSON list")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args))
    if args.dump:
        # every lag, for a caller that merges several load generators' percentiles
        with open(args.dump, "w") as f:
            json.dump(result.pop("lags"), f)
    else:
        result.pop("lags")
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
