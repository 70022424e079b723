"""Jobs: the expensive requests, run to their end whether or not anyone listens.

Where a job runs:

- Without ``REDIS_URL`` (the embedded default), in the web process: one thread (a greenlet under
  gevent) per job, ``Jobs.submit``. Its log lives in that process, so a shutdown of the process
  ends the job with an ``interrupted`` error event: it really cannot go on.
- With ``REDIS_URL``, on a job queue (Dramatiq, ``service.queue``) in worker processes
  (``dramatiq service.worker``, the ``Procfile``'s ``worker:`` line). The web processes only
  enqueue (``QueuedJobs``) and stream the log, which is in Redis: restarting or scaling them never
  touches a job. A worker that stops (SIGTERM on a deploy) puts its running jobs back on the queue
  at once; one that dies (a crash, SIGKILL after the platform's grace period) has them put back
  by the queue after ``STREAM_JOB_REQUEUE_TIMEOUT`` seconds without its heartbeat. Either way
  another worker takes the job up and it continues where its log ends.

The log is the job's truth: a job taken up again reads its log, and continues after its last
event. Every event reaches the log once: the runner publishes what the job yields (in batches,
each all or nothing) and stops only between batches. What a job computed after its last
published event is computed again after an interruption (at-least-once work, exactly-once
events).

Writing a job: a function ``(params, ctx)`` that yields JSON values, each published as one event
(``message``) of the job's log; the job's ``end`` follows when it returns, an ``error`` event when
it raises (``RemoteError`` keeps its code and message). It learns where its log ends from
``ctx.last``, the data of the last event already in its log (``None`` on a first run), so each
event should say where it is, as the demo's ``event_id`` does::

    from service.jobs import register_job

    def squares(params, ctx):
        start = 0 if ctx.last is None else ctx.last["n"] + 1
        for n in range(start, params["upto"]):
            ctx.sleep(1.0)  # not time.sleep: keeps the job's lease, stops at once on shutdown
            yield {"n": n, "square": n * n}

    register_job("squares", squares)  # in a module both the web and the worker import
    job_id = app.extensions["stream.jobs"].submit("squares", {"upto": 100})

``params`` must be JSON-able (it travels in the queue's message). A job stops only when it yields
or calls ``ctx.sleep``: yield (or sleep) at least every ``STREAM_JOB_BROKER_TIMEOUT`` seconds,
or a stopping worker may be killed before it puts the job back (the queue then takes it up
after its timeout instead).

Statuses (the job's metadata, ``{"status": ..., "last_id": ...}``): ``queued`` (with Redis,
until a worker takes it, and again when a stopping worker puts it back; expires with the job's
TTL), ``running`` (on a lease, renewed while it runs; with Redis the lease also covers the
queue's time to take up the job of a worker that died),
then ``done``, ``failed`` or ``interrupted`` with the job's TTL. A job whose lease ran out (no
worker could take it up, the broker failed for good) has no status: its readers end with
``job_lost``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import orjson

from service.demo import demo_job
from service.edges import BadRequest
from stream.broker import Broker, BrokerUnavailable, IdTuple, parse_id
from stream.encoders import dumps_compact
from stream.errors import RemoteError

log = logging.getLogger("stream.app")

#: a job's statuses after which nothing more is published
FINAL_STATUSES = frozenset({"done", "failed", "interrupted"})
#: seconds of silence after which a job's reader looks at the job's status
JOB_CHECK_INTERVAL = 3.0
#: events a job publishes at once at most
JOB_BATCH = 1000
#: seconds a yielded event may wait for its batch to fill (a slow job still streams live)
JOB_FLUSH_INTERVAL = 0.05

#: what a job is: ``(params, ctx)`` -> the JSON values it publishes
JobFunction = Callable[[dict[str, Any], "JobContext"], Iterable[Any]]
#: the jobs a worker can run, by name
JOB_FUNCTIONS: dict[str, JobFunction] = {}


def lease_for(broker_timeout: float) -> float:
    """How long a running job's status (and, with Redis, its lock) lasts unless renewed.

    Twice ``broker_timeout``: a job gives up on a failing broker before its status could
    expire under it. The web side (``JobWatch``) and the workers must agree on it.
    """
    return 2 * broker_timeout


def register_job(name: str, fn: JobFunction) -> JobFunction:
    """Make ``fn`` a job ``submit(name, params)`` can start (in the web and in the workers)."""
    JOB_FUNCTIONS[name] = fn
    return fn


register_job("demo", demo_job)


class JobStopped(Exception):
    """The runner is stopping (a shutdown): the job stops between two events."""


class JobTaken(Exception):
    """Another worker holds the job (its lock went elsewhere): this one stops, quietly."""


class BrokerGaveUp(Exception):
    """The job's broker kept failing for longer than the job waits for it."""


class JobLock(Protocol):
    """Who runs a job, with Redis: one worker at a time (``service.queue.RedisJobLock``)."""

    def renew(self) -> bool:
        """Extend the hold; False when another worker holds the job now."""
        ...


class JobContext:
    """What a job function knows of its run: where its log ends, and a sleep that keeps it."""

    __slots__ = ("_job", "last", "last_id")

    def __init__(self, job: Job, last: Any, last_id: str | None) -> None:
        self._job = job
        #: the data of the last event in the job's log (decoded JSON); None on a first run
        self.last = last
        #: that event's id
        self.last_id = last_id

    def sleep(self, seconds: float) -> None:
        """Publish what was yielded, then wait ``seconds``; raises ``JobStopped`` on shutdown."""
        self._job.flush()
        self._job.sleep(seconds)


class Job:
    """One run of a job: publishes its events, renews its lease, always leaves a final status,
    an expiring one, or (stopped) one that lasts until another worker takes it up.

    While it runs, its status (``{"status": "running", ...}``) and its log expire after
    ``Jobs.status_ttl`` seconds unless renewed; the job renews them every quarter lease, also
    while it sleeps between events. A job that stops without an end (its worker killed, its
    broker failing for good) therefore leaves a status that disappears unless a worker takes it
    up again, never one stuck at "running". At its end the status becomes final (``done``,
    ``failed``, ``interrupted``) with ``last_id``, the id of the last entry of its log, and
    expires with the job's TTL.
    """

    __slots__ = (
        "runner",
        "id",
        "key",
        "name",
        "params",
        "lock",
        "last_id",
        "ended",
        "_failing_since",
        "_renew_at",
        "_batch",
        "_flushed_at",
    )

    def __init__(
        self,
        runner: Jobs,
        job_id: str,
        name: str,
        params: dict[str, Any],
        lock: JobLock | None = None,
    ) -> None:
        self.runner = runner
        self.id = job_id
        self.key = f"job:{job_id}"
        self.name = name
        self.params = params
        self.lock = lock
        #: id of the last entry of this job's log
        self.last_id: str | None = None
        #: whether a final status was written (or attempted): nothing may renew "running" then
        self.ended = False
        #: since when every broker call failed (monotonic), None while it works
        self._failing_since: float | None = None
        self._renew_at = time.monotonic() + runner.lease / 4
        self._batch: list[tuple[str, bytes]] = []
        self._flushed_at = time.monotonic()

    def meta(self, status: str, **extra: Any) -> dict[str, Any]:
        """The job's status record."""
        return {
            "status": status,
            "job": self.name,
            "count": self.params.get("count"),
            "last_id": self.last_id,
            **extra,
        }

    def run(self, *, resume: bool = False) -> bool:
        """Run the job (``resume``: after what its log holds). False: it stopped on a shutdown
        and must be taken up again; True: it ended (or another worker holds it)."""
        try:
            last = self._resume() if resume else None
            if self.ended:
                return True
            if resume:
                if last is not None:
                    log.info("job %s continues after entry %s", self.id, self.last_id)
                # Taken up (from the queue, or again): "running" on a fresh lease at once.
                self._renew_at = 0.0
                self._renew()
            self._produce(last)
        except JobStopped:
            return False
        except JobTaken:
            log.warning("job %s: another worker holds it now; this run stops", self.id)
        except BrokerGaveUp as exc:
            log.error(
                "job %s gave up: its broker failed for %g s (%s)",
                self.id,
                self.runner.broker_timeout,
                exc,
            )
            self.fail(
                "broker_unavailable",
                f"the job stopped: its broker failed for {self.runner.broker_timeout:g} s",
            )
        except RemoteError as exc:
            # A job's own error, with a code its readers can act on.
            log.info("job %s failed: %s", self.id, exc)
            self._publish_yielded()
            self.fail(exc.code, exc.message)
        except Exception:
            log.exception("job %s failed", self.id)
            self._publish_yielded()
            self.fail("internal_error", "the job failed on the server")
        finally:
            self.runner.running.pop(self.id, None)
        return True

    def _resume(self) -> tuple[Any, str | None] | None:
        """Read the log: where it ends (data and id of its last event), or None when empty.

        A log that already ends (``end`` or ``error``: the worker died between that entry and
        the final status) only gets its final status.
        """
        broker = self.runner.broker
        sub = self._call(lambda: broker.subscribe(self.key, from_start=True))
        try:
            entries = sub.get(0)
        finally:
            sub.close()
        if not entries:
            return None
        last = entries[-1]
        self.last_id = last.id
        if last.event in ("end", "error"):
            self.ended = True
            if last.event == "end":
                meta = self.meta("done")
            else:
                meta = self.meta("failed", error=orjson.loads(last.data).get("error"))
            self._call(broker.set_meta, self.key, meta, self.runner.ttl, stop=False)
            return None
        return orjson.loads(last.data), last.id

    def _produce(self, last: tuple[Any, str | None] | None) -> None:
        fn = JOB_FUNCTIONS.get(self.name)
        if fn is None:
            raise RemoteError("unknown_job", f"no job is registered as {self.name!r}")
        ctx = JobContext(self, *(last or (None, None)))
        for value in fn(self.params, ctx):
            self._batch.append(("message", dumps_compact(value)))
            if (
                len(self._batch) >= JOB_BATCH
                or time.monotonic() - self._flushed_at >= JOB_FLUSH_INTERVAL
            ):
                self.flush()
                # Let the worker's other greenlets (streams, /healthz) run between batches.
                time.sleep(0)
            elif self.runner.stopping:
                self.flush()
        self.flush()
        self._publish([("end", b'{"status":"done"}')])
        self.ended = True
        # Even while the service stops: the job is done, its status must say so.
        self._call(
            self.runner.broker.set_meta, self.key, self.meta("done"), self.runner.ttl, stop=False
        )

    def flush(self) -> None:
        """Publish what the job yielded so far; raises ``JobStopped`` once stopping.

        While stopping, what was yielded is still published (the next run continues after it),
        unless the job was already ended for good (interrupted: nothing may follow its error).
        """
        if self.runner.stopping:
            if self._batch and not self.ended:
                self._publish(self._batch, stop=False)
                self._batch = []
            raise JobStopped
        if self._batch:
            self._publish(self._batch)
            self._batch = []
        self._flushed_at = time.monotonic()

    def _publish_yielded(self) -> None:
        """Before a failure's error event: what the job yielded until then (best effort)."""
        if not self._batch or self.ended:
            return
        try:
            self.last_id = self.runner.broker.publish(self.key, self._batch)[-1]
        except Exception as exc:  # noqa: BLE001 - the error event still follows if it can
            log.warning("job %s: could not publish its last events (%s)", self.id, exc)
        self._batch = []

    def sleep(self, seconds: float) -> None:
        """Wait between events, renewing the lease (intervals may be longer than the lease)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.runner.stopping:
                raise JobStopped
            # Woken at once by a shutdown.
            self.runner.stopped.wait(min(left, self.runner.lease / 4))
            self._renew()

    def _publish(self, batch: list[tuple[str, bytes]], *, stop: bool = True) -> None:
        ids: list[str] = self._call(self.runner.broker.publish, self.key, batch, stop=stop)
        if self.last_id is None:
            # The log exists only now: put it on the lease too (a log without an expiry would
            # outlive a worker killed before the next renewal).
            self._renew_at = 0.0
        self.last_id = ids[-1]
        self._renew()

    def _renew(self) -> None:
        now = time.monotonic()
        if now < self._renew_at or self.ended or self.runner.stopping:
            return
        self._renew_at = now + self.runner.lease / 4
        try:
            if self.lock is not None and not self.lock.renew():
                raise JobTaken
            self.runner.broker.set_meta(self.key, self.meta("running"), ttl=self.runner.status_ttl)
        except BrokerUnavailable as exc:
            # Tried again at the next renewal; the lease outlasts broker_timeout, so the job
            # gives up (below) before its status can expire under it.
            self._broker_failed(exc)
        else:
            self._failing_since = None

    def _broker_failed(self, exc: BrokerUnavailable) -> float:
        """Count a failed broker call; the seconds left before giving up (raises at 0)."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("job %s: broker unavailable (%s); waiting for it", self.id, exc)
        left = self._failing_since + self.runner.broker_timeout - now
        if left <= 0:
            raise BrokerGaveUp(str(exc)) from exc
        return left

    def _call(self, fn: Callable[..., Any], *args: Any, stop: bool = True) -> Any:
        """``fn(*args)``, retried while the broker is unavailable, for at most broker_timeout.

        ``stop``: raise ``JobStopped`` instead of calling once the runner is stopping.
        """
        delay = 0.05
        while True:
            if stop and self.runner.stopping:
                raise JobStopped
            try:
                result = fn(*args)
            except BrokerUnavailable as exc:
                time.sleep(min(delay, self._broker_failed(exc)))
                delay = min(delay * 2, 2.0)
            else:
                self._failing_since = None
                return result

    def fail(self, code: str, message: str, status: str = "failed") -> None:
        """End the job with an error event and a final status, as far as the broker lets us.

        One attempt each: when the broker fails, the running status keeps its lease and
        expires, and the job's readers end with ``job_lost`` instead.
        """
        if self.ended:
            return
        self.ended = True
        error = {"code": code, "message": message}
        broker = self.runner.broker
        try:
            ids = broker.publish(self.key, [("error", dumps_compact({"error": error}))])
            self.last_id = ids[-1]
        except Exception as exc:  # noqa: BLE001 - best effort, whatever the broker raises
            log.warning("job %s: could not publish its error event (%s)", self.id, exc)
        try:
            broker.set_meta(self.key, self.meta(status, error=error), ttl=self.runner.ttl)
        except Exception as exc:  # noqa: BLE001 - best effort, whatever the broker raises
            log.warning("job %s: could not record status %s (%s); it expires", self.id, status, exc)
            try:
                # Writes may fail where expiries still work (Redis out of memory refuses SET,
                # not PEXPIRE): make sure the log expires with the running status.
                broker.expire(self.key, self.runner.status_ttl)
            except Exception as exc2:  # noqa: BLE001 - the lease set earlier still holds
                log.warning("job %s: could not set its expiry either (%s)", self.id, exc2)


class Jobs:
    """Runs jobs: in the web process (``submit``, without Redis) or a queue's worker (``run``).

    ``broker_timeout``: how long a job waits for a failing broker before it gives up; the lease
    on a running job is twice that, so a job always gives up before its status could expire
    under it, and a dead job's readers learn it within a lease and a check. ``takeover``: how
    much longer a running job's status lasts without renewal, the time a queue needs to take up
    a job whose worker died (0 in the web process, where nobody takes it up).
    """

    def __init__(
        self,
        broker: Broker,
        ttl: float,
        *,
        max_running: int = 64,
        broker_timeout: float = 20.0,
        takeover: float = 0.0,
    ) -> None:
        self.broker = broker
        self.ttl = ttl
        self.max_running = max_running
        self.broker_timeout = broker_timeout
        self.lease = lease_for(broker_timeout)
        self.status_ttl = self.lease + takeover
        self.running: dict[str, Job] = {}
        self.stopping = False
        #: set when stopping: wakes the jobs that sleep between events
        self.stopped = threading.Event()

    def start(self, count: int, interval: float, size: int) -> str:
        """Start the demo job; returns its id, or raises a 503."""
        return self.submit("demo", {"count": count, "interval": interval, "size": size})

    def submit(self, name: str, params: dict[str, Any]) -> str:
        """Start job ``name`` (a thread, a greenlet under gevent); its id, or raises a 503."""
        if self.stopping:
            raise BadRequest(
                "the server is shutting down; start the job again shortly",
                code="shutting_down",
                status=503,
                headers={"Retry-After": "5"},
            )
        if len(self.running) >= self.max_running:
            raise BadRequest(
                f"this worker runs all the jobs it may ({self.max_running}); retry shortly",
                code="too_many_jobs",
                status=503,
                headers={"Retry-After": "5"},
            )
        job = Job(self, secrets.token_hex(16), name, params)
        # The slot is taken before the broker call, which may switch greenlets.
        self.running[job.id] = job
        try:
            self.broker.set_meta(job.key, job.meta("running"), ttl=self.status_ttl)
        except BaseException:
            self.running.pop(job.id, None)
            raise
        thread = threading.Thread(target=job.run, daemon=True, name=f"job-{job.id}")
        thread.start()
        return job.id

    def run(
        self, job_id: str, name: str, params: dict[str, Any], lock: JobLock | None = None
    ) -> bool:
        """Run a job a queue handed over, after what its log holds (see ``Job.run``)."""
        job = Job(self, job_id, name, params, lock)
        self.running[job.id] = job
        return job.run(resume=True)

    def stop(self) -> None:
        """Stop every job between two events (a worker's shutdown: they are taken up again)."""
        self.stopping = True
        self.stopped.set()

    def interrupt_all(self) -> None:
        """On the web process's shutdown: stop every job and mark it interrupted in its log."""
        self.stop()
        for job in list(self.running.values()):
            job.fail("interrupted", "the server stopped this job", status="interrupted")


class JobWatch:
    """What a job's reader checks after a silence: whether the job can still end.

    A reader follows the log until the job's ``end`` or ``error``. If the job died without one
    (its status expired: the worker was killed, or the broker failed), or ended with a final
    status whose last entries never came, the reader ends with an error event of its own
    (``job_lost``, or the job's recorded error) instead of waiting forever.
    """

    __slots__ = ("broker", "key", "lease", "_failing_since", "_waited")

    def __init__(self, broker: Broker, key: str, lease: float) -> None:
        self.broker = broker
        self.key = key
        self.lease = lease
        self._failing_since: float | None = None
        self._waited = False

    def check(self, seen: str | None) -> bool:
        """``seen``: the last id this reader has. True: end quietly (it has everything);
        False: keep waiting; raises ``RemoteError`` when the job can no longer end."""
        try:
            meta = self.broker.get_meta(self.key)
        except BrokerUnavailable:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            if now - self._failing_since >= self.lease:
                raise RemoteError(
                    "broker_unavailable",
                    f"the job's broker has been unreachable for {self.lease:g} s",
                ) from None
            return False
        self._failing_since = None
        if meta is None:
            raise RemoteError(
                "job_lost",
                "the job stopped without an end (its worker or its broker failed)",
            )
        status = meta.get("status")
        if status not in FINAL_STATUSES:
            return False
        last = id_of(meta.get("last_id"))
        behind = last is not None and (seen is None or (id_of(seen) or (0, 0)) < last)
        if behind and not self._waited:
            # Its last entries may still be on their way (a Redis reader catching up).
            self._waited = True
            return False
        if status == "done" and not behind:
            return True  # resumed at the end: nothing more to send
        error = meta.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            raise RemoteError(error["code"], str(error.get("message", "")))
        raise RemoteError("job_lost", "the job ended but its last events did not reach this stream")


def id_of(value: Any) -> IdTuple | None:
    return parse_id(value) if isinstance(value, str) else None
