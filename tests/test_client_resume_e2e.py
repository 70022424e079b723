"""The client against the real service (gunicorn + gevent): this service's unfinished ends resume.

``STREAM_MAX_LIFETIME`` ends a channel's body normally, without an end marker (SSE first gets a
``retry:`` hint, the mark of an unfinished end); in every format the client must resume from its
last id, losing and repeating nothing (CONTRACT.md, section 2, and "Resuming" in
``stream.protocol``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from stream.client import Client
from stream.protocol import VALUES, Hooks
from tests.service import Service

COUNT = 30


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["ndjson", "json-seq", "sse"])
def test_stream_resumes_across_lifetime_ends(
    start_service: Callable[..., Service], fmt: str
) -> None:
    svc = start_service({"STREAM_MAX_LIFETIME": "1"})
    reconnects: list[Any] = []
    hooks = Hooks(on_reconnect=lambda attempt, delay, cause: reconnects.append(attempt))
    stop = threading.Event()

    def publish(client: Client) -> None:
        for n in range(COUNT):
            if stop.wait(0.1):
                return
            client.publish("life", n)

    with Client(svc.url, timeout=(5.0, 10.0), backoff_initial=0.05, backoff_max=0.2) as client:
        stream = client._stream(VALUES, "/channels/life", format=fmt, hooks=hooks)
        with stream:  # subscribed once the response arrived: publish from then on
            publisher = threading.Thread(target=publish, args=(client,), daemon=True)
            publisher.start()
            got = []
            try:
                for value in stream:
                    got.append(value)
                    if len(got) == COUNT:
                        break
            finally:
                stop.set()
                publisher.join(10)
    assert got == list(range(COUNT))  # every value once, in order, across the resumes
    assert len(reconnects) >= 2  # 3 s of publishing against a 1 s lifetime
