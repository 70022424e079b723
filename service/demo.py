"""The demo stream: the seed's messages, ``count`` of them, ``interval`` s apart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from stream.errors import RemoteError

if TYPE_CHECKING:
    from service.jobs import JobContext

#: The seed's four messages: ``GET /events`` sends them by default.
SEED_MESSAGES = ("some data", "some more data", "and more", "finally the end")


def _messages(size: int) -> tuple[str, ...]:
    """The seed's messages, each padded (or cut) to exactly ``size`` characters when given."""
    if not size:
        return SEED_MESSAGES
    return tuple((m + " " + "." * size)[:size] for m in SEED_MESSAGES)


def generate_events(
    count: int, interval: float, size: int, fail_after: int | None = None, *, start: int = 0
) -> Iterator[dict[str, Any]]:
    """The seed's stream: ``count`` events ``interval`` s apart; fails after ``fail_after``.

    ``start``: the first ``event_id`` (a job taken up again continues after its last event).
    """
    messages = _messages(size)
    n = len(messages)
    stop = count if fail_after is None else fail_after
    last = count - 1
    if interval:
        for i in range(start, stop):
            if i > start:
                time.sleep(interval)
            yield {"event_id": i, "data": messages[i % n], "is_last_event": i == last}
    else:
        for i in range(start, stop):
            yield {"event_id": i, "data": messages[i % n], "is_last_event": i == last}
    if fail_after is not None:
        raise RemoteError("failed_on_purpose", f"the stream failed after {fail_after} events")


def demo_job(params: dict[str, Any], ctx: JobContext) -> Iterator[dict[str, Any]]:
    """The job ``POST /jobs`` starts: the seed's stream, continued after the log's last event.

    Each event carries its ``event_id``, so a job taken up again (its worker stopped or died)
    knows where it was: it starts after the last event its log holds.
    """
    start = 0 if ctx.last is None else int(ctx.last["event_id"]) + 1
    interval = float(params["interval"])
    for event in generate_events(int(params["count"]), 0.0, int(params["size"]), start=start):
        if interval and event["event_id"] > start:
            # Not time.sleep: the job keeps its lease meanwhile and stops at once on shutdown.
            ctx.sleep(interval)
        yield event
