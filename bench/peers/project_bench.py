"""Bench-only Flask app around this project's ``stream.server.stream_response``.

Served as ``gunicorn bench.peers.project_bench:app`` from the repository root, so gunicorn reads
the project's own gunicorn.conf.py (gevent, one worker, its worker_connections). It exists for
what the service's ``/events`` cannot show: ``/stamped`` carries the server's ``time.time()`` per
event (scenarios 2 and 3). ``/events`` mirrors app.generate_events, so the throughput scenario
can still run while app.py cannot be imported (the broker it needs has not landed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, request

from bench.peers import SEED_MESSAGES
from stream.server import open_streams, stream_response

app = Flask(__name__)
app.config["STREAM_HEARTBEAT"] = 15.0


@app.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"status": "ok", "open_streams": open_streams()}


@app.get("/events")
def events() -> Response:
    count = int(request.args.get("count", 4))
    interval = float(request.args.get("interval", 0.5))

    def gen() -> Iterator[dict[str, Any]]:
        last = count - 1
        for i in range(count):
            if i and interval:
                time.sleep(interval)
            yield {"event_id": i, "data": SEED_MESSAGES[i % 4], "is_last_event": i == last}

    return stream_response(gen(), name="events")


@app.get("/stamped")
def stamped() -> Response:
    count = int(request.args.get("count", 4))
    interval = float(request.args.get("interval", 0.025))

    def gen() -> Iterator[dict[str, Any]]:
        last = count - 1
        for i in range(count):
            if i:
                time.sleep(interval)  # gevent-patched by the worker
            yield {
                "event_id": i,
                "data": SEED_MESSAGES[i % 4],
                "is_last_event": i == last,
                "t": time.time(),
            }

    return stream_response(gen(), name="stamped")
