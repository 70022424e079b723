"""The demo stream: the seed's messages, ``count`` of them, ``interval`` s apart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from stream.errors import RemoteError

#: The seed's four messages: ``GET /events`` sends them by default.
SEED_MESSAGES = ("some data", "some more data", "and more", "finally the end")


def _messages(size: int) -> tuple[str, ...]:
    """The seed's messages, each padded (or cut) to exactly ``size`` characters when given."""
    if not size:
        return SEED_MESSAGES
    return tuple((m + " " + "." * size)[:size] for m in SEED_MESSAGES)


def generate_events(
    count: int, interval: float, size: int, fail_after: int | None = None
) -> Iterator[dict[str, Any]]:
    """The seed's stream: ``count`` events ``interval`` s apart; fails after ``fail_after``."""
    messages = _messages(size)
    n = len(messages)
    stop = count if fail_after is None else fail_after
    last = count - 1
    if interval:
        for i in range(stop):
            if i:
                time.sleep(interval)
            yield {"event_id": i, "data": messages[i % n], "is_last_event": i == last}
    else:
        for i in range(stop):
            yield {"event_id": i, "data": messages[i % n], "is_last_event": i == last}
    if fail_after is not None:
        raise RemoteError("failed_on_purpose", f"the stream failed after {fail_after} events")
