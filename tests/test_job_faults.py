"""Jobs whose broker fails or whose worker dies: they end, their status expires, readers stop.

Units drive ``Jobs`` over an in-process broker that fails on demand (the broker is the only
stand-in here). The end-to-end tests use the real service (gunicorn + gevent) on the real
redis-server: Redis out of memory (``CONFIG SET maxmemory 1``) under a running job, and a job's
worker killed while another service's reader follows it. Every wait is bounded.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson
import pytest
import redis
import requests

import service.jobs
import service.queue
from app import Jobs, create_app
from stream.broker import BrokerUnavailable, MemoryBroker
from stream.event import Envelope
from tests.job_worker import JobWorker, queue_env, start_worker
from tests.service import Service, wait_for

__all__ = ["start_worker"]  # the fixture


class FaultyBroker(MemoryBroker):
    """The in-process broker, whose publishes (and metadata writes) fail when told to."""

    def __init__(self) -> None:
        super().__init__()
        #: event types whose publishes fail
        self.failing_events: set[str] = set()
        #: whether set_meta fails too
        self.failing_meta = False
        self.error: Callable[[str], Exception] = BrokerUnavailable

    def publish(self, key: str, items: Sequence[tuple[str, bytes]]) -> list[str]:
        if any(event in self.failing_events for event, _ in items):
            raise self.error("publishing fails on purpose")
        return super().publish(key, items)

    def set_meta(self, key: str, meta: dict[str, Any], ttl: float | None = None) -> None:
        if self.failing_meta:
            raise self.error("metadata writes fail on purpose")
        super().set_meta(key, meta, ttl)

    def deadline(self, key: str) -> float | None:
        """When ``key`` expires (time.time()), None if never."""
        log = self._logs.get(key)
        return None if log is None else log.deadline


def read_until_final(broker: MemoryBroker, key: str, timeout: float = 10.0) -> list[Envelope]:
    """The whole log of ``key`` up to its first end or error; fails after ``timeout``."""
    sub = broker.subscribe(key, from_start=True)
    out: list[Envelope] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for entry in sub.get(0.1):
                out.append(entry)
                if entry.event in ("end", "error"):
                    return out
        raise AssertionError(f"no end or error within {timeout} s: {out[-3:]}")
    finally:
        sub.close()


@pytest.fixture
def broker() -> Iterator[FaultyBroker]:
    b = FaultyBroker()
    yield b
    b.close()


def test_a_job_whose_broker_keeps_failing_ends_with_an_error_and_failed(
    broker: FaultyBroker,
) -> None:
    jobs = Jobs(broker, ttl=60, broker_timeout=0.5)
    job_id = jobs.start(100, 0.02, 0)
    key = f"job:{job_id}"
    wait_for(lambda: len(read_some(broker, key)) >= 3, timeout=5)
    # Messages fail from now on; the error event still gets through.
    broker.failing_events = {"message"}
    failed_at = time.monotonic()
    log = read_until_final(broker, key)
    assert time.monotonic() - failed_at >= 0.4  # it waited for the broker first
    final = log[-1]
    assert final.event == "error"
    assert orjson.loads(final.data)["error"]["code"] == "broker_unavailable"
    assert [e.event for e in log[:-1]] == ["message"] * (len(log) - 1)
    wait_for(lambda: job_id not in jobs.running, timeout=5)
    meta = broker.get_meta(key)
    assert meta is not None
    assert meta["status"] == "failed" and meta["error"]["code"] == "broker_unavailable"
    assert meta["last_id"] == final.id
    deadline = broker.deadline(key)
    assert deadline is not None and 50 < deadline - time.time() <= 60  # the job TTL


def read_some(broker: MemoryBroker, key: str) -> list[Envelope]:
    sub = broker.subscribe(key, from_start=True)
    try:
        return sub.get(0)
    finally:
        sub.close()


def test_an_unexpected_error_in_a_job_ends_it_failed(broker: FaultyBroker) -> None:
    broker.failing_events = {"message"}
    broker.error = RuntimeError  # not a broker outage: a bug, or an error nobody foresaw
    jobs = Jobs(broker, ttl=60, broker_timeout=5)
    job_id = jobs.start(10, 0, 0)
    log = read_until_final(broker, f"job:{job_id}")
    assert [e.event for e in log] == ["error"]
    assert orjson.loads(log[0].data)["error"]["code"] == "internal_error"
    wait_for(lambda: job_id not in jobs.running, timeout=5)
    meta = broker.get_meta(f"job:{job_id}")
    assert meta is not None and meta["status"] == "failed"


def test_a_job_that_cannot_write_at_all_lets_its_status_expire(broker: FaultyBroker) -> None:
    jobs = Jobs(broker, ttl=60, broker_timeout=0.3)  # a lease of 0.6 s
    job_id = jobs.start(1000, 0.02, 0)
    key = f"job:{job_id}"
    wait_for(lambda: len(read_some(broker, key)) >= 2, timeout=5)
    meta = broker.get_meta(key)
    assert meta is not None and meta["status"] == "running"
    deadline = broker.deadline(key)
    assert deadline is not None and deadline - time.time() <= 0.6  # running: on a lease
    broker.failing_events = {"message", "error"}
    broker.failing_meta = True
    wait_for(lambda: job_id not in jobs.running, timeout=5)  # it gave up
    # Nothing could record its end: the running status expires with its lease.
    wait_for(lambda: broker.get_meta(key) is None, timeout=5)


def test_a_paced_job_renews_its_lease_while_it_sleeps(broker: FaultyBroker) -> None:
    jobs = Jobs(broker, ttl=60, broker_timeout=0.5)  # a lease of 1 s, events 2 s apart
    job_id = jobs.start(3, 2.0, 0)
    key = f"job:{job_id}"
    sub = broker.subscribe(key, from_start=True)
    log: list[Envelope] = []
    missing = 0
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline and not (log and log[-1].event == "end"):
            log += sub.get(0.1)
            # Between two events (2 s) the status outlives its 1 s lease: it was renewed.
            missing += broker.get_meta(key) is None
    finally:
        sub.close()
    assert [e.event for e in log] == ["message"] * 3 + ["end"]
    assert missing == 0
    meta = broker.get_meta(key)
    assert meta is not None and meta["status"] == "done" and meta["last_id"] == log[-1].id


# -- readers of a job that cannot end ----------------------------------------------------------


@pytest.fixture
def fast_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers look at the job's status after 0.2 s of silence instead of 3 s."""
    monkeypatch.setattr(service.jobs, "JOB_CHECK_INTERVAL", 0.2)


def lines_of(body: bytes) -> list[Any]:
    return [orjson.loads(line) for line in body.split(b"\n") if line.strip()]


@pytest.mark.timeout(30)
def test_the_reader_of_a_dead_job_ends_with_job_lost(fast_checks: None) -> None:
    flask_app = create_app({"REDIS_URL": None, "STREAM_JOB_BROKER_TIMEOUT": 0.25})
    broker = flask_app.extensions["stream.broker"]
    try:
        # A job that published one event and died: its running status is on a lease.
        job_id = secrets.token_hex(16)
        key = f"job:{job_id}"
        (first,) = broker.publish(key, [("message", b'{"event_id":0}')])
        broker.set_meta(key, {"status": "running", "count": 5, "last_id": first}, ttl=1.5)
        resp = flask_app.test_client().get(f"/jobs/{job_id}/events")
        assert resp.status_code == 200
        lines = lines_of(resp.get_data())
        assert lines[0]["id"] == first
        assert lines[-1]["error"]["code"] == "job_lost"
    finally:
        broker.close()


@pytest.mark.timeout(30)
def test_the_reader_of_a_failed_job_gets_its_recorded_error(fast_checks: None) -> None:
    flask_app = create_app({"REDIS_URL": None})
    broker = flask_app.extensions["stream.broker"]
    try:
        # The job recorded its failure, but its error event never made it into the log.
        job_id = secrets.token_hex(16)
        key = f"job:{job_id}"
        (first,) = broker.publish(key, [("message", b'{"event_id":0}')])
        error = {"code": "broker_unavailable", "message": "the broker failed"}
        broker.set_meta(key, {"status": "failed", "count": 5, "last_id": first, "error": error})
        lines = lines_of(flask_app.test_client().get(f"/jobs/{job_id}/events").get_data())
        assert [line.get("id") for line in lines[:-1]] == [first]
        assert lines[-1] == {"error": error}
        # Resuming after its last entry: nothing more will come.
        resp = flask_app.test_client().get(
            f"/jobs/{job_id}/events", headers={"Last-Event-ID": first}
        )
        assert resp.status_code == 204
    finally:
        broker.close()


# -- 204 after a job's final event --------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("format", ["ndjson", "sse", "json-seq"])
def test_resuming_after_a_job_s_end_answers_204(service: Service, format: str) -> None:
    job = requests.post(service.url + "/jobs", json={"count": 3, "interval": 0}, timeout=10)
    url = service.url + job.json()["events_url"]
    resp = requests.get(url, params={"format": "ndjson"}, timeout=(5, 10))
    envelopes = lines_of(resp.content)
    assert [e["event"] for e in envelopes] == ["message"] * 3 + ["end"]
    end_id = envelopes[-1]["id"]
    resumed = requests.get(
        url, params={"format": format}, headers={"Last-Event-ID": end_id}, timeout=(5, 10)
    )
    assert resumed.status_code == 204
    assert resumed.content == b""
    # Before the end there is still something to resume: the end itself.
    resumed = requests.get(url, headers={"Last-Event-ID": envelopes[-2]["id"]}, timeout=(5, 10))
    assert resumed.status_code == 200
    assert [e["event"] for e in lines_of(resumed.content)] == ["end"]


# -- end to end: Redis out of memory, a worker killed ---------------------------------------------


def follow_job(url: str, out: list[Any], stop: threading.Event) -> threading.Thread:
    """Read a job's NDJSON stream into ``out`` in a thread (each line decoded)."""

    def run() -> None:
        with requests.get(url, stream=True, timeout=(5, 30)) as resp:
            assert resp.status_code == 200
            buf = b""
            while not stop.is_set():
                chunk = resp.raw.read1(65536)
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                out.extend(orjson.loads(line) for line in lines if line.strip())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def assert_not_stuck_running(r: redis.Redis, key: str) -> None:
    """The job's status is gone, final, or expiring: never "running" for ever (nor its log)."""
    meta_key, log_key = f"stream:meta:{key}", f"stream:log:{key}"
    raw = r.get(meta_key)
    if raw is not None:
        status = json.loads(raw)["status"]
        assert status != "running" or r.pttl(meta_key) > 0, status
        assert r.pttl(meta_key) > 0  # whatever the status: it expires
    assert r.pttl(log_key) in (-2,) or r.pttl(log_key) > 0


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_redis_out_of_memory_under_a_running_job(
    start_service: Callable[..., Service],
    start_worker: Callable[[dict[str, str]], JobWorker],
    redis_url: str,
) -> None:
    env = queue_env(redis_url, STREAM_JOB_BROKER_TIMEOUT="2", STREAM_JOB_REQUEUE_TIMEOUT="2")
    svc = start_service(env)
    start_worker(env)
    r = redis.Redis.from_url(redis_url)
    job = requests.post(svc.url + "/jobs", json={"count": 1000, "interval": 0.1}, timeout=10)
    assert job.status_code == 202
    key = f"job:{job.json()['id']}"
    lines: list[Any] = []
    stop = threading.Event()
    reader = follow_job(svc.url + job.json()["events_url"], lines, stop)
    try:
        wait_for(lambda: len(lines) >= 3, timeout=10)
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", "1")
        full = time.monotonic()
        # The reader gets an error event (the job's own, or its reader's) and its stream ends.
        reader.join(60)
        print(f"reader ended {time.monotonic() - full:.1f} s after Redis filled up: {lines[-1]}")
        assert not reader.is_alive(), f"the reader still waits: {lines[-2:]}"
        assert "error" in lines[-1], lines[-3:]
        assert lines[-1]["error"]["code"] in ("broker_unavailable", "job_lost")
        assert all(line["event"] == "message" for line in lines[:-1])
        assert 3 <= len(lines) - 1 < 1000
        assert_not_stuck_running(r, key)
    finally:
        stop.set()
        r.config_set("maxmemory", "0")
    # Redis back: the job does not come back to life as "running".
    assert_not_stuck_running(r, key)
    assert requests.get(svc.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_readers_of_a_job_no_worker_takes_up_again_end_with_job_lost(
    start_service: Callable[..., Service],
    start_worker: Callable[[dict[str, str]], JobWorker],
    redis_url: str,
) -> None:
    env = queue_env(redis_url, STREAM_JOB_BROKER_TIMEOUT="1", STREAM_JOB_REQUEUE_TIMEOUT="1")
    web, other = start_service(env), start_service(env)
    worker = start_worker(env)
    job = requests.post(web.url + "/jobs", json={"count": 1000, "interval": 0.1}, timeout=10)
    key = f"job:{job.json()['id']}"
    lines: list[Any] = []
    stop = threading.Event()
    reader = follow_job(other.url + job.json()["events_url"], lines, stop)
    try:
        wait_for(lambda: len(lines) >= 3, timeout=10)
        # No shutdown, nothing put back on the queue, and no worker left to take it up: the
        # status outlives the queue's timeout (readers keep waiting meanwhile), then expires.
        worker.kill()
        reader.join(60)
        assert not reader.is_alive(), f"the reader still waits: {lines[-2:]}"
        assert lines[-1]["error"]["code"] == "job_lost"
        assert all(line["event"] == "message" for line in lines[:-1])
    finally:
        stop.set()
    r = redis.Redis.from_url(redis_url)
    assert r.get(f"stream:meta:{key}") is None  # the lease expired
    assert requests.get(other.url + job.json()["events_url"], timeout=5).status_code == 404


class _CountingHooks(service.queue.WorkerHooks):
    """A worker's hooks that count the requeues of the message it runs."""

    requeued = 0

    def requeue_current(self) -> None:
        self.requeued += 1


class _FailingLock:
    def acquire(self) -> bool:
        raise BrokerUnavailable("Redis went away on purpose")

    def release(self) -> None:
        raise AssertionError("a lock never taken is not released")


class _LockQueue:
    """The queue's lock side: every lock fails to be taken (Redis unavailable)."""

    def lock(self, job_id: str, ttl: float) -> _FailingLock:
        return _FailingLock()


@pytest.mark.parametrize("failing", ["status", "lock"])
def test_a_job_taken_up_while_redis_fails_goes_back_on_the_queue(
    broker: FaultyBroker, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    monkeypatch.setattr(service.queue, "REDIS_RETRY", 0.0)
    runner = Jobs(broker, ttl=60, broker_timeout=0.5)
    broker.set_meta("job:j1", {"status": "queued", "job": "demo", "last_id": None}, ttl=60)
    if failing == "status":
        monkeypatch.setattr(broker, "get_meta", _raise_unavailable)
    hooks = _CountingHooks(_LockQueue(), runner)  # type: ignore[arg-type]
    # Acknowledged without a requeue, the message (and the job) would be gone.
    service.queue.run_queued(hooks, runner, "j1", "demo", {"count": 1, "interval": 0, "size": 0})
    assert hooks.requeued == 1
    assert "j1" not in runner.running


def _raise_unavailable(key: str) -> None:
    raise BrokerUnavailable("Redis went away on purpose")
