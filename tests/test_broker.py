"""One suite for both brokers (in-process and Redis Streams on a real redis-server)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from stream.broker import (
    Broker,
    BrokerUnavailable,
    MemoryBroker,
    SlowConsumer,
    Subscription,
    create_broker,
    parse_id,
)
from stream.event import Envelope
from tests.redis_server import RedisServer, wait_for

pytestmark = pytest.mark.timeout(60)

MakeBroker = Callable[..., Any]


@pytest.fixture(params=["memory", "redis"])
def make_broker(request: pytest.FixtureRequest) -> Iterator[MakeBroker]:
    """Build brokers of one kind (same key prefix within a test, fresh per test); closed after."""
    made: list[Any] = []
    prefix = f"test:{uuid.uuid4().hex}:"

    def make(**options: Any) -> Any:
        if request.param == "memory":
            broker: Any = MemoryBroker(**options)
        else:
            from stream.broker.redis import RedisBroker

            url = request.getfixturevalue("redis_url")
            broker = RedisBroker(url, prefix=prefix, **options)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.close()


@pytest.fixture
def broker(make_broker: MakeBroker) -> Broker:
    """A broker of each kind with the default limits."""
    b: Broker = make_broker()
    return b


def items(*values: Any, event: str = "message") -> list[tuple[str, bytes]]:
    """Publishable items from JSON values."""
    return [(event, orjson.dumps(v)) for v in values]


def collect(sub: Subscription, n: int, timeout: float = 10.0) -> list[Envelope]:
    """Read until ``n`` entries arrived (fail after ``timeout`` s); no more, no fewer."""
    got: list[Envelope] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} entries within {timeout} s: {got}"
        got += sub.get(min(left, 0.5))
    assert len(got) == n, got
    return got


def quiet(sub: Subscription, wait: float = 0.3) -> list[Envelope]:
    """Whatever arrives within ``wait`` s (used to check that nothing more does)."""
    deadline = time.monotonic() + wait
    got: list[Envelope] = []
    while (left := deadline - time.monotonic()) > 0:
        got += sub.get(left)
    return got


def ids_of(entries: list[Envelope]) -> list[str]:
    return [e.id for e in entries]


# -- ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        pytest.param("1-0", (1, 0), id="simple"),
        pytest.param("1700000000000-12", (1700000000000, 12), id="redis-form"),
        pytest.param("18446744073709551615-18446744073709551615", (2**64 - 1, 2**64 - 1), id="max"),
        pytest.param("18446744073709551616-0", None, id="ms-overflow"),
        pytest.param("1-18446744073709551616", None, id="seq-overflow"),
        pytest.param("1", None, id="no-seq"),
        pytest.param("", None, id="empty"),
        pytest.param("-1-0", None, id="negative"),
        pytest.param("1-0\n", None, id="trailing-newline"),
        pytest.param("１-0", None, id="unicode-digit"),
        pytest.param("a-b", None, id="letters"),
        pytest.param("$", None, id="dollar"),
    ],
)
def test_parse_id(value: str, parsed: tuple[int, int] | None) -> None:
    assert parse_id(value) == parsed


def test_valid_id(broker: Broker) -> None:
    assert broker.valid_id("1700000000000-0")
    assert not broker.valid_id("1700000000000")
    assert not broker.valid_id("abc")
    assert not broker.valid_id("")


def test_publish_returns_increasing_ids(broker: Broker) -> None:
    first = broker.publish("k", items(1, 2, 3))
    second = broker.publish("k", items(4))
    other = broker.publish("other", items(5))
    assert len(first) == 3 and len(second) == 1 and len(other) == 1
    parsed = [parse_id(i) for i in first + second]
    assert None not in parsed
    assert parsed == sorted(parsed) and len(set(parsed)) == 4  # type: ignore[type-var]
    assert broker.publish("k", []) == []


def test_create_broker_picks_the_kind(redis_url: str) -> None:
    memory = create_broker(None, max_len=5)
    on_redis = create_broker(redis_url, max_len=5)
    try:
        assert memory.kind == "memory" and on_redis.kind == "redis"
        assert memory.healthy() and on_redis.healthy()
    finally:
        memory.close()
        on_redis.close()


# -- replay and live ----------------------------------------------------------------------------


def test_from_start_replays_then_live(broker: Broker) -> None:
    old = broker.publish("job", items("a", "b"))
    sub = broker.subscribe("job", from_start=True)
    try:
        replay = collect(sub, 2)
        assert ids_of(replay) == old
        assert [orjson.loads(e.data) for e in replay] == ["a", "b"]
        new = broker.publish("job", items("c", event="end"))
        live = collect(sub, 1)
        assert ids_of(live) == new and live[0].event == "end"
        assert quiet(sub) == []
    finally:
        sub.close()


def test_from_start_on_a_missing_key_is_live_only(broker: Broker) -> None:
    sub = broker.subscribe("nothing-yet", from_start=True)
    try:
        assert sub.get(0.05) == []
        new = broker.publish("nothing-yet", items(1))
        assert ids_of(collect(sub, 1)) == new
    finally:
        sub.close()


def test_channel_gets_only_new_entries(broker: Broker) -> None:
    broker.publish("news", items("old"))
    sub = broker.subscribe("news")
    try:
        assert quiet(sub, 0.1) == []
        new = broker.publish("news", items("new1", "new2"))
        assert ids_of(collect(sub, 2)) == new
        assert quiet(sub, 0.1) == []
    finally:
        sub.close()


def test_second_channel_subscriber_gets_only_new_entries(broker: Broker) -> None:
    first = broker.subscribe("news")
    try:
        broker.publish("news", items("before"))
        collect(first, 1)
        second = broker.subscribe("news")
        new = broker.publish("news", items("after"))
        assert ids_of(collect(second, 1)) == new
        assert quiet(second, 0.1) == []
        second.close()
    finally:
        first.close()


def test_last_id_replays_after_it_then_live(broker: Broker) -> None:
    ids = broker.publish("k", items(*range(5)))
    sub = broker.subscribe("k", ids[1])
    try:
        assert ids_of(collect(sub, 3)) == ids[2:]
        new = broker.publish("k", items(5))
        assert ids_of(collect(sub, 1)) == new
    finally:
        sub.close()


def test_last_id_at_the_tail_is_live_only(broker: Broker) -> None:
    ids = broker.publish("k", items(1, 2))
    sub = broker.subscribe("k", ids[-1])
    try:
        assert quiet(sub, 0.1) == []
        new = broker.publish("k", items(3))
        assert ids_of(collect(sub, 1)) == new
    finally:
        sub.close()


def test_resume_during_concurrent_publishing_has_no_gap_and_no_duplicate(broker: Broker) -> None:
    published = broker.publish("k", items(*range(20)))
    lock = threading.Lock()
    done = threading.Event()

    def publisher() -> None:
        for i in range(300):
            new = broker.publish("k", items(i))
            with lock:
                published.extend(new)
        done.set()

    thread = threading.Thread(target=publisher)
    thread.start()
    subs: list[tuple[str, Subscription]] = []
    try:
        # Resume from several points while the publisher runs, from different histories.
        while not done.is_set() and len(subs) < 8:
            with lock:
                resume_from = published[len(published) // 2]
            subs.append((resume_from, broker.subscribe("k", resume_from)))
        thread.join(30)
        assert not thread.is_alive()
        for resume_from, sub in subs:
            expected = published[published.index(resume_from) + 1 :]
            got = collect(sub, len(expected))
            assert ids_of(got) == expected
            assert quiet(sub, 0.05) == []
    finally:
        for _, sub in subs:
            sub.close()


def test_many_subscribers_all_receive(broker: Broker) -> None:
    subs = [broker.subscribe("fan") for _ in range(1000)]
    try:
        new = broker.publish("fan", items("x"))
        for sub in subs:
            assert ids_of(collect(sub, 1)) == new
    finally:
        for sub in subs:
            sub.close()


def test_get_times_out_with_an_empty_list(broker: Broker) -> None:
    sub = broker.subscribe("silent")
    try:
        start = time.monotonic()
        assert sub.get(0.2) == []
        assert 0.15 <= time.monotonic() - start < 5
        assert sub.get(0) == []
    finally:
        sub.close()


def test_get_wakes_as_soon_as_an_entry_arrives(broker: Broker) -> None:
    sub = broker.subscribe("prompt")
    got: list[Envelope] = []
    reader = threading.Thread(target=lambda: got.extend(sub.get(20)))
    reader.start()
    try:
        wait_for(lambda: sub._waiting, timeout=5)  # type: ignore[attr-defined]
        start = time.monotonic()
        new = broker.publish("prompt", items(1))
        reader.join(10)
        assert not reader.is_alive()
        assert ids_of(got) == new
        assert time.monotonic() - start < 5
    finally:
        sub.close()


# -- retention and reset ------------------------------------------------------------------------


def reset_fields(entry: Envelope) -> dict[str, Any]:
    assert entry.event == "reset"
    fields: dict[str, Any] = orjson.loads(entry.data)
    assert entry.id == fields["last_event_id"]
    return fields


def test_retention_by_length_resets_a_resume_from_a_trimmed_position(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker(max_len=3)
    ids = [broker.publish("k", items(i))[0] for i in range(6)]
    ids += broker.publish("k", items(6, 7))  # a batch trims too
    retained = ids[-3:]
    sub = broker.subscribe("k", ids[0])
    try:
        got = collect(sub, 4)
        assert reset_fields(got[0]) == {"last_event_id": ids[0], "first_retained_id": retained[0]}
        assert ids_of(got[1:]) == retained
    finally:
        sub.close()
    # The newest trimmed entry itself: nothing after it was lost, so no reset.
    sub = broker.subscribe("k", ids[-4])
    try:
        assert ids_of(collect(sub, 3)) == retained
    finally:
        sub.close()
    # From the start: whatever is retained, without a reset.
    sub = broker.subscribe("k", from_start=True)
    try:
        assert ids_of(collect(sub, 3)) == retained
    finally:
        sub.close()


def test_retention_by_age_resets(make_broker: MakeBroker) -> None:
    broker = make_broker(max_age=0.3)
    old = broker.publish("k", items("a", "b"))
    old_ms = parse_id(old[-1])[0]  # type: ignore[index]
    wait_for(lambda: time.time() * 1000 > old_ms + 400, timeout=5)
    new = broker.publish("k", items("c"))  # trims a and b on the way
    sub = broker.subscribe("k", old[0])
    try:
        got = collect(sub, 2)
        assert reset_fields(got[0])["first_retained_id"] == new[0]
        assert ids_of(got[1:]) == new
    finally:
        sub.close()
    sub = broker.subscribe("k", old[-1])
    try:
        assert ids_of(collect(sub, 1)) == new
    finally:
        sub.close()


def test_age_trimming_happens_without_a_publish(make_broker: MakeBroker) -> None:
    broker = make_broker(max_age=0.3)
    old = broker.publish("k", items("a", "b"))
    old_ms = parse_id(old[-1])[0]  # type: ignore[index]
    wait_for(lambda: time.time() * 1000 > old_ms + 400, timeout=5)
    sub = broker.subscribe("k", old[0])
    try:
        got = collect(sub, 1)
        assert reset_fields(got[0]) == {"last_event_id": old[0], "first_retained_id": None}
        assert quiet(sub, 0.1) == []
    finally:
        sub.close()


def test_reset_when_the_log_is_gone(broker: Broker) -> None:
    sub = broker.subscribe("never-published", "1700000000000-0")
    try:
        got = collect(sub, 1)
        assert reset_fields(got[0]) == {
            "last_event_id": "1700000000000-0",
            "first_retained_id": None,
        }
        new = broker.publish("never-published", items(1))
        assert ids_of(collect(sub, 1)) == new
    finally:
        sub.close()


def test_reset_for_an_id_from_before_the_in_process_brokers_start() -> None:
    first = MemoryBroker()
    stale = first.publish("k", items("lost"))[0]
    first.close()
    wait_for(lambda: int(time.time() * 1000) > parse_id(stale)[0], timeout=5)  # type: ignore[index]
    second = MemoryBroker()  # a restarted process: it never saw what came after `stale`
    try:
        new = second.publish("k", items("kept"))
        sub = second.subscribe("k", stale)
        got = collect(sub, 2)
        assert reset_fields(got[0]) == {"last_event_id": stale, "first_retained_id": new[0]}
        assert ids_of(got[1:]) == new
        sub.close()
    finally:
        second.close()


def test_redis_replays_an_old_id_without_reset_when_nothing_was_trimmed(redis_url: str) -> None:
    from stream.broker.redis import RedisBroker

    broker = RedisBroker(redis_url, prefix=f"test:{uuid.uuid4().hex}:")
    try:
        ids = broker.publish("k", items(1, 2))
        sub = broker.subscribe("k", "1-0")
        assert ids_of(collect(sub, 2)) == ids  # Redis knows nothing after 1-0 was lost
        sub.close()
    finally:
        broker.close()


def test_invalid_last_id_is_a_value_error(broker: Broker) -> None:
    with pytest.raises(ValueError):
        broker.subscribe("k", "not-an-id")


# -- slow consumers and closing -----------------------------------------------------------------


def test_slow_consumer_is_cut_off_while_a_fast_one_gets_everything(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker(queue_size=10)
    slow = broker.subscribe("k")
    fast = broker.subscribe("k")
    try:
        published: list[str] = []
        received: list[Envelope] = []
        for i in range(30):
            published += broker.publish("k", items(i))
            received += collect(fast, 1)
        assert ids_of(received) == published
        with pytest.raises(SlowConsumer):
            slow.get(1)
        assert broker.subscriber_count("k") == 1  # the slow one left the fan-out
        more = broker.publish("k", items("more"))
        assert ids_of(collect(fast, 1)) == more
    finally:
        slow.close()
        fast.close()


def test_a_replay_larger_than_the_queue_is_not_a_slow_consumer(make_broker: MakeBroker) -> None:
    broker = make_broker(queue_size=2)
    ids = broker.publish("k", items(*range(10)))
    sub = broker.subscribe("k", from_start=True)
    try:
        assert ids_of(collect(sub, 10)) == ids
    finally:
        sub.close()


def test_close_is_idempotent_and_unsubscribes(make_broker: MakeBroker) -> None:
    broker = make_broker()
    sub = broker.subscribe("k")
    other = broker.subscribe("k")
    assert broker.subscriber_count("k") == 2
    sub.close()
    sub.close()
    assert broker.subscriber_count("k") == 1
    broker.publish("k", items(1))
    assert sub.get(0.05) == []
    collect(other, 1)
    other.close()
    assert broker.subscriber_count() == 0


def test_close_wakes_a_waiting_get(broker: Broker) -> None:
    sub = broker.subscribe("k")
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(sub.get(20)))
    reader.start()
    sub.close()
    reader.join(10)
    assert not reader.is_alive() and result == [[]]


def test_closing_the_broker_ends_subscriptions(make_broker: MakeBroker) -> None:
    broker = make_broker()
    sub = broker.subscribe("k")
    errors: list[BaseException] = []

    def read() -> None:
        try:
            sub.get(20)
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    broker.close()
    broker.close()
    reader.join(10)
    assert not reader.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], BrokerUnavailable)
    with pytest.raises(BrokerUnavailable):
        broker.publish("k", items(1))
    with pytest.raises(BrokerUnavailable):
        broker.subscribe("k")


# -- metadata and expiry ------------------------------------------------------------------------


def test_meta_round_trip(broker: Broker) -> None:
    assert broker.get_meta("job:1") is None
    broker.set_meta("job:1", {"status": "running", "count": 3})
    assert broker.get_meta("job:1") == {"status": "running", "count": 3}
    broker.set_meta("job:1", {"status": "done"})
    assert broker.get_meta("job:1") == {"status": "done"}


def test_meta_ttl_expires_meta_and_log(broker: Broker) -> None:
    ids = broker.publish("job:2", items(1, 2))
    broker.set_meta("job:2", {"status": "done"}, ttl=0.3)
    assert broker.get_meta("job:2") == {"status": "done"}
    wait_for(lambda: broker.get_meta("job:2") is None, timeout=5)
    sub = broker.subscribe("job:2", ids[0])
    try:
        got = collect(sub, 1)
        assert reset_fields(got[0])["first_retained_id"] is None
    finally:
        sub.close()


def test_set_meta_without_ttl_keeps_the_expiry(broker: Broker) -> None:
    broker.set_meta("job:3", {"status": "running"}, ttl=0.3)
    broker.set_meta("job:3", {"status": "still running"})
    wait_for(lambda: broker.get_meta("job:3") is None, timeout=5)


def test_expire_removes_log_and_meta(broker: Broker) -> None:
    ids = broker.publish("job:4", items(1))
    broker.set_meta("job:4", {"status": "done"})
    broker.expire("job:4", 0.3)
    wait_for(lambda: broker.get_meta("job:4") is None, timeout=5)
    sub = broker.subscribe("job:4", from_start=True)
    try:
        assert quiet(sub, 0.1) == []
    finally:
        sub.close()
    sub = broker.subscribe("job:4", ids[0])
    try:
        assert reset_fields(collect(sub, 1)[0])["first_retained_id"] is None
    finally:
        sub.close()


def test_meta_must_be_json(broker: Broker) -> None:
    with pytest.raises(TypeError):
        broker.set_meta("job:5", {"when": object()})


# -- Redis only: several workers, outages -------------------------------------------------------


def redis_broker(url: str, prefix: str, **options: Any) -> Any:
    from stream.broker.redis import RedisBroker

    return RedisBroker(url, prefix=prefix, **options)


def test_two_brokers_on_one_redis_see_each_other(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    one, two = redis_broker(redis_url, prefix), redis_broker(redis_url, prefix)
    try:
        sub = two.subscribe("channel:x")
        job = one.publish("job:1", items("a"))
        new = one.publish("channel:x", items("b"))
        assert ids_of(collect(sub, 1)) == new
        replay = two.subscribe("job:1", from_start=True)
        assert ids_of(collect(replay, 1)) == job
        one.set_meta("job:1", {"status": "running"})
        assert two.get_meta("job:1") == {"status": "running"}
        sub.close()
        replay.close()
    finally:
        one.close()
        two.close()


def test_a_new_key_does_not_wait_for_the_readers_block(redis_url: str) -> None:
    broker = redis_broker(redis_url, f"test:{uuid.uuid4().hex}:", block=30.0)
    try:
        first = broker.subscribe("a")
        broker.publish("a", items(1))
        collect(first, 1)  # the reader now blocks for up to 30 s on "a"
        second = broker.subscribe("b")
        start = time.monotonic()
        new = broker.publish("b", items(2))
        assert ids_of(collect(second, 1, timeout=10)) == new
        assert time.monotonic() - start < 5
        first.close()
        second.close()
    finally:
        broker.close()


def test_redis_restart_loses_nothing_acknowledged_and_duplicates_nothing(
    restart_redis: RedisServer,
) -> None:
    server = restart_redis
    broker = redis_broker(server.url, f"test:{uuid.uuid4().hex}:", connect_timeout=0.5)
    sub = broker.subscribe("k")
    received: list[Envelope] = []
    failures: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            while not stop.is_set():
                received.extend(sub.get(0.2))
        except BaseException as exc:
            failures.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        acknowledged = broker.publish("k", items("before"))
        wait_for(lambda: len(received) == 1, timeout=10)
        # Acknowledged just before the outage: the reader may not have read it yet.
        acknowledged += broker.publish("k", items("right before"))
        server.stop()
        with pytest.raises(BrokerUnavailable) as info:
            broker.publish("k", items("while down"))
        assert info.value.__cause__ is not None
        assert not broker.healthy()
        server.start()
        wait_for(broker.healthy, timeout=10)
        acknowledged += wait_for(lambda: broker.publish("k", items("after")), timeout=10)
        acknowledged += broker.publish("k", items("later"))
        wait_for(lambda: len(received) >= len(acknowledged), timeout=15)
        assert quiet_list(received, len(acknowledged))
        assert ids_of(received) == acknowledged
        assert [orjson.loads(e.data) for e in received] == [
            "before",
            "right before",
            "after",
            "later",
        ]
        assert failures == []
    finally:
        stop.set()
        reader.join(10)
        sub.close()
        broker.close()


def quiet_list(received: list[Envelope], n: int, wait: float = 0.3) -> bool:
    """Whether ``received`` stays at ``n`` entries for ``wait`` s (no late duplicate)."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if len(received) != n:
            return False
        time.sleep(0.02)
    return len(received) == n


def test_unreachable_redis_is_broker_unavailable() -> None:
    broker = redis_broker(f"redis://127.0.0.1:{free_closed_port()}/0", "x:", connect_timeout=0.5)
    try:
        assert not broker.healthy()
        with pytest.raises(BrokerUnavailable):
            broker.publish("k", items(1))
        with pytest.raises(BrokerUnavailable):
            broker.subscribe("k")
        with pytest.raises(BrokerUnavailable):
            broker.get_meta("k")
        with pytest.raises(BrokerUnavailable):
            broker.set_meta("k", {})
        with pytest.raises(BrokerUnavailable):
            broker.expire("k", 1)
    finally:
        broker.close()


def free_closed_port() -> int:
    from tests.redis_server import free_port

    return free_port()


def test_redis_reader_logs_a_non_transient_error_every_time(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong key (WRONGTYPE) is no outage: its traceback is logged on every retry, not once."""
    import redis

    from stream.broker.redis import RedisBroker

    prefix = f"test:{uuid.uuid4().hex}:"
    broker = RedisBroker(redis_url, prefix=prefix)
    other = redis.Redis.from_url(redis_url)
    try:
        sub = broker.subscribe("k")
        with caplog.at_level("WARNING", logger="stream"):
            other.delete(f"{prefix}log:k")
            other.set(f"{prefix}log:k", "not a stream")
            broker.publish("other", items(1))  # wakes the reader: its next XREAD fails

            def failures() -> list[logging.LogRecord]:
                return [r for r in caplog.records if "Redis reader failed" in r.getMessage()]

            wait_for(lambda: len(failures()) >= 2, timeout=10)
            assert all(r.levelname == "ERROR" and r.exc_info for r in failures())
            assert not any("cannot read" in r.getMessage() for r in caplog.records)
        sub.close()
    finally:
        other.delete(f"{prefix}log:k")
        other.close()
        broker.close()
