"""A user's own app made resumable with ``stream.broker``: the example in its docstring.

Served as ``gunicorn tests.resumable_app:app``; with ``REDIS_URL`` set, two such services (two
"machines") share the answers. ``POST /answers/<key>?count=N&interval=S`` starts a producer
that publishes N tokens (0, 1, ...) and an end marker; ``GET /answers/<key>/events`` follows
them, resuming after ``Last-Event-ID``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import orjson
from flask import Flask, Response, request

from stream import stream_response
from stream.broker import SlowConsumer, create_broker
from stream.event import Envelope
from stream.server import Unfinished, error_response
from stream.wire import END, MESSAGE

broker = create_broker(os.environ.get("REDIS_URL"))
app = Flask(__name__)
app.extensions["stream.broker"] = broker  # stream.gunicorn's worker_exit closes it


def produce(key: str, count: int, interval: float) -> None:
    for token in range(count):
        broker.publish(key, [(MESSAGE, orjson.dumps(token))])
        time.sleep(interval)
    broker.publish(key, [(END, b"null")])


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/answers/<key>")
def answer(key: str) -> tuple[dict[str, str], int]:
    count = int(request.args.get("count", "10"))
    interval = float(request.args.get("interval", "0"))
    threading.Thread(target=produce, args=(key, count, interval), daemon=True).start()
    return {"events_url": f"/answers/{key}/events"}, 202


@app.get("/answers/<key>/events")
def answer_events(key: str) -> Response:
    last_id = request.headers.get("Last-Event-ID")
    if last_id is not None and not broker.valid_id(last_id):
        return error_response(400, "bad_last_event_id", "Last-Event-ID is not a stream id")
    sub = broker.subscribe(key, last_id, from_start=last_id is None)

    def entries() -> Iterator[Envelope]:
        try:
            while True:
                for entry in sub.get(1.0):
                    yield entry
                    if entry.event == END:
                        return
        except SlowConsumer:  # it fell too far behind: an unfinished end, the client resumes
            raise Unfinished("slow consumer") from None

    return stream_response(entries(), envelopes=True, on_close=lambda reason: sub.close())
