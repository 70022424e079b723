"""Many concurrent streams from one process: ``python -m bench.loadclient URL --conns N ...``.

asyncio (uvloop) protocols over raw sockets, no HTTP library: the client must not be the
bottleneck of the 5,000-stream scenario, nor take the CPU from the servers it measures on
the same cores. Each connection sends one GET, then scans what arrives for the events' ``"t"``
(the server's ``time.time()`` when it yielded or published the event) and records arrival
time minus ``t``. A connection is complete when it has ``K`` events and, unless ``--no-end``
(subscriptions never end), the body ended properly (chunked terminator or EOF).

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


class _Run:
    """What every connection of one load generator shares: the settings, the counts, the lags."""

    def __init__(self, expect: int, need_end: bool, total: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.expect = expect
        self.need_end = need_end
        self.total = total
        self.open = self.max_open = self.headers = self.done = 0
        self.lags: list[float] = []
        self.steady: list[float] = []  # lags of events that arrived once every stream was open
        self.all_open = asyncio.Event()
        self.marks: dict[str, float] = {}

    def opened(self) -> None:
        self.open += 1
        self.headers += 1
        self.max_open = max(self.max_open, self.open)
        if self.headers == self.total:
            self.all_open.set()

    def served(self) -> None:
        self.done += 1
        if self.done == self.total:  # the load generator's busy span ends here
            self.marks["cpu_done"] = time.process_time()
            self.marks["t_done"] = time.perf_counter()


class _Conn(asyncio.Protocol):
    """One stream, driven by the event loop's callbacks. A stream reader would wake a task
    for every read, which cost as much as the rest of the client's work for each event."""

    def __init__(self, run: _Run, request: bytes) -> None:
        self.run = run
        self.request = request
        self.buf = b""
        self.in_body = False
        self.got = 0
        self.headers: asyncio.Future[str | None] = run.loop.create_future()
        self.result: asyncio.Future[str] = run.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]  # uvloop's is no Transport

    def data_received(self, data: bytes) -> None:
        if self.result.done():
            return
        if not self.in_body:
            self.buf += data
            if b"\r\n\r\n" not in self.buf:
                return
            head, _, data = self.buf.partition(b"\r\n\r\n")
            self.buf = b""
            if not head.startswith(b"HTTP/1.1 200"):
                self._finish("status:" + head.split(b"\r\n", 1)[0].decode(errors="replace"))
                return
            self.in_body = True
            self.run.opened()
            self.headers.set_result(None)
        # the last 64 bytes stay: an event cut by the end of a read is matched with the next
        buf = self.buf[-64:] + data if len(self.buf) > 64 else self.buf + data
        arrived = time.time()
        run = self.run
        pos = 0
        for m in T_RE.finditer(buf):
            lag = (arrived - float(m.group(1))) * 1000.0
            run.lags.append(lag)
            if run.all_open.is_set():
                run.steady.append(lag)
            self.got += 1
            pos = m.end()
        self.buf = buf[pos:] if pos else buf
        if self.got >= run.expect and (not run.need_end or self.buf.endswith(b"0\r\n\r\n")):
            self._finish("ok")

    def eof_received(self) -> bool:
        self.connection_lost(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._finish(f"read:{type(exc).__name__}")
        elif not self.in_body:
            self._finish("eof-in-headers")
        else:
            self._finish("ok" if self.got >= self.run.expect else f"short:{self.got}")

    def _finish(self, outcome: str) -> None:
        if not self.headers.done():
            self.headers.set_result(outcome)
        if not self.result.done():
            if outcome == "ok":
                self.run.served()
            self.result.set_result(outcome)


async def one(
    run: _Run, host: str, port: int, request: bytes, gate: asyncio.Semaphore, linger: float
) -> str:
    async with gate:  # bound the connects in flight (listen backlogs are 2048 here)
        try:
            transport, conn = await run.loop.create_connection(
                lambda: _Conn(run, request), host, port
            )
        except OSError as exc:
            return f"connect:{type(exc).__name__}"
        failed = await conn.headers
    try:
        if failed is not None:
            return failed
        outcome = await conn.result
        if outcome == "ok" and linger > 0:
            # Stay connected (without reading) so that thousands of streams closing at once do
            # not compete with the last events still being written to the other connections.
            transport.pause_reading()
            await asyncio.sleep(linger)
        return outcome
    finally:
        if conn.in_body:
            run.open -= 1
        transport.close()


async def run(args: argparse.Namespace) -> dict[str, object]:
    url = urlsplit(args.url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    target = url.path + ("?" + url.query if url.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: {args.accept}\r\n"
        f"Connection: close\r\n\r\n"
    ).encode()
    gate = asyncio.Semaphore(args.connect_concurrency)
    state = _Run(args.expect, not args.no_end, args.conns)
    ramp = float("nan")

    async def announce() -> None:
        nonlocal ramp
        await state.all_open.wait()
        ramp = time.perf_counter() - start
        state.marks["cpu_ready"] = time.process_time()
        state.marks["t_ready"] = time.perf_counter()
        sys.stdout.write("READY\n")
        sys.stdout.flush()

    announcer = asyncio.ensure_future(announce())
    start = time.perf_counter()
    tasks = [one(state, host, port, request, gate, args.linger) for _ in range(args.conns)]
    try:
        results = await asyncio.wait_for(asyncio.gather(*tasks), args.timeout)
    except TimeoutError:
        results = ["timeout"]
    announcer.cancel()
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r] = outcomes.get(r, 0) + 1
    lags, steady, marks = sorted(state.lags), sorted(state.steady), state.marks

    def q(p: float, values: list[float] = lags) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")

    return {
        "lags": lags,
        "conns": args.conns,
        "completed": outcomes.get("ok", 0),
        "outcomes": outcomes,
        "max_open": state.max_open,
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
        "busy_cpu_share": (marks["cpu_done"] - marks["cpu_ready"])
        / max(1e-9, marks["t_done"] - marks["t_ready"])
        if "cpu_done" in marks and "cpu_ready" in marks
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
