"""The service's Prometheus metrics (per worker process), rendered by ``GET /metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

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
PUBLISHED = Counter("stream_published_events", "Events published to channels.", registry=REGISTRY)


def render() -> bytes:
    """The metrics in Prometheus' text format."""
    return generate_latest(REGISTRY)
