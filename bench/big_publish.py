"""``python -m bench.big_publish --redis-url URL``: how one huge publish affects everyone else.

Publishes one batch of ``--values`` tiny values (524,000 by default: a 1 MiB NDJSON body of
one-digit lines) through the Redis broker while another thread publishes one small value at a
time on another key, back to back, and a third one PINGs Redis. Prints the big publish's time
and the small publishes' and PINGs' latencies (p50, p99, max): what another worker's publish
waits while Redis works on the big one. ``--impl FILE`` loads ``RedisBroker`` from another
copy of ``stream/redis_broker.py`` (to compare with an earlier version).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import threading
import time
import uuid
from typing import Any

import redis


def _broker_class(impl: str | None) -> Any:
    if impl is None:
        from stream.redis_broker import RedisBroker

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--values", type=int, default=524_000)
    parser.add_argument("--impl", help="a redis_broker.py file to load RedisBroker from")
    args = parser.parse_args()
    broker = _broker_class(args.impl)(args.redis_url, prefix=f"bench:{uuid.uuid4().hex}:")
    pinger = redis.Redis.from_url(args.redis_url, socket_timeout=30)
    items = [("message", str(i % 10).encode()) for i in range(args.values)]
    done = threading.Event()
    started = threading.Event()
    small: list[float] = []
    pings: list[float] = []

    def publish_small() -> None:
        started.wait()
        while not done.is_set():
            t0 = time.perf_counter()
            broker.publish("small", [("message", b"1")])
            small.append(time.perf_counter() - t0)

    def ping() -> None:
        started.wait()
        while not done.is_set():
            t0 = time.perf_counter()
            pinger.ping()
            pings.append(time.perf_counter() - t0)
            time.sleep(0.001)

    threads = [threading.Thread(target=publish_small), threading.Thread(target=ping)]
    for thread in threads:
        thread.start()
    try:
        started.set()
        t0 = time.perf_counter()
        ids = broker.publish("big", items)
        elapsed = time.perf_counter() - t0
    finally:
        done.set()
        for thread in threads:
            thread.join()
        broker.close()
        pinger.close()
    assert len(ids) == args.values
    print(f"big publish of {args.values} values: {elapsed:.2f} s")
    print(_summary("concurrent small publishes", small))
    print(_summary("concurrent PINGs", pings))


if __name__ == "__main__":
    main()
