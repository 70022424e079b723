"""``python -m bench.big_publish --redis-url URL``: how one huge publish affects everyone else.

Publishes one batch of ``--values`` tiny values (524,000 by default: a 1 MiB NDJSON body of
one-digit lines) through the Redis broker while another process (another worker) publishes one
small value at a time on another key, back to back, and PINGs Redis between them. Prints the
big publish's time and the small publishes' and PINGs' latencies (p50, p99, max): what another
worker waits while Redis works on the big one. ``--impl FILE`` loads ``RedisBroker`` from another
copy of ``stream/broker/redis.py`` (to compare with an earlier version).
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import statistics
import time
import uuid
from multiprocessing.synchronize import Event
from typing import Any

import redis


def _broker_class(impl: str | None) -> Any:
    if impl is None:
        from stream.broker.redis import RedisBroker

        return RedisBroker
    spec = importlib.util.spec_from_file_location("redis_broker_under_test", impl)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RedisBroker


def _summary(name: str, samples: list[float]) -> str:
    if not samples:
        return f"{name}: none completed"
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (
        f"{name}: n={len(ordered)} p50={statistics.median(ordered) * 1000:.1f} ms "
        f"p99={p99 * 1000:.1f} ms max={ordered[-1] * 1000:.1f} ms"
    )


def _other_worker(url: str, impl: str | None, started: Event, done: Event, results: Any) -> None:
    """Publish small values and PING, back to back, until ``done``; report the latencies."""
    broker = _broker_class(impl)(url, prefix=f"bench:{uuid.uuid4().hex}:", socket_timeout=60)
    pinger = redis.Redis.from_url(url, socket_timeout=30)
    # (when it started by the wall clock, shared with the other process; how long it took)
    small: list[tuple[float, float]] = []
    pings: list[tuple[float, float]] = []
    started.set()
    while not done.is_set():
        w0, t0 = time.time(), time.perf_counter()
        broker.publish("small", [("message", b"1")])
        w1, t1 = time.time(), time.perf_counter()
        pinger.ping()
        small.append((w0, t1 - t0))
        pings.append((w1, time.perf_counter() - t1))
    broker.close()
    pinger.close()
    results.put((small, pings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--values", type=int, default=524_000)
    parser.add_argument("--impl", help="a copy of stream/broker/redis.py to load RedisBroker from")
    args = parser.parse_args()
    broker = _broker_class(args.impl)(
        args.redis_url, prefix=f"bench:{uuid.uuid4().hex}:", socket_timeout=60
    )
    items = [("message", str(i % 10).encode()) for i in range(args.values)]
    started, done = multiprocessing.Event(), multiprocessing.Event()
    results: Any = multiprocessing.Queue()
    other = multiprocessing.Process(
        target=_other_worker, args=(args.redis_url, args.impl, started, done, results)
    )
    other.start()
    try:
        started.wait(30)
        time.sleep(0.2)  # a baseline of small publishes before the big one
        w0, t0 = time.time(), time.perf_counter()
        ids = broker.publish("big", items)
        elapsed = time.perf_counter() - t0
        w1 = time.time()
        time.sleep(0.2)
    finally:
        done.set()
        small, pings = results.get(timeout=60)
        other.join(30)
        broker.close()
    assert len(ids) == args.values
    print(f"big publish of {args.values} values: {elapsed:.2f} s")
    for name, samples in (("small publishes", small), ("PINGs", pings)):
        # Those in flight at some point of the big publish.
        during = [dt for start, dt in samples if start <= w1 and start + dt >= w0]
        print(_summary(f"{name} during it", during))


if __name__ == "__main__":
    main()
