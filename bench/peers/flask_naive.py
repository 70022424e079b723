"""The naive Flask approach: a view returning ``Response(stream_with_context(gen()))``.

One ``json.dumps(obj) + "\\n"`` per event, each a WSGI chunk of its own; served by gunicorn with
one gevent worker (``bench/peers/gunicorn_naive.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import Flask, Response, request, stream_with_context

from bench.peers import SEED_MESSAGES

app = Flask(__name__)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/events")
def events() -> Response:
    count = int(request.args.get("count", 4))
    interval = float(request.args.get("interval", 0.5))

    def gen() -> Iterator[str]:
        last = count - 1
        for i in range(count):
            if i and interval:
                time.sleep(interval)
            yield (
                json.dumps(
                    {"event_id": i, "data": SEED_MESSAGES[i % 4], "is_last_event": i == last}
                )
                + "\n"
            )

    return Response(stream_with_context(gen()), mimetype="application/x-ndjson")


@app.get("/stamped")
def stamped() -> Response:
    count = int(request.args.get("count", 4))
    interval = float(request.args.get("interval", 0.025))

    def gen() -> Iterator[str]:
        last = count - 1
        for i in range(count):
            if i:
                time.sleep(interval)  # gevent-patched by the worker
            event = {"event_id": i, "data": SEED_MESSAGES[i % 4], "is_last_event": i == last}
            event["t"] = time.time()
            yield json.dumps(event) + "\n"

    return Response(stream_with_context(gen()), mimetype="application/x-ndjson")
