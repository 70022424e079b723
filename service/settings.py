"""The service's settings: read from the environment here and nowhere else, and checked once.

A value the service cannot use raises ``SettingError``, whose text names the variable:
``gunicorn.conf.py`` checks them all in the master before any worker starts (one line on stderr,
exit status 1), and ``dramatiq service.worker`` does the same for a job worker.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from stream.broker import Broker


class SettingError(ValueError):
    """A setting the service cannot use: ``NAME='value' is not valid: expected ...``."""

    def __init__(self, name: str, value: str, expected: str) -> None:
        super().__init__(f"{name}={value!r} is not valid: expected {expected}")
        self.name = name


def number(
    name: str,
    default: float,
    *,
    minimum: float = 0.0,
    above: bool = True,
    maximum: float | None = None,
) -> float:
    """A number of seconds (or bytes, or entries) above ``minimum`` (or at least, with
    ``above=False``) and at most ``maximum``; NaN and infinities are refused."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if (
        not math.isfinite(value)
        or (value <= minimum if above else value < minimum)
        or (maximum is not None and value > maximum)
    ):
        if maximum is not None:
            bound = f"{'above' if above else 'from'} {minimum:g} to {maximum:g}"
        else:
            bound = f"above {minimum:g}" if above else f"at least {minimum:g}"
        raise SettingError(name, raw, f"a number {bound}")
    return value


def whole(
    name: str,
    default: int,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    what: str = "a whole number",
) -> int:
    """A whole number from ``minimum`` to ``maximum`` (None: no upper bound)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"{minimum} to {maximum}"
        raise SettingError(name, raw, f"{what}, {bound}")
    return value


def redis_url() -> str | None:
    """``REDIS_URL``, checked (None when unset or blank: the in-process broker).

    The same value in gunicorn's master (worker count, the start's PING), its workers and
    ``dramatiq service.worker``: a blank one means no Redis in all of them.
    """
    raw = os.environ.get("REDIS_URL", "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise SettingError(
            "REDIS_URL", raw, "redis://[:password@]host[:port][/db], rediss://... or unix://path"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise SettingError("REDIS_URL", raw, "a port number after the host") from None
    return raw


def default_config() -> dict[str, Any]:
    """The service's settings, read from the environment, with defaults that work on a laptop.

    Raises ``SettingError`` for a value it cannot use.
    """
    return {
        "REDIS_URL": redis_url(),
        "STREAM_PUBLISH_TOKEN": os.environ.get("STREAM_PUBLISH_TOKEN") or None,
        "STREAM_HEARTBEAT": number("STREAM_HEARTBEAT", 15.0),
        # a client that stops reading is cut off after this long without progress
        "STREAM_WRITE_TIMEOUT": number("STREAM_WRITE_TIMEOUT", 30.0),
        # request bodies above this get 413
        "MAX_CONTENT_LENGTH": whole("STREAM_MAX_BODY", 1024 * 1024),
        # a request body that has not fully arrived after this many seconds gets 408: a client
        # trickling its body would otherwise hold a connection (and a greenlet) for ever
        "STREAM_BODY_TIMEOUT": number("STREAM_BODY_TIMEOUT", 10.0),
        # jobs running at once in a worker (with REDIS_URL: jobs queued or running in the whole
        # service) before POST /jobs gets 503 + Retry-After. A job
        # without an interval is CPU-bound and shares the worker's one core with every stream:
        # past a few dozen, more jobs finish no sooner and only add memory (each holds a batch
        # of up to 1,000 events being published); 64 leaves room for paced jobs, which mostly
        # sleep
        "STREAM_MAX_JOBS": whole("STREAM_MAX_JOBS", 64),
        # a job whose broker keeps failing gives up after this many seconds (error event,
        # status "failed"); Redis failovers and restarts take less
        "STREAM_JOB_BROKER_TIMEOUT": number("STREAM_JOB_BROKER_TIMEOUT", 20.0),
        # with REDIS_URL: the queue's name (web and workers of one service share it)
        "STREAM_JOB_QUEUE": os.environ.get("STREAM_JOB_QUEUE") or "jobs",
        # with REDIS_URL: seconds without a heartbeat after which a job worker is dead and its
        # jobs go back on the queue (a crash, SIGKILL); a worker that stops cleanly puts them
        # back at once. Shorter notices sooner; a live worker must heartbeat within it
        "STREAM_JOB_REQUEUE_TIMEOUT": number("STREAM_JOB_REQUEUE_TIMEOUT", 30.0),
        # origins (comma-separated, or *) whose pages may read streams and publish; unset: none
        "STREAM_CORS_ORIGINS": os.environ.get("STREAM_CORS_ORIGINS") or None,
        # retention of job and channel logs: entries and seconds
        "STREAM_HISTORY_LENGTH": whole("STREAM_HISTORY_LENGTH", 10_000),
        "STREAM_HISTORY_AGE": number("STREAM_HISTORY_AGE", 3600.0),
        # how long a finished job's events stay readable
        "STREAM_JOB_TTL": number("STREAM_JOB_TTL", 3600.0),
        # entries a subscriber may fall behind before it is cut off (it resumes by id)
        "STREAM_QUEUE_SIZE": whole("STREAM_QUEUE_SIZE", 10_000),
        # bytes the in-process broker retains across all logs (oldest entries go first); Redis
        # is bounded by its own maxmemory
        "STREAM_HISTORY_BYTES": whole("STREAM_HISTORY_BYTES", 256 * 1024 * 1024),
        # open streams per worker before new ones get 503 + Retry-After
        "STREAM_MAX_STREAMS": whole("STREAM_MAX_STREAMS", 10_000),
        # 0: unlimited; otherwise streams end after this many seconds (clients resume)
        "STREAM_MAX_LIFETIME": number("STREAM_MAX_LIFETIME", 0.0, above=False),
    }


def create_service_broker(config: dict[str, Any]) -> Broker:
    """The broker ``config`` describes: the same for the web processes and the job workers."""
    # Imported here: gunicorn's master imports this module and must import nothing more.
    from stream.broker import create_broker

    return create_broker(
        config["REDIS_URL"],
        max_len=config["STREAM_HISTORY_LENGTH"],
        max_age=config["STREAM_HISTORY_AGE"],
        queue_size=config["STREAM_QUEUE_SIZE"],
        max_bytes=config["STREAM_HISTORY_BYTES"],
    )
