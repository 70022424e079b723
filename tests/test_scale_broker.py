"""Fan-out at scale, for both brokers: the publish answered before the fan-out, every
subscriber served once across fan-out slices, one encoding per format shared by all of them,
and idle waits that end on time without a timer each."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from stream.broker import MemoryBroker, Subscription
from stream.broker.base import FANOUT_SLICE
from stream.encoders import ENCODERS
from stream.event import Envelope, SharedEnvelope
from tests.redis_server import wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["memory", "redis"])
def broker(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        b: Any = MemoryBroker()
    else:
        from stream.broker.redis import RedisBroker

        b = RedisBroker(request.getfixturevalue("redis_url"), prefix=f"t:{uuid.uuid4().hex}:")
    yield b
    b.close()


def read(sub: Subscription, n: int, timeout: float = 20.0) -> list[Envelope]:
    got: list[Envelope] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} entries within {timeout} s"
        got += sub.get(min(left, 0.5))
    assert len(got) == n
    return got


def test_more_subscribers_than_a_fanout_slice_each_get_every_publish_once(broker: Any) -> None:
    subs = [broker.subscribe("k") for _ in range(FANOUT_SLICE + 45)]
    try:
        ids = broker.publish("k", [("message", b"1")]) + broker.publish("k", [("message", b"2")])
        for sub in subs:
            got = read(sub, 2)
            assert [e.id for e in got] == ids and [e.data for e in got] == [b"1", b"2"]
            assert sub.get(0) == []
    finally:
        for sub in subs:
            sub.close()


def test_one_publish_is_encoded_once_per_format_for_all_its_subscribers(broker: Any) -> None:
    subs = [broker.subscribe("k") for _ in range(3)]
    try:
        broker.publish("k", [("message", b'{"a":1}')])
        got = [read(sub, 1)[0] for sub in subs]
        assert all(isinstance(env, SharedEnvelope) for env in got)
        for encoder in ENCODERS.values():
            frames = [encoder.encode_envelope(env) for env in got]
            plain = Envelope(*got[0])
            assert frames[0] == encoder.encode_envelope(plain)
            assert all(frame is frames[0] for frame in frames)  # the same bytes object
    finally:
        for sub in subs:
            sub.close()


def test_the_log_keeps_plain_envelopes_so_retained_entries_hold_no_encodings() -> None:
    broker = MemoryBroker()
    live = broker.subscribe("k")
    try:
        broker.publish("k", [("message", b"1")])
        assert isinstance(read(live, 1)[0], SharedEnvelope)
        replay = broker.subscribe("k", from_start=True)
        try:
            (entry,) = replay.get(1)
            assert type(entry) is Envelope
        finally:
            replay.close()
    finally:
        live.close()
        broker.close()


def test_subscribing_while_publishes_wait_for_the_fanout_misses_and_repeats_nothing() -> None:
    # The in-process publish returns before the fan-out: a subscriber that arrives in between
    # has the publish in its replay, and the fan-out must not deliver it a second time.
    broker = MemoryBroker()
    watchers = [broker.subscribe("k") for _ in range(FANOUT_SLICE * 2)]  # a slow fan-out
    published: list[str] = []
    done = threading.Event()

    def publish() -> None:
        for i in range(300):
            published.extend(broker.publish("k", [("message", orjson.dumps(i))]))
        done.set()

    publisher = threading.Thread(target=publish)
    publisher.start()
    joined: list[tuple[Subscription, int]] = []
    try:
        while not done.is_set() and len(joined) < 20:
            joined.append((broker.subscribe("k", from_start=True), len(published)))
        publisher.join(30)
        assert done.is_set()
        for sub, _ in joined:
            got = [e.id for e in read(sub, len(published))]
            assert got == published  # everything from the start, in order, once
            assert sub.get(0.2) == []
    finally:
        for sub, _ in joined:
            sub.close()
        for sub in watchers:
            sub.close()
        broker.close()


def test_publish_returns_with_the_ids_in_the_log_before_the_fanout_ran() -> None:
    broker = MemoryBroker()
    subs = [broker.subscribe("k") for _ in range(FANOUT_SLICE * 4)]
    try:
        ids = broker.publish("k", [("message", b"1")])
        later = broker.subscribe("k", from_start=True)  # the log has it, whatever the fan-out
        assert [e.id for e in later.get(1)] == ids
        later.close()
        assert broker.subscriber_count("k") == len(subs)  # waits for the fan-out to finish
        assert all(sub.get(0) == [Envelope(ids[0], "message", b"1")] for sub in subs)
    finally:
        for sub in subs:
            sub.close()
        broker.close()


@pytest.mark.parametrize("timeout", [0.05, 0.3])
def test_an_idle_get_returns_nothing_after_its_timeout_and_not_before(
    broker: Any, timeout: float
) -> None:
    sub = broker.subscribe("k")
    try:
        for _ in range(3):  # again and again: the waiter is refiled, never lost
            start = time.monotonic()
            assert sub.get(timeout) == []
            waited = time.monotonic() - start
            assert timeout <= waited < timeout + 5.0
    finally:
        sub.close()


def test_many_waiting_subscribers_time_out_and_then_all_see_the_next_publish() -> None:
    broker = MemoryBroker()
    subs = [broker.subscribe("k") for _ in range(40)]
    empties = [0] * len(subs)
    results: dict[int, list[Envelope]] = {}
    stop = threading.Event()

    def reader(index: int, sub: Subscription) -> None:
        while not stop.is_set():
            got = sub.get(0.1)
            if got:
                results[index] = got
                return
            empties[index] += 1

    threads = [threading.Thread(target=reader, args=(i, s)) for i, s in enumerate(subs)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(empties) >= 2, 20)  # every reader timed out, and waits again
        ids = broker.publish("k", [("message", b"7")])
        wait_for(lambda: len(results) == len(subs), 20)
        assert {i: [e.id for e in got] for i, got in results.items()} == {
            i: ids for i in range(len(subs))
        }
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        for sub in subs:
            sub.close()
        broker.close()


def test_no_fanout_thread_or_waker_outlives_the_work() -> None:
    # An idle worker keeps no extra greenlet: what leak checks count stays at its baseline.
    def ours() -> set[str]:
        return {t.name for t in threading.enumerate()} & {"stream-fanout", "stream-deadlines"}

    broker = MemoryBroker()
    sub = broker.subscribe("k")
    try:
        assert sub.get(0.1) == []  # a timed wait: the waker runs
        broker.publish("k", [("message", b"1")])  # a fan-out: its thread runs
        assert [e.data for e in read(sub, 1)] == [b"1"]
        sub.close()
        wait_for(lambda: not ours(), 10)  # both end by themselves, the broker still open
    finally:
        sub.close()
        broker.close()
