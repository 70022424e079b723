"""Brokers: make your own streams resumable across requests, workers and machines.

A broker keeps an append-only log per key with a live tail: a producer publishes to it whether
or not anyone listens, and a reader (a first request, or a client resuming with
``Last-Event-ID`` after a dropped connection, on any worker) gets what it has not seen, then the
live tail, with no gap and no duplicate. This is what Vercel's ``resumable-stream`` does for
Node; here ``stream_response(..., envelopes=True)`` sends the ids and the clients resume::

    broker = create_broker(os.environ.get("REDIS_URL"))   # None: in process, one worker

    def produce(key: str) -> None:                        # a thread, a job queue's worker...
        for token in generate():
            broker.publish(key, [(MESSAGE, orjson.dumps(token))])
        broker.publish(key, [(END, b"null")])

    @app.get("/answers/<key>/events")
    def answer_events(key: str) -> Response:
        last_id = request.headers.get("Last-Event-ID")
        if last_id is not None and not broker.valid_id(last_id):
            return error_response(400, "bad_last_event_id", "Last-Event-ID is not a stream id")
        sub = broker.subscribe(key, last_id, from_start=last_id is None)

        def entries() -> Iterator[Envelope]:
            try:
                while True:
                    for entry in sub.get(1.0):            # [] after 1 s of nothing
                        yield entry
                        if entry.event == END:
                            return
            except SlowConsumer:  # it fell too far behind: an unfinished end, the client resumes
                raise Unfinished("slow consumer") from None

        return stream_response(entries(), envelopes=True, on_close=lambda reason: sub.close())

(``MESSAGE`` and ``END`` come from ``stream.wire``, ``error_response`` and ``Unfinished``
from ``stream.server``: a plain ``return`` would end the stream as finished, with no SSE
``retry:`` hint, and the client would not resume;
the repository's ``tests/resumable_app.py`` runs this example, and a test resumes its stream
on another machine.) The modules:

- ``base``: the protocol (``Broker``, ``Subscription``), ids, errors, the ``reset`` envelope;
  its docstring says what a subscriber is promised. It imports neither implementation.
- ``memory``: ``MemoryBroker``, in process (one worker).
- ``redis``: ``RedisBroker`` on Redis Streams (the ``redis`` extra), imported only by
  ``create_broker`` with a URL or by ``from stream.broker.redis import RedisBroker``: importing
  this package never imports redis-py.
"""

from __future__ import annotations

from stream.broker.base import (
    Broker,
    BrokerUnavailable,
    IdTuple,
    LocalSubscription,
    SlowConsumer,
    Subscription,
    format_id,
    parse_id,
    reset_envelope,
)
from stream.broker.memory import DEFAULT_MAX_BYTES, MemoryBroker

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Broker",
    "BrokerUnavailable",
    "IdTuple",
    "LocalSubscription",
    "MemoryBroker",
    "SlowConsumer",
    "Subscription",
    "create_broker",
    "format_id",
    "parse_id",
    "reset_envelope",
]


def create_broker(
    redis_url: str | None,
    *,
    max_len: int = 10_000,
    max_age: float = 3600.0,
    queue_size: int = 10_000,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Broker:
    """The in-process broker when ``redis_url`` is ``None``, else the Redis Streams one.

    ``max_bytes`` bounds the in-process broker's memory across all logs; on Redis the
    server's own ``maxmemory`` does (a full Redis makes publishes ``BrokerUnavailable``).
    """
    if redis_url is None:
        return MemoryBroker(
            max_len=max_len, max_age=max_age, queue_size=queue_size, max_bytes=max_bytes
        )
    from stream.broker.redis import RedisBroker  # imports redis-py: only when asked for

    return RedisBroker(redis_url, max_len=max_len, max_age=max_age, queue_size=queue_size)
