"""Streaming a broker log (a job's or a channel's) as a response."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from flask import Response

from service import jobs
from service.jobs import FINAL_STATUSES, JobWatch, id_of
from stream import metrics
from stream.broker import Broker, SlowConsumer, Subscription
from stream.event import Envelope
from stream.runners import gevent_active
from stream.server import Unfinished, stream_response

log = logging.getLogger("stream.app")

#: seconds a channel's follower waits for an entry at most under gevent (then it looks again)
IDLE_WAIT = 30.0


def follow(
    subscription: Subscription,
    key: str,
    *,
    until_end: bool,
    max_lifetime: float,
    after: str | None = None,
    watch: JobWatch | None = None,
) -> Iterator[Envelope]:
    """A subscription's envelopes as a generator; the caller closes the subscription.

    With ``watch`` (a job's reader), ``JOB_CHECK_INTERVAL`` s without an entry make it look at
    the job's status: a job that can no longer end ends this stream with an error event.
    """
    deadline = time.monotonic() + max_lifetime if max_lifetime else math.inf
    seen = after
    quiet_since = time.monotonic()
    # Keep-alives are the writer's job: the wait only bounds how long a thread-based producer
    # takes to notice that its stream was closed (a greenlet is interrupted where it waits),
    # and how soon a job's reader looks at its job. A greenlet following a channel waits up to
    # IDLE_WAIT: 10,000 idle followers waking every second cost a sixth of a core.
    wait = IDLE_WAIT if watch is None and gevent_active() else 1.0
    while (now := time.monotonic()) < deadline:
        try:
            entries = subscription.get(min(wait, deadline - now))
        except SlowConsumer:
            # Counted once, when the stream closes (stream_log): a stream stopped by its write
            # timeout while its queue overflowed never gets here.
            log.info("subscriber of %s fell behind and was cut off", key)
            # An unfinished end (no end marker; SSE gets a retry: hint): the client resumes.
            raise Unfinished("slow consumer") from None
        if entries:
            for entry in entries:
                yield entry
                if until_end and entry.event in ("end", "error"):
                    return
            if watch is not None:
                seen = entries[-1].id
                quiet_since = time.monotonic()
        elif watch is not None and time.monotonic() - quiet_since >= jobs.JOB_CHECK_INTERVAL:
            quiet_since = time.monotonic()
            if watch.check(seen):
                return
    # STREAM_MAX_LIFETIME reached: an unfinished end, which clients resume from their id.
    raise Unfinished("lifetime")


def stream_log(
    broker: Broker,
    key: str,
    last_id: str | None,
    *,
    until_end: bool,
    max_lifetime: float,
    watch: JobWatch | None = None,
) -> Response:
    """Subscribe now (so a broker outage is a 503, not a broken stream) and stream the log."""
    subscription = broker.subscribe(key, last_id, from_start=until_end and last_id is None)
    items = follow(
        subscription,
        key,
        until_end=until_end,
        max_lifetime=max_lifetime,
        after=last_id,
        watch=watch,
    )

    def closed(reason: str) -> None:
        subscription.close()
        if subscription.overflowed:
            metrics.SLOW_CONSUMER_DROPS.inc()

    # A channel's follower yields every live entry as it is: the fan-out may write them itself.
    # A job's stops at its end, and with a watch also looks at the entries it yields.
    direct = subscription if not until_end and watch is None else None
    return stream_response(items, envelopes=True, name=key, on_close=closed, direct=direct)


def resumes_after_the_end(meta: dict[str, Any], last_id: str | None) -> bool:
    """Whether a resume from ``last_id`` comes after the job's last entry (answered 204)."""
    if last_id is None or meta.get("status") not in FINAL_STATUSES or "last_id" not in meta:
        return False
    last = id_of(meta["last_id"])
    resume = id_of(last_id)
    # No entry at all: nothing a resume could be waiting for.
    return last is None or (resume is not None and resume >= last)
