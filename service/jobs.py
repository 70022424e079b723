"""Jobs."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from service.demo import generate_events
from service.edges import BadRequest
from stream.broker import Broker, BrokerUnavailable, IdTuple, parse_id
from stream.encoders import dumps_compact
from stream.errors import RemoteError

log = logging.getLogger("stream.app")

# -- jobs -----------------------------------------------------------------------------------

#: a job's statuses after which nothing more is published
FINAL_STATUSES = frozenset({"done", "failed", "interrupted"})
#: seconds of silence after which a job's reader looks at the job's status
JOB_CHECK_INTERVAL = 3.0
#: events a job without an interval publishes at once
JOB_BATCH = 1000


class JobStopped(Exception):
    """The service is shutting down: ``Jobs.interrupt_all`` marks the job."""


class BrokerGaveUp(Exception):
    """The job's broker kept failing for longer than the job waits for it."""


class Job:
    """One running job: publishes its events, renews its lease, always ends in a final status.

    While it runs, its status (``{"status": "running", ...}``) and its log expire after
    ``Jobs.lease`` seconds unless renewed; the job renews them every quarter lease, also while it
    sleeps between events. A job that stops without an end (its worker killed, its broker failing
    for good) therefore leaves a status that disappears, never one stuck at "running". At its end
    the status becomes final (``done``, ``failed``, ``interrupted``) with ``last_id``, the id of
    the last entry of its log, and expires with the job's TTL.
    """

    __slots__ = ("jobs", "id", "key", "count", "last_id", "ended", "_failing_since", "_renew_at")

    def __init__(self, jobs: Jobs, job_id: str, count: int) -> None:
        self.jobs = jobs
        self.id = job_id
        self.key = f"job:{job_id}"
        self.count = count
        #: id of the last entry this job got into its log
        self.last_id: str | None = None
        #: whether a final status was written (or attempted): nothing may renew "running" then
        self.ended = False
        #: since when every broker call failed (monotonic), None while it works
        self._failing_since: float | None = None
        self._renew_at = time.monotonic() + jobs.lease / 4

    def meta(self, status: str, **extra: Any) -> dict[str, Any]:
        """The job's status record."""
        return {"status": status, "count": self.count, "last_id": self.last_id, **extra}

    def run(self, interval: float, size: int) -> None:
        """Produce the events, then the end; every way out leaves a final or expiring status."""
        try:
            self._produce(interval, size)
        except JobStopped:
            pass  # interrupt_all marked it
        except BrokerGaveUp as exc:
            log.error(
                "job %s gave up: its broker failed for %g s (%s)",
                self.id,
                self.jobs.broker_timeout,
                exc,
            )
            self.fail(
                "broker_unavailable",
                f"the job stopped: its broker failed for {self.jobs.broker_timeout:g} s",
            )
        except Exception:
            log.exception("job %s failed", self.id)
            self.fail("internal_error", "the job failed on the server")
        finally:
            self.jobs.running.pop(self.id, None)

    def _produce(self, interval: float, size: int) -> None:
        batch: list[tuple[str, bytes]] = []
        # Without sleeps: the pace is kept here, where the lease can be renewed meanwhile.
        for i, event in enumerate(generate_events(self.count, 0.0, size)):
            if i and interval:
                self._sleep(interval)
            if self.jobs.stopping:
                raise JobStopped
            batch.append(("message", dumps_compact(event)))
            # Without an interval the job is CPU-bound: publish in batches, not per event.
            if interval or len(batch) >= JOB_BATCH:
                self._publish(batch)
                batch = []
                if not interval:
                    # Let the worker's other greenlets (streams, /healthz) run between batches.
                    time.sleep(0)
        if batch:
            self._publish(batch)
        self._publish([("end", b'{"status":"done"}')])
        self.ended = True
        # Even while the service stops: the job is done, its status must say so.
        self._call(
            self.jobs.broker.set_meta, self.key, self.meta("done"), self.jobs.ttl, stop=False
        )

    def _sleep(self, seconds: float) -> None:
        """Wait between events, renewing the lease (intervals may be longer than the lease)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.jobs.stopping:
                raise JobStopped
            time.sleep(min(left, self.jobs.lease / 4))
            self._renew()

    def _publish(self, batch: list[tuple[str, bytes]]) -> None:
        ids: list[str] = self._call(self.jobs.broker.publish, self.key, batch)
        if self.last_id is None:
            # The log exists only now: put it on the lease too (a log without an expiry would
            # outlive a worker killed before the next renewal).
            self._renew_at = 0.0
        self.last_id = ids[-1]
        self._renew()

    def _renew(self) -> None:
        now = time.monotonic()
        if now < self._renew_at or self.ended or self.jobs.stopping:
            return
        self._renew_at = now + self.jobs.lease / 4
        try:
            self.jobs.broker.set_meta(self.key, self.meta("running"), ttl=self.jobs.lease)
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
        left = self._failing_since + self.jobs.broker_timeout - now
        if left <= 0:
            raise BrokerGaveUp(str(exc)) from exc
        return left

    def _call(self, fn: Callable[..., Any], *args: Any, stop: bool = True) -> Any:
        """``fn(*args)``, retried while the broker is unavailable, for at most broker_timeout.

        ``stop``: raise ``JobStopped`` instead of calling once the service is stopping.
        """
        delay = 0.05
        while True:
            if stop and self.jobs.stopping:
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
        broker = self.jobs.broker
        try:
            ids = broker.publish(self.key, [("error", dumps_compact({"error": error}))])
            self.last_id = ids[-1]
        except Exception as exc:  # noqa: BLE001 - best effort, whatever the broker raises
            log.warning("job %s: could not publish its error event (%s)", self.id, exc)
        try:
            broker.set_meta(self.key, self.meta(status, error=error), ttl=self.jobs.ttl)
        except Exception as exc:  # noqa: BLE001 - best effort, whatever the broker raises
            log.warning("job %s: could not record status %s (%s); it expires", self.id, status, exc)
            try:
                # Writes may fail where expiries still work (Redis out of memory refuses SET,
                # not PEXPIRE): make sure the log expires with the running status.
                broker.expire(self.key, self.jobs.lease)
            except Exception as exc2:  # noqa: BLE001 - the lease set earlier still holds
                log.warning("job %s: could not set its expiry either (%s)", self.id, exc2)


class Jobs:
    """Runs "expensive requests" in the background, at most ``max_running`` at once.

    ``broker_timeout``: how long a job waits for a failing broker before it gives up; the lease
    on a running job's status is twice that, so a job always gives up before its status could
    expire under it, and a dead job's readers learn it within a lease and a check.
    """

    def __init__(
        self, broker: Broker, ttl: float, *, max_running: int = 64, broker_timeout: float = 20.0
    ) -> None:
        self.broker = broker
        self.ttl = ttl
        self.max_running = max_running
        self.broker_timeout = broker_timeout
        self.lease = 2 * broker_timeout
        self.running: dict[str, Job] = {}
        self.stopping = False

    def start(self, count: int, interval: float, size: int) -> str:
        """Start a job (a greenlet under gevent); returns its id, or raises a 503."""
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
        job = Job(self, secrets.token_hex(16), count)
        # The slot is taken before the broker call, which may switch greenlets.
        self.running[job.id] = job
        try:
            self.broker.set_meta(job.key, job.meta("running"), ttl=self.lease)
        except BaseException:
            self.running.pop(job.id, None)
            raise
        thread = threading.Thread(
            target=job.run, args=(interval, size), daemon=True, name=f"job-{job.id}"
        )
        thread.start()
        return job.id

    def interrupt_all(self) -> None:
        """On shutdown: stop every running job and mark it interrupted in its log."""
        self.stopping = True
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
