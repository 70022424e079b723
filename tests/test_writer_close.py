"""Units of the end of streams: the app's generator is closed however a stream ends, and a
worker's shutdown ends every open stream.

A gevent runner's producer greenlet closes the generator in its ``finally``; one killed before it
first ran never runs at all, so ``close`` must close the generator itself. Driven without a
server: ``_start`` is what the first ``__next__`` does before it waits for the producer.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stream.encoders import encoder_for
from stream.formats import NDJSON
from stream.pacing import State, Transport
from stream.runners import GeventWriter, Registry

pytestmark = pytest.mark.timeout(30)


class Subscription:
    """A generator whose ``finally`` (an unsubscribe in a real app) is observable."""

    def __init__(self) -> None:
        self.closed = False
        self.produced = 0

    def values(self) -> Iterator[dict[str, int]]:
        try:
            for n in range(2):
                self.produced += 1
                yield {"n": n}
        finally:
            self.closed = True


def started_writer(sub: Subscription) -> GeventWriter:
    # Already running, as Flask's stream_with_context leaves a generator (it runs it to its
    # first yield): only a running generator has a ``finally`` that closing it runs.
    items = sub.values()
    assert next(items) == {"n": 0}
    # No socket: nothing may be written around the server, so a producer greenlet runs it.
    writer = GeventWriter(items, encoder_for(NDJSON), heartbeat=10, transport=Transport())
    assert writer._start() is State.PRODUCER
    assert writer._producer is not None and not writer._producer.dead
    return writer


def test_closed_before_its_producer_ran_closes_the_generator() -> None:
    sub = Subscription()
    writer = started_writer(sub)
    writer.close()  # no switch since the producer was scheduled: it never ran
    assert writer._producer.dead
    assert sub.produced == 1
    assert sub.closed


def test_stopped_before_its_producer_ran_closes_the_generator_at_close() -> None:
    sub = Subscription()
    writer = started_writer(sub)
    writer.shut_down(retry_ms=0)  # kills the producer without waiting: it will never run
    assert list(writer) == []  # the body ends at once (NDJSON has no tail)
    writer.close()
    assert sub.produced == 1
    assert sub.closed


def test_a_producer_that_ran_closes_the_generator_once() -> None:
    import gevent

    sub = Subscription()
    writer = started_writer(sub)
    gevent.sleep(0)  # the producer runs the generator to its end
    assert sub.produced == 2 and sub.closed
    assert b"".join(writer) == b'{"n":1}\n'
    writer.close()
    assert sub.closed


class Stream:
    """A registry's view of an open stream: something to shut down."""

    def __init__(self, fails: bool = False) -> None:
        self.fails = fails
        self.shut = False

    def shut_down(self) -> None:
        self.shut = True
        if self.fails:
            raise RuntimeError("cannot stop")


def test_a_shutdown_ends_every_stream_even_if_a_callback_is_interrupted() -> None:
    import gevent

    registry = Registry()
    streams = [Stream(), Stream(fails=True), Stream()]
    registry.open = set(streams)  # type: ignore[arg-type]

    def failing() -> None:
        raise ValueError("broken callback")

    def interrupted() -> None:
        raise gevent.Timeout(1)  # a BaseException: the loop over callbacks stops here

    registry.callbacks = [failing, interrupted]
    with pytest.raises(gevent.Timeout):
        registry.shutdown()
    assert registry.shutting_down
    assert all(s.shut for s in streams)
