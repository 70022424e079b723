"""The job worker, with ``REDIS_URL``: ``dramatiq service.worker`` (the ``Procfile``'s ``worker:``).

Importing this module builds the worker's side of the queue (``service.queue``) from the same
settings as the web (``service.settings``) and makes its broker Dramatiq's global one, which the
``dramatiq`` command then runs. Each worker process imports it anew.
"""

from __future__ import annotations

import logging
import sys

import dramatiq

from service.queue import build_worker
from service.settings import default_config
from stream.broker import create_broker

log = logging.getLogger("stream.app")

config = default_config()
if not config["REDIS_URL"]:
    # Without Redis, jobs run in the web process: there is nothing for a worker to do.
    sys.exit("service.worker: REDIS_URL is not set (without it, jobs run in the web process)")

broker = create_broker(
    config["REDIS_URL"],
    max_len=config["STREAM_HISTORY_LENGTH"],
    max_age=config["STREAM_HISTORY_AGE"],
    queue_size=config["STREAM_QUEUE_SIZE"],
    max_bytes=config["STREAM_HISTORY_BYTES"],
)
queue, runner, hooks = build_worker(config, broker)
dramatiq.set_broker(queue.broker)
log.info(
    "job worker on queue %r; a dead worker's jobs are taken up again after %g s",
    queue.name,
    queue.requeue_timeout,
)
