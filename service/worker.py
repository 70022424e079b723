"""The job worker, with ``REDIS_URL``: ``dramatiq service.worker`` (the ``Procfile``'s ``worker:``).

Importing this module builds the worker's side of the queue (``service.queue``) from the same
settings as the web (``service.settings``) and makes its broker Dramatiq's global one, which the
``dramatiq`` command then runs. Each worker process imports it anew.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import dramatiq

from service.queue import build_worker
from service.settings import SettingError, create_service_broker, default_config

log = logging.getLogger("stream.app")


def _first_sigterm_only() -> None:
    """Make a worker process act on its first SIGTERM only.

    Dramatiq's worker process exits at once on a second SIGTERM, and on a platform it gets two:
    one from the platform (a deploy signals every process of the dyno or container) and one
    from Dramatiq's main process, which passes the signal on. Exiting there would skip putting
    the running jobs back on the queue (they would wait for the queue's timeout instead); the
    platform's SIGKILL after its grace period still stops a process that does not stop.
    """
    handler = signal.getsignal(signal.SIGTERM)
    if not callable(handler) or not getattr(handler, "__qualname__", "").startswith(
        "worker_process."
    ):
        return  # not in a Dramatiq worker process (an import elsewhere): leave it alone
    on_term: Callable[[int, FrameType | None], Any] = handler
    received = False

    def first_only(signum: int, frame: FrameType | None) -> None:
        nonlocal received
        if received:
            log.info("SIGTERM again: still putting the running jobs back on the queue")
            return
        received = True
        on_term(signum, frame)

    signal.signal(signal.SIGTERM, first_only)


try:
    config = default_config()
except SettingError as exc:
    sys.exit(f"service.worker: {exc}")
if not config["REDIS_URL"]:
    # Without Redis, jobs run in the web process: there is nothing for a worker to do.
    sys.exit("service.worker: REDIS_URL is not set (without it, jobs run in the web process)")

broker = create_service_broker(config)
queue, runner, hooks = build_worker(config, broker)
dramatiq.set_broker(queue.broker)
_first_sigterm_only()
log.info(
    "job worker on queue %r; a dead worker's jobs are taken up again after %g s",
    queue.name,
    queue.requeue_timeout,
)
