"""A small Flask app around ``stream_response`` for the writer's tests under gunicorn+gevent.

Served as ``gunicorn tests.writer_app:app`` with the repository's gunicorn.conf.py. Its
generators follow a pattern given in the query, so the tests can drive the writer through its
modes: events that wait (the inline mode), bursts (the producer greenlet takes over), and a
generator that blocks until the client leaves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request

from stream.server import open_streams, stream_response

app = Flask(__name__)
# 1 s unless the test sets STREAM_HEARTBEAT (the transport matrix runs shorter).
app.config["STREAM_HEARTBEAT"] = float(os.environ.get("STREAM_HEARTBEAT") or 1.0)

#: how many generators ran their ``finally``, by name
finished: dict[str, int] = {}


@app.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"status": "ok", "open_streams": open_streams()}


@app.get("/greenlets")
def greenlets() -> dict[str, int]:
    """Greenlets alive in this worker (one per open inline stream, two with a producer)."""
    import gc

    from greenlet import greenlet

    alive = sum(1 for o in gc.get_objects() if isinstance(o, greenlet) and not o.dead)
    return {"alive": alive}


@app.get("/finished")
def finished_count() -> dict[str, int]:
    return finished


@app.get("/pattern")
def pattern() -> Response:
    """``?spec=w3,b50,w2``: 3 events each after a wait, a burst of 50, 2 after a wait.

    Every event carries its sequence number, the request's ``tag`` (read from the request
    context inside the generator, whichever greenlet runs it by then) and the server's time.
    """
    spec = [(part[0], int(part[1:])) for part in request.args["spec"].split(",")]
    wait = float(request.args.get("wait", "0.05"))

    def gen() -> Iterator[dict[str, Any]]:
        seq = 0
        try:
            for kind, n in spec:
                for _ in range(n):
                    if kind == "w":
                        time.sleep(wait)  # gevent's sleep in the worker
                    yield {"seq": seq, "tag": request.args["tag"], "t": time.time()}
                    seq += 1
        finally:
            finished["pattern"] = finished.get("pattern", 0) + 1

    return stream_response(gen(), name="pattern")


@app.get("/blocked")
def blocked() -> Response:
    """One event, then a wait that only the client's leaving (or a shutdown) ends."""

    def gen() -> Iterator[dict[str, Any]]:
        try:
            yield {"first": True}
            time.sleep(3600)
            yield {"never": True}
        finally:
            finished["blocked"] = finished.get("blocked", 0) + 1

    return stream_response(gen(), name="blocked")


@app.get("/escape")
def escape() -> Response:
    """A gevent Timeout (a BaseException) escapes the generator after its first event."""
    wait = float(request.args.get("wait", "0"))

    def gen() -> Iterator[dict[str, Any]]:
        import gevent

        yield {"first": True}
        with gevent.Timeout(wait or 0.001):
            time.sleep(1)  # the Timeout is raised here, in the generator, and not caught

    return stream_response(gen(), name="escape")


@app.get("/fails")
def fails() -> Response:
    """Two events, then the generator raises: the stream ends with the contract's error event."""

    def gen() -> Iterator[dict[str, Any]]:
        yield {"seq": 0}
        time.sleep(0.05)
        yield {"seq": 1}
        raise RuntimeError("secret detail that must not reach the client")

    return stream_response(gen(), name="fails")
