"""Jobs on the job queue (with Redis): web and worker processes apart, jobs that outlive both.

Units drive the runner (``Jobs.run``, what a worker does with a job) over the in-process broker:
a job taken up again continues after its log, a user's job learns where its log ends, a failing
job ends with its error event. The end-to-end tests start what the ``Procfile`` says (``gunicorn
wsgi:app`` with gevent workers, and the ``worker:`` line) on a real redis-server, each test on a
queue of its own, with the queue's timeout for dead workers at 2 s: the web restarted mid-job,
the worker stopped (SIGTERM) and started mid-job, a worker killed (SIGKILL), two workers. Readers
use ``stream.Client``; every wait is bounded.
"""

from __future__ import annotations

import re
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
import requests

from service.jobs import JobContext, Jobs, register_job
from stream import Client
from stream.broker import MemoryBroker
from stream.errors import RemoteError
from stream.event import Envelope
from tests.job_worker import JobWorker, procfile_command, queue_env, start_worker
from tests.service import Service, wait_for

__all__ = ["start_worker"]  # the fixture, for the tests below

DEMO = "demo"


def read_log(broker: MemoryBroker, key: str) -> list[Envelope]:
    """What the log of ``key`` holds now."""
    sub = broker.subscribe(key, from_start=True)
    try:
        return sub.get(0)
    finally:
        sub.close()


def event_ids(log: list[Envelope]) -> list[int]:
    return [orjson.loads(e.data)["event_id"] for e in log if e.event == "message"]


@pytest.fixture
def broker() -> Iterator[MemoryBroker]:
    b = MemoryBroker()
    yield b
    b.close()


# -- the runner, in process ------------------------------------------------------------------


def test_a_job_taken_up_again_continues_after_its_log(broker: MemoryBroker) -> None:
    job_id = secrets.token_hex(16)
    key = f"job:{job_id}"
    # What a previous run (a worker that died) left: five events, a running status.
    broker.publish(key, [("message", orjson.dumps({"event_id": i})) for i in range(5)])
    broker.set_meta(key, {"status": "running", "last_id": None}, ttl=30)
    runner = Jobs(broker, ttl=60, broker_timeout=1, takeover=5)
    assert runner.run(job_id, DEMO, {"count": 10, "interval": 0, "size": 0}) is True
    log = read_log(broker, key)
    assert event_ids(log) == list(range(10))
    assert log[-1].event == "end"
    meta = broker.get_meta(key)
    assert meta is not None and meta["status"] == "done" and meta["last_id"] == log[-1].id


def test_a_log_that_already_ended_only_gets_its_final_status(broker: MemoryBroker) -> None:
    job_id = secrets.token_hex(16)
    key = f"job:{job_id}"
    broker.publish(key, [("message", b'{"event_id":0}'), ("end", b'{"status":"done"}')])
    broker.set_meta(key, {"status": "running", "last_id": None}, ttl=30)
    runner = Jobs(broker, ttl=60, broker_timeout=1)
    assert runner.run(job_id, DEMO, {"count": 10, "interval": 0, "size": 0}) is True
    log = read_log(broker, key)
    assert [e.event for e in log] == ["message", "end"]
    meta = broker.get_meta(key)
    assert meta is not None and meta["status"] == "done" and meta["last_id"] == log[-1].id


def _counting(params: dict[str, Any], ctx: JobContext) -> Iterator[dict[str, int]]:
    """A user's job: counts to ``upto``, continuing after the last number of its log."""
    start = 0 if ctx.last is None else ctx.last["n"] + 1
    for n in range(start, params["upto"]):
        if n > start:
            ctx.sleep(0.02)
        yield {"n": n}


register_job("test-counting", _counting)


@pytest.mark.timeout(30)
def test_a_user_job_stopped_by_a_shutdown_continues_where_its_log_ends(
    broker: MemoryBroker,
) -> None:
    job_id = secrets.token_hex(16)
    key = f"job:{job_id}"
    broker.set_meta(key, {"status": "queued", "last_id": None}, ttl=60)
    first = Jobs(broker, ttl=60, broker_timeout=1, takeover=5)
    outcome: list[bool] = []
    thread = threading.Thread(
        target=lambda: outcome.append(first.run(job_id, "test-counting", {"upto": 200}))
    )
    thread.start()
    wait_for(lambda: len(read_log(broker, key)) >= 5, timeout=10)
    first.stop()  # its worker's SIGTERM
    thread.join(10)
    assert outcome == [False]  # stopped: to be taken up again
    stopped_at = read_log(broker, key)
    assert all(e.event == "message" for e in stopped_at)
    meta = broker.get_meta(key)
    assert meta is not None and meta["status"] == "running"  # waiting for its next run
    second = Jobs(broker, ttl=60, broker_timeout=1, takeover=5)
    assert second.run(job_id, "test-counting", {"upto": 200}) is True
    log = read_log(broker, key)
    assert [orjson.loads(e.data)["n"] for e in log[:-1]] == list(range(200))
    assert log[-1].event == "end" and len(stopped_at) < 200


@pytest.mark.timeout(60)
def test_an_unpaced_job_stopped_mid_batch_publishes_every_event_once() -> None:
    count = 200_000
    big = MemoryBroker(max_len=count + 10, queue_size=count + 10)
    try:
        job_id = secrets.token_hex(16)
        key = f"job:{job_id}"
        big.set_meta(key, {"status": "queued", "last_id": None}, ttl=60)
        params = {"count": count, "interval": 0, "size": 0}
        first = Jobs(big, ttl=60, broker_timeout=1, takeover=5)
        outcome: list[bool] = []
        thread = threading.Thread(target=lambda: outcome.append(first.run(job_id, DEMO, params)))
        thread.start()
        wait_for(lambda: len(read_log(big, key)) >= 1000, timeout=20, interval=0.001)
        first.stop()
        thread.join(20)
        stopped_at = len(read_log(big, key))
        assert Jobs(big, ttl=60, broker_timeout=1, takeover=5).run(job_id, DEMO, params)
        log = read_log(big, key)
        assert event_ids(log) == list(range(count)) and log[-1].event == "end"
        print(f"stopped after {stopped_at} events: {outcome}")
        assert outcome == [False] or stopped_at == count + 1  # it may have finished first
    finally:
        big.close()


def _failing(params: dict[str, Any], ctx: JobContext) -> Iterator[int]:
    yield 1
    yield 2
    raise RemoteError("out_of_stock", "nothing left to count")


register_job("test-failing", _failing)


def test_a_failing_job_ends_its_log_with_its_error_event(broker: MemoryBroker) -> None:
    job_id = secrets.token_hex(16)
    key = f"job:{job_id}"
    broker.set_meta(key, {"status": "queued", "last_id": None}, ttl=60)
    assert Jobs(broker, ttl=60, broker_timeout=1).run(job_id, "test-failing", {}) is True
    log = read_log(broker, key)
    assert [e.event for e in log] == ["message", "message", "error"]
    error = {"code": "out_of_stock", "message": "nothing left to count"}
    assert orjson.loads(log[-1].data) == {"error": error}
    meta = broker.get_meta(key)
    assert meta is not None and meta["status"] == "failed" and meta["error"] == error


def test_an_unknown_job_fails_with_an_error_event(broker: MemoryBroker) -> None:
    job_id = secrets.token_hex(16)
    assert Jobs(broker, ttl=60, broker_timeout=1).run(job_id, "no-such-job", {}) is True
    (error,) = read_log(broker, f"job:{job_id}")
    assert error.event == "error" and orjson.loads(error.data)["error"]["code"] == "unknown_job"


@pytest.mark.timeout(30)
def test_without_redis_a_shutdown_marks_running_jobs_interrupted(broker: MemoryBroker) -> None:
    jobs = Jobs(broker, ttl=60, broker_timeout=1)
    job_id = jobs.start(100, 0.05, 0)
    key = f"job:{job_id}"
    wait_for(lambda: len(read_log(broker, key)) >= 2, timeout=10)
    jobs.interrupt_all()
    wait_for(lambda: job_id not in jobs.running, timeout=10)
    log = read_log(broker, key)
    assert log[-1].event == "error"
    assert orjson.loads(log[-1].data)["error"]["code"] == "interrupted"
    assert [e.event for e in log[:-1]] == ["message"] * (len(log) - 1)
    meta = broker.get_meta(key)
    assert meta is not None and meta["status"] == "interrupted"


def test_the_procfile_runs_the_web_and_the_worker() -> None:
    assert procfile_command("web")[:2] == ["gunicorn", "wsgi:app"]
    assert procfile_command("worker")[:2] == ["dramatiq", "service.worker"]


# -- end to end: web and worker processes on a real Redis --------------------------------------

#: the queue's timeout for dead workers, and the jobs' broker timeout (a lease of 2 s)
FAST = {"STREAM_JOB_REQUEUE_TIMEOUT": "2", "STREAM_JOB_BROKER_TIMEOUT": "1"}


class Reader:
    """Follows a job with ``stream.Client`` in a thread: its values, then how it ended."""

    def __init__(self, base_url: str, path: str) -> None:
        self.values: list[Any] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(base_url, path), daemon=True)
        self.thread.start()

    def _run(self, base_url: str, path: str) -> None:
        try:
            with Client(base_url, timeout=(5, 30), backoff_max=1.0, max_attempts=30) as client:
                for value in client.stream(path):
                    self.values.append(value)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout: float) -> list[Any]:
        """The values, once the stream ended (fails on a timeout or an error)."""
        assert self.done.wait(timeout), f"still reading after {timeout} s: {self.values[-2:]}"
        assert self.error is None, f"{self.error!r} after {self.values[-2:]}"
        return self.values

    def ids(self) -> list[int]:
        return [v["event_id"] for v in self.values]


def start_job(svc: Service, count: int, interval: float) -> tuple[str, str]:
    """POST /jobs: the job's id and its events' path."""
    resp = requests.post(svc.url + "/jobs", json={"count": count, "interval": interval}, timeout=10)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    return body["id"], body["events_url"]


def runs_of(job_id: str, *workers: JobWorker) -> int:
    """How many times the workers took ``job_id`` up."""
    return sum(w.log().count(f"job {job_id}: running here") for w in workers)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_the_web_only_enqueues_and_the_queue_is_bounded(
    start_service: Callable[..., Service],
    start_worker: Callable[[dict[str, str]], JobWorker],
    redis_url: str,
) -> None:
    env = queue_env(redis_url, STREAM_MAX_JOBS="2", **FAST)
    svc = start_service(env)
    first, first_path = start_job(svc, 3, 0)
    second, second_path = start_job(svc, 3, 0)
    full = requests.post(svc.url + "/jobs", json={"count": 3}, timeout=10)
    assert full.status_code == 503 and full.headers["Retry-After"]
    assert full.json()["error"]["code"] == "too_many_jobs"
    r = redis.Redis.from_url(redis_url)
    meta = orjson.loads(r.get(f"stream:meta:job:{first}") or b"null")
    assert meta["status"] == "queued" and r.pttl(f"stream:meta:job:{first}") > 0
    # Nothing runs them in the web: their readers wait (no job_lost) until a worker comes.
    readers = [Reader(svc.url, first_path), Reader(svc.url, second_path)]
    worker = start_worker(env)
    for reader in readers:
        assert reader.wait(30) == [
            {"event_id": i, "data": d, "is_last_event": i == 2}
            for i, d in enumerate(["some data", "some more data", "and more"])
        ]
    assert runs_of(first, worker) == runs_of(second, worker) == 1
    assert "running here" not in svc.log()
    # The queue is empty again: new jobs are accepted.
    wait_for(lambda: requests.post(svc.url + "/jobs", json={}, timeout=10).status_code == 202)


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_restarting_the_web_leaves_a_running_job_untouched(
    start_service: Callable[..., Service],
    start_worker: Callable[[dict[str, str]], JobWorker],
    redis_url: str,
) -> None:
    env = queue_env(redis_url, WEB_CONCURRENCY="2", **FAST)
    web = start_service(env)
    worker = start_worker(env)
    job_id, path = start_job(web, 40, 0.1)
    reader = Reader(web.url, path)
    wait_for(lambda: len(reader.values) >= 5, timeout=20)
    port = web.port
    assert web.stop(signal.SIGTERM, timeout=20) == 0
    start_service(env, port=port)  # the new release, on the same address
    assert reader.wait(60) and reader.ids() == list(range(40))
    assert runs_of(job_id, worker) == 1
    assert "back on the queue" not in worker.log()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_worker_stopped_mid_job_hands_it_to_the_next_one(
    start_service: Callable[..., Service],
    start_worker: Callable[[dict[str, str]], JobWorker],
    redis_url: str,
) -> None:
    env = queue_env(redis_url, **FAST)
    web = start_service(env)
    old = start_worker(env)
    job_id, path = start_job(web, 40, 0.1)
    reader = Reader(web.url, path)
    wait_for(lambda: len(reader.values) >= 5, timeout=20)
    assert old.stop(timeout=25) == 0  # SIGTERM to every process, as a deploy does
    assert f"job {job_id} stopped with its worker; back on the queue" in old.log()
    # It waits on the queue, as a new job does, however long the next worker takes.
    meta_key = f"stream:meta:job:{job_id}"
    r = redis.Redis.from_url(redis_url)
    assert orjson.loads(r.get(meta_key) or b"null")["status"] == "queued"
    assert r.pttl(meta_key) > 600_000
    stopped_at = len(reader.values)
    new = start_worker(env)
    assert reader.wait(60) and reader.ids() == list(range(40))
    assert stopped_at < 40
    assert f"job {job_id} continues after entry" in new.log()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_killed_worker_s_job_is_taken_up_after_the_queue_s_timeout(
    start_service: Callable[..., Service],
    start_worker: Callable[[dict[str, str]], JobWorker],
    redis_url: str,
) -> None:
    env = queue_env(redis_url, **FAST)
    web = start_service(env)
    workers = [start_worker(env), start_worker(env)]
    job_id, path = start_job(web, 60, 0.1)
    reader = Reader(web.url, path)
    wait_for(lambda: len(reader.values) >= 5 and runs_of(job_id, *workers) == 1, timeout=20)
    (runner,) = [w for w in workers if runs_of(job_id, w)]
    (other,) = [w for w in workers if w is not runner]
    runner.kill()  # SIGKILL to all its processes: nothing is put back, no status written
    killed_at, seen = time.monotonic(), len(reader.values)
    wait_for(lambda: len(reader.values) > seen + 1, timeout=30)
    print(f"taken up again {time.monotonic() - killed_at:.1f} s after the SIGKILL")
    assert reader.wait(60) and reader.ids() == list(range(60))
    assert runs_of(job_id, other) == 1 and f"job {job_id} continues after entry" in other.log()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_two_workers_run_each_job_once(
    start_service: Callable[..., Service],
    start_worker: Callable[[dict[str, str]], JobWorker],
    redis_url: str,
) -> None:
    env = queue_env(redis_url, WEB_CONCURRENCY="2", **FAST)
    web = start_service(env)
    workers = [start_worker(env), start_worker(env)]
    jobs = [start_job(web, 20, 0.05) for _ in range(8)]
    readers = [Reader(web.url, path) for _, path in jobs]
    for reader in readers:
        assert reader.wait(60) and reader.ids() == list(range(20))
    for job_id, _ in jobs:
        assert runs_of(job_id, *workers) == 1
    ran = [len(re.findall(r"running here", w.log())) for w in workers]
    print(f"jobs run by each worker: {ran}")
    assert sum(ran) == len(jobs)
