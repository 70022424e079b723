"""``/metrics`` describes the whole service, whichever of its workers answers the scrape.

Two gevent workers on a real Redis; streams are spread over both (``/healthz`` says which
worker answered and how many streams it holds), and every scrape must count all of them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import pytest
import requests

from tests.service import Service, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

#: more than enough streams for both workers to hold some, in any accept order
MAX_STREAMS = 24
SCRAPES = 8


@pytest.fixture
def two_workers(start_service: Callable[..., Service], redis_url: str) -> Service:
    svc = start_service({"REDIS_URL": redis_url, "WEB_CONCURRENCY": "2"})
    wait_for(lambda: len(svc.worker_pids()) == 2)
    return svc


@pytest.fixture
def streams() -> Iterator[list[requests.Response]]:
    opened: list[requests.Response] = []
    yield opened
    for response in opened:
        response.close()


def _per_worker(svc: Service, expected_total: int) -> dict[int, int]:
    """Open streams per worker pid, once both workers were heard from and they add up."""
    seen: dict[int, int] = {}

    def both_heard() -> bool:
        health = requests.get(svc.url + "/healthz", timeout=5).json()
        seen[health["pid"]] = health["open_streams"]
        return len(seen) == 2 and sum(seen.values()) == expected_total

    wait_for(both_heard, 20, interval=0.01)
    return seen


def _open_streams_scraped(svc: Service) -> float:
    return svc.metrics()["stream_open_streams"]


def test_every_scrape_counts_every_workers_streams(
    two_workers: Service, streams: list[requests.Response]
) -> None:
    svc = two_workers
    channel = svc.url + "/channels/metrics-workers"

    def open_one() -> None:
        response = requests.get(channel, stream=True, timeout=30)
        assert response.status_code == 200
        streams.append(response)

    for _ in range(6):
        open_one()
    per_worker = _per_worker(svc, len(streams))
    while min(per_worker.values()) == 0 and len(streams) < MAX_STREAMS:
        open_one()
        per_worker = _per_worker(svc, len(streams))
    assert min(per_worker.values()) > 0, per_worker  # both workers hold streams

    # Each scrape is a new connection: either worker may answer; all must say the total.
    scraped = [_open_streams_scraped(svc) for _ in range(SCRAPES)]
    assert scraped == [len(streams)] * SCRAPES

    # A worker killed outright takes its streams with it: the master forgets its gauge.
    victim, victims_streams = next(iter(per_worker.items()))
    os.kill(victim, signal.SIGKILL)
    left = len(streams) - victims_streams
    wait_for(lambda: _open_streams_scraped(svc) == left, 20)

    for response in streams:
        response.close()
    wait_for(lambda: _open_streams_scraped(svc) == 0, 20)
    assert [_open_streams_scraped(svc) for _ in range(SCRAPES)] == [0] * SCRAPES


def test_counters_add_up_over_the_workers(two_workers: Service) -> None:
    svc = two_workers
    before = svc.metrics()
    requests_made = 12
    for _ in range(requests_made):  # new connections: spread over the workers
        body = requests.get(svc.url + "/events?count=1&interval=0", timeout=10).text
        assert body.count("\n") == 1

    def added(name: str) -> float:
        return svc.metrics()[name] - before.get(name, 0.0)

    wait_for(lambda: added("stream_events_sent_total") == requests_made, 20)
    assert [added("stream_events_sent_total") for _ in range(SCRAPES)] == [requests_made] * SCRAPES
    assert added("stream_duration_seconds_count") == requests_made
    # this process's own figures come with every scrape, from the worker that answered
    metrics = svc.metrics()
    assert metrics["process_open_fds"] > 0
    assert metrics["stream_greenlets"] > 0
