"""Prometheus metrics of the streams, rendered by ``GET /metrics``: the whole service's numbers.

Optional: without prometheus-client (the ``metrics`` extra) every counter is a no-op and
:func:`render` says how to install it, so ``stream_response`` needs only Flask and orjson.

Under gunicorn each worker is a process with its own counters. With ``PROMETHEUS_MULTIPROC_DIR``
set before the workers start (``stream.gunicorn``'s hooks do it), prometheus-client keeps every
worker's values in files there and :func:`render` adds them up, so a scrape describes the whole
service whatever worker answers: counters and the duration histogram summed over every worker
that ever ran, ``stream_open_streams`` summed over the live ones (``livesum``: the master
forgets a worker's files when it exits). ``process_*`` and ``stream_greenlets`` are read at
scrape time from the process that answers, as a process's own figures cannot be shared.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable
from typing import Protocol

from ._extras import install_hint

#: the variable prometheus-client reads, once, when it is first imported
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class CounterLike(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class GaugeLike(CounterLike, Protocol):
    def dec(self, amount: float = 1) -> None: ...


class HistogramLike(Protocol):
    def observe(self, amount: float) -> None: ...


class _NoMetric:
    """Stands in for every metric when prometheus-client is not installed."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


try:
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        ProcessCollector,
        generate_latest,
    )
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.multiprocess import MultiProcessCollector
    from prometheus_client.registry import Collector
except ImportError:
    INSTALLED = False
else:
    INSTALLED = True

#: whether values live in files shared by the workers (decided when prometheus-client loaded)
MULTIPROCESS = INSTALLED and bool(os.environ.get(MULTIPROCESS_DIR_VARIABLE))

OPEN_STREAMS: GaugeLike
EVENTS_SENT: CounterLike
BYTES_SENT: CounterLike
DISCONNECTS: CounterLike
SLOW_CONSUMER_DROPS: CounterLike
PUBLISHED: CounterLike
STREAM_DURATION: HistogramLike


def _count_greenlets() -> float:
    try:
        from greenlet import greenlet
    except ImportError:  # greenlet comes with gevent, a server dependency
        return 0.0
    return float(sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead))


if INSTALLED:
    #: the streams' metrics (file-backed in multiprocess mode)
    REGISTRY = CollectorRegistry(auto_describe=True)
    #: this process's own figures, never shared: process_open_fds, process_resident_memory_bytes,
    #: live greenlets (what leak tests watch)
    _LOCAL = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=_LOCAL)

    class _Greenlets(Collector):
        """Live greenlets, counted when scraped (a Gauge's set_function is not file-backed)."""

        def collect(self) -> Iterable[Metric]:
            yield GaugeMetricFamily(
                "stream_greenlets",
                "Live greenlets in the process that answered (0 without gevent).",
                value=_count_greenlets(),
            )

    _LOCAL.register(_Greenlets())

    OPEN_STREAMS = Gauge(
        "stream_open_streams",
        "Streams open now.",
        registry=REGISTRY,
        # the live workers' sum; an exited worker's streams are closed, so they no longer count
        multiprocess_mode="livesum",
    )
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
    PUBLISHED = Counter(
        "stream_published_events", "Events published to channels.", registry=REGISTRY
    )
else:
    _NO_METRIC = _NoMetric()
    OPEN_STREAMS = EVENTS_SENT = BYTES_SENT = DISCONNECTS = _NO_METRIC
    SLOW_CONSUMER_DROPS = PUBLISHED = STREAM_DURATION = _NO_METRIC


def render() -> bytes:
    """The metrics in Prometheus' text format (every worker's, in multiprocess mode)."""
    if not INSTALLED:
        return f"# prometheus-client is not installed: {install_hint('metrics')}\n".encode()
    if MULTIPROCESS:
        # A fresh registry per scrape, as prometheus-client's multiprocess guide does: the
        # collector reads every worker's files at collect time.
        shared = CollectorRegistry()
        # prometheus-client's multiprocess module is not annotated
        MultiProcessCollector(shared)  # type: ignore[no-untyped-call]
        return generate_latest(shared) + generate_latest(_LOCAL)
    return generate_latest(REGISTRY) + generate_latest(_LOCAL)
