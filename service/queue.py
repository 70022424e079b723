"""Jobs on a job queue, with ``REDIS_URL``: Dramatiq's Redis broker, worker processes apart.

The web processes enqueue (``QueuedJobs``) and stream the job's log; worker processes
(``dramatiq service.worker``, the ``Procfile``'s ``worker:`` line) run the jobs (``Jobs.run``),
publishing to the same Redis Streams log through the ``stream.broker`` protocol.

Why Dramatiq: it is synchronous, runs jobs in threads of long-lived processes (a job's Redis
connections and its log reader stay warm), acknowledges a message only after its job returned
(a job that never returned is run again, never dropped), and its Redis broker has the recovery
this service needs built in: each worker process sends a heartbeat, and a process silent for
``heartbeat_timeout`` is dead to the others, whose maintenance puts its unacknowledged messages
back on the queue. RQ forks a process per job and, on a worker's death, moves its job to the
failed registry (taking it up again is left to the application); Celery needs ``acks_late``,
``reject_on_worker_lost`` and a visibility timeout that must outlast every job (a job of an hour
taken up again only after an hour) and brings a much larger stack.

What a deploy does to a running job (the platform sends SIGTERM, then SIGKILL after its grace,
about 30 s):

1. Dramatiq's main process passes SIGTERM to its worker processes; ``WorkerHooks`` stops the
   runner: every job publishes what it had yielded and stops between two events.
2. Its message goes back on the queue at once (``requeue``: the worker's own claim on it is
   dropped, atomically), its status becomes ``queued`` again (with the job's TTL: it waits for
   a worker however long the deploy takes) and its lock is released: a worker of the new
   release takes it up within a poll (a second) and continues after the last event of the log.
3. A worker killed before that (SIGKILL, a crash, a lost machine) sends no more heartbeats: after
   ``STREAM_JOB_REQUEUE_TIMEOUT`` seconds the maintenance that every live worker runs (``maintain``,
   a quarter of that timeout apart) puts its messages back; the job's lock has expired by then
   (its lease is shorter), and the job continues the same way.

Meanwhile readers keep following (and see every event once, in order, then ``end``): a job put
back is ``queued``, and a dead worker's job stays ``running`` on a lease that covers the queue's
timeout; only a job nobody took up within that time ends its readers with ``job_lost``.

One worker at a time: a message can be delivered twice (a worker that was only slow, not dead,
whose heartbeat the others missed), so a run first takes the job's lock in Redis (``SET NX`` with
the job's lease, renewed with its status). A second delivery waits for the lock at most a lease
(the holder may have died) and is dropped when a live holder keeps it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware

from service.edges import BadRequest
from service.jobs import FINAL_STATUSES, Jobs, lease_for
from stream.broker import Broker, BrokerUnavailable

log = logging.getLogger("stream.app")

#: the actor every job message names
ACTOR = "stream.run_job"
#: Redis keys of the queue (Dramatiq's) and of the jobs' locks start with this
NAMESPACE = "stream-jobs"
#: seconds between two looks at a job's lock while another run holds it
LOCK_POLL = 0.2
#: seconds a job waits before going back on the queue when Redis failed as it was taken up
REDIS_RETRY = 1.0

_RENEW = """
if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("pexpire", KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call("get", KEYS[1]) == ARGV[1] then
  return redis.call("del", KEYS[1])
end
return 0
"""


@contextmanager
def _translated() -> Iterator[None]:
    """Redis failures as ``BrokerUnavailable`` (answered 503, waited for by jobs)."""
    try:
        yield
    except redis.RedisError as exc:
        raise BrokerUnavailable(str(exc)) from exc


class _RedisBroker(RedisBroker):
    """Dramatiq's Redis broker, with maintenance on demand (``maintain``) besides its chance."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._forced = threading.local()

    def _should_do_maintenance(self, command: str) -> int:
        if getattr(self._forced, "on", False):
            return 1
        return int(super()._should_do_maintenance(command))

    def maintain(self, queue_name: str) -> None:
        """Send this process's heartbeat and put dead workers' messages back on the queue."""
        self._forced.on = True
        try:
            self.do_qsize(queue_name)
        finally:
            self._forced.on = False


class JobQueue:
    """The queue jobs travel on: Dramatiq's Redis broker, and the jobs' locks.

    ``requeue_timeout``: seconds without a heartbeat after which a worker process is dead and
    its jobs go back on the queue (Dramatiq's ``heartbeat_timeout``).
    """

    def __init__(self, url: str, *, name: str = "jobs", requeue_timeout: float = 30.0) -> None:
        self.name = name
        self.requeue_timeout = requeue_timeout
        self.broker = _RedisBroker(
            url=url,
            # None of Dramatiq's default middleware: no retries (a job that failed published its
            # error event: running it again would add to a finished log), no time limit (jobs
            # take minutes), no age limit (a queued job waits for a worker, however long).
            middleware=[],
            namespace=NAMESPACE,
            heartbeat_timeout=int(requeue_timeout * 1000),
        )
        self.broker.declare_queue(name)
        self.client: redis.Redis = self.broker.client
        self._renew = self.client.register_script(_RENEW)
        self._release = self.client.register_script(_RELEASE)

    @property
    def takeover(self) -> float:
        """Seconds a dead worker's job may wait before a live worker takes it up again."""
        # The timeout, the maintenance that notices it (a quarter of it apart), a fetch.
        return self.requeue_timeout * 1.25 + 2.0

    def enqueue(self, job_id: str, name: str, params: dict[str, Any]) -> None:
        """Put a job on the queue."""
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=self.name,
            actor_name=ACTOR,
            args=(job_id, name, params),
            kwargs={},
            options={},
        )
        with _translated():
            self.broker.enqueue(message)

    def pending(self) -> int:
        """Jobs on the queue or running (messages not yet acknowledged)."""
        with _translated():
            return int(self.client.hlen(f"{NAMESPACE}:{self.name}.msgs"))

    def lock(self, job_id: str, ttl: float) -> RedisJobLock:
        """A lock on running job ``job_id`` (not taken yet)."""
        return RedisJobLock(self, job_id, ttl)

    def maintain(self) -> None:
        """This process's heartbeat, and dead workers' jobs back on the queue."""
        self.broker.maintain(self.name)


class RedisJobLock:
    """One run's hold on a job: ``SET NX`` with a lease, renewed with the job's status."""

    def __init__(self, queue: JobQueue, job_id: str, ttl: float) -> None:
        self.queue = queue
        self.key = f"{NAMESPACE}:lock:{job_id}"
        self.ttl_ms = max(1, int(ttl * 1000))
        self.token = secrets.token_hex(8)

    def acquire(self) -> bool:
        """Take the job if nobody holds it."""
        with _translated():
            return bool(self.queue.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Extend the hold; False when another run holds the job now."""
        with _translated():
            return bool(self.queue._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        """Let the next run take the job at once (best effort: it expires anyway)."""
        try:
            self.queue._release(keys=[self.key], args=[self.token])
        except redis.RedisError as exc:
            log.warning("could not release %s (%s); it expires", self.key, exc)


class QueuedJobs:
    """The web side with Redis: jobs go on the queue; the bound is on the queue's length."""

    def __init__(
        self,
        broker: Broker,
        queue: JobQueue,
        ttl: float,
        *,
        max_pending: int = 64,
        broker_timeout: float = 20.0,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.ttl = ttl
        self.max_pending = max_pending
        self.lease = lease_for(broker_timeout)

    def start(self, count: int, interval: float, size: int) -> str:
        """Queue the demo job; returns its id, or raises a 503."""
        return self.submit("demo", {"count": count, "interval": interval, "size": size})

    def submit(self, name: str, params: dict[str, Any]) -> str:
        """Queue job ``name``; returns its id, or raises a 503 when the queue is full."""
        if self.queue.pending() >= self.max_pending:
            raise BadRequest(
                f"all the jobs the service may hold ({self.max_pending}) are queued or "
                "running; retry shortly",
                code="too_many_jobs",
                status=503,
                headers={"Retry-After": "5"},
            )
        job_id = secrets.token_hex(16)
        key = f"job:{job_id}"
        meta = {"status": "queued", "job": name, "count": params.get("count"), "last_id": None}
        # Known before a worker takes it: its readers wait for it (it lasts the job's TTL).
        self.broker.set_meta(key, meta, ttl=self.ttl)
        try:
            self.queue.enqueue(job_id, name, params)
        except BrokerUnavailable:
            try:
                self.broker.expire(key, 0.001)
            except BrokerUnavailable:
                pass  # it expires with the job's TTL
            raise
        return job_id

    def interrupt_all(self) -> None:
        """Nothing to interrupt: no job runs in a web process."""


class WorkerHooks(Middleware):
    """A worker process's side of the queue: heartbeats and maintenance, the runner's stop, and
    the message each thread runs (to put it back on the queue when its job stops)."""

    def __init__(self, queue: JobQueue, runner: Jobs) -> None:
        self.queue = queue
        self.runner = runner
        self.worker: dramatiq.Worker | None = None
        self.current = threading.local()
        self._stop = threading.Event()

    def before_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        # A job holds its thread for minutes: fetch no more than the threads can run, so a
        # queued job never waits in this worker's buffer while another worker is idle
        # (Dramatiq prefetches twice its threads by default, for short tasks).
        worker.queue_prefetch = worker.worker_threads

    def after_worker_boot(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self.worker = worker
        threading.Thread(target=self._keep, name="stream-job-heartbeat", daemon=True).start()

    def before_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        log.info("stopping: running jobs go back on the queue")
        # No more fetches: a job put back on the queue must wait there for another worker,
        # not be fetched again by this one (Dramatiq's consumers keep polling until the
        # worker threads are done, and a fetched message is only recovered by the timeout).
        for thread in worker.consumers.values():
            consumer = getattr(thread, "consumer", None)
            if consumer is not None and hasattr(consumer, "prefetch"):
                consumer.prefetch = 0
        self.runner.stop()

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: dramatiq.Worker) -> None:
        self._stop.set()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.current.message = message

    def _keep(self) -> None:
        """Heartbeats even while every thread runs a long job (Dramatiq's consumer sends them
        only when it fetches, and it stops fetching once its prefetch is taken), and the
        maintenance that takes dead workers' jobs up again within a quarter of the timeout."""
        interval = max(0.1, self.queue.requeue_timeout / 4)
        while not self._stop.wait(interval):
            try:
                self.queue.maintain()
            except redis.RedisError as exc:
                log.warning("job queue heartbeat failed (%s)", exc)

    def requeue_current(self) -> None:
        """Put the message this thread runs back on the queue (its ack then does nothing)."""
        message = getattr(self.current, "message", None)
        if self.worker is None or message is None:
            return
        consumer = self.worker.consumers.get(message.queue_name)
        if consumer is None:
            return
        try:
            consumer.requeue_messages([message])
        except Exception as exc:  # noqa: BLE001 - the queue's timeout takes it up anyway
            log.warning("could not requeue job message (%s); its timeout will", exc)


def run_queued(
    hooks: WorkerHooks, runner: Jobs, job_id: str, name: str, params: dict[str, Any]
) -> None:
    """The actor's body: take the job's lock, run it after its log, requeue it if it stopped."""
    if runner.stopping:
        hooks.requeue_current()
        return
    key = f"job:{job_id}"
    queue = hooks.queue
    lock = queue.lock(job_id, runner.lease)
    try:
        meta = runner.broker.get_meta(key)
        if meta is None:
            log.warning("job %s: its status expired before a worker took it up; dropped", job_id)
            return
        if meta.get("status") in FINAL_STATUSES:
            return
        # A previous run may still hold it (a worker that died: its lock expires within a lease).
        deadline = time.monotonic() + runner.lease + 1.0
        while not lock.acquire():
            if runner.stopping:
                hooks.requeue_current()
                return
            if time.monotonic() >= deadline:
                log.warning("job %s: another worker runs it; this delivery is dropped", job_id)
                return
            runner.stopped.wait(LOCK_POLL)
    except BrokerUnavailable as exc:
        # Returning would acknowledge the message (no retries middleware): the job would be
        # lost and its readers would wait for job_lost. Back on the queue instead, after a
        # pause so that a Redis outage does not turn into a fetch-and-requeue loop.
        log.warning(
            "job %s: Redis unavailable before it started (%s); back on the queue", job_id, exc
        )
        runner.stopped.wait(REDIS_RETRY)
        hooks.requeue_current()
        return
    log.info("job %s: running here", job_id)
    try:
        ended = runner.run(job_id, name, params, lock)
        if not ended:
            # Back on the queue: it waits for a worker as a new job does (a deploy that
            # takes long, or no worker for a while, must not lose it), not on a dead run's lease.
            try:
                meta = runner.broker.get_meta(key) or {}
                runner.broker.set_meta(key, {**meta, "status": "queued"}, ttl=runner.ttl)
            except BrokerUnavailable:
                pass  # its running lease still covers a prompt takeover
    finally:
        lock.release()
    if not ended:
        log.info("job %s stopped with its worker; back on the queue", job_id)
        hooks.requeue_current()


def build_worker(config: dict[str, Any], broker: Broker) -> tuple[JobQueue, Jobs, WorkerHooks]:
    """A worker process's queue, runner and hooks, with the actor declared on its broker."""
    queue = JobQueue(
        config["REDIS_URL"],
        name=config["STREAM_JOB_QUEUE"],
        requeue_timeout=config["STREAM_JOB_REQUEUE_TIMEOUT"],
    )
    runner = Jobs(
        broker,
        config["STREAM_JOB_TTL"],
        broker_timeout=config["STREAM_JOB_BROKER_TIMEOUT"],
        takeover=queue.takeover,
    )
    hooks = WorkerHooks(queue, runner)
    queue.broker.add_middleware(hooks)

    def run_job(job_id: str, name: str, params: dict[str, Any]) -> None:
        run_queued(hooks, runner, job_id, name, params)

    dramatiq.actor(actor_name=ACTOR, queue_name=queue.name, broker=queue.broker)(run_job)
    return queue, runner, hooks
