"""The service's Prometheus metrics (per worker process), rendered by ``GET /metrics``."""

from __future__ import annotations

import gc

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

REGISTRY = CollectorRegistry(auto_describe=True)
# process_open_fds, process_resident_memory_bytes, ...: what leak tests watch.
ProcessCollector(registry=REGISTRY)

OPEN_STREAMS = Gauge("stream_open_streams", "Streams open now.", registry=REGISTRY)
EVENTS_SENT = Counter("stream_events_sent", "Events written to streams.", registry=REGISTRY)
BYTES_SENT = Counter("stream_bytes_sent", "Bytes written to streams.", registry=REGISTRY)
DISCONNECTS = Counter(
    "stream_disconnects", "Streams that ended because the client left.", registry=REGISTRY
)
SLOW_CONSUMER_DROPS = Counter(
    "stream_slow_consumer_drops",
    "Subscribers cut off because they fell too far behind.",
    registry=REGISTRY,
)
STREAM_DURATION = Histogram(
    "stream_duration_seconds",
    "How long streams stayed open.",
    buckets=(0.1, 1, 10, 60, 300, 1800, 3600, float("inf")),
    registry=REGISTRY,
)
GREENLETS = Gauge(
    "stream_greenlets",
    "Live greenlets in this process (counted when scraped; 0 without gevent).",
    registry=REGISTRY,
)
PUBLISHED = Counter("stream_published_events", "Events published to channels.", registry=REGISTRY)


def _count_greenlets() -> float:
    try:
        from greenlet import greenlet
    except ImportError:  # pragma: no cover - greenlet comes with gevent, a server dependency
        return 0.0
    return float(sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead))


GREENLETS.set_function(_count_greenlets)


def render() -> bytes:
    """The metrics in Prometheus' text format."""
    return generate_latest(REGISTRY)
