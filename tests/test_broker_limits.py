"""Brokers at their limits: publishes larger than the history or a queue, resume ids ahead of
the log, Redis that cannot write (out of memory, read-only, paused), a reader that falls behind
the trim, the in-process broker's byte bound, and huge publishes on Redis."""

from __future__ import annotations

import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
import requests
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from stream.broker import Broker, BrokerUnavailable, MemoryBroker, create_broker
from stream.encoders import dumps_compact
from stream.event import Envelope
from tests.service import Service, wait_for
from tests.test_broker import MakeBroker, collect, ids_of, items, quiet, reset_fields

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["memory", "redis"])
def make_broker(request: pytest.FixtureRequest) -> Iterator[MakeBroker]:
    """Build brokers of one kind (same key prefix within a test, fresh per test); closed after."""
    made: list[Any] = []

    def make(**options: Any) -> Any:
        if request.param == "memory":
            broker: Any = MemoryBroker(**options)
        else:
            broker = redis_broker(request.getfixturevalue("redis_url"), **options)
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


def redis_broker(url: str, **options: Any) -> Any:
    from stream.broker.redis import RedisBroker

    return RedisBroker(url, prefix=f"test:{uuid.uuid4().hex}:", **options)


@pytest.fixture
def admin(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client to the session's Redis, for CONFIG and inspection."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    yield client
    client.close()


# -- item 3: a publish larger than the history or the queue -------------------------------------


def test_a_publish_larger_than_history_and_queue_reaches_a_live_subscriber_whole(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker()  # the service's defaults: 10,000 entries of history and of queue
    sub = broker.subscribe("channel:big")
    try:
        published = broker.publish("channel:big", items(*range(12_000)))
        got = collect(sub, 12_000, timeout=30)
        assert ids_of(got) == published
        assert [orjson.loads(e.data) for e in got] == list(range(12_000))
        assert all(e.event == "message" for e in got)
        more = broker.publish("channel:big", items("after"))
        assert ids_of(collect(sub, 1)) == more
    finally:
        sub.close()
    # The history keeps the newest 10,000; a resume from before them says so.
    replay = broker.subscribe("channel:big", published[0])
    try:
        got = collect(replay, 10_001, timeout=30)
        assert reset_fields(got[0]) == {
            "last_event_id": published[0],
            "first_retained_id": published[2_001],
        }
        assert ids_of(got[1:]) == published[2_001:] + more
    finally:
        replay.close()


def test_a_big_publish_behind_a_small_one_not_yet_read_is_accepted(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker(queue_size=100)
    sub = broker.subscribe("k")
    try:
        small = broker.publish("k", items("first"))
        big = broker.publish("k", items(*range(1_000)))
        assert ids_of(collect(sub, 1_001)) == small + big
    finally:
        sub.close()


def test_falling_behind_by_more_than_the_queue_still_cuts_off() -> None:
    # In process only: the Redis reader coalesces what it reads at once into one batch.
    from stream.broker import SlowConsumer

    broker = MemoryBroker(queue_size=100)
    slow = broker.subscribe("k")
    try:
        broker.publish("k", items(*range(1_000)))  # pending, and the largest batch: accepted
        for i in range(101):  # 101 more single entries behind it: cut off
            broker.publish("k", items(i))
        assert broker.subscriber_count("k") == 0
        with pytest.raises(SlowConsumer):
            slow.get(1)
    finally:
        slow.close()
        broker.close()


def test_mixed_event_types_in_one_publish_keep_their_types(broker: Broker) -> None:
    sub = broker.subscribe("k")
    try:
        batch = [("a", b"1"), ("b", b'"two"'), ("a", b"[3]")] * 3
        ids = broker.publish("k", batch)
        got = collect(sub, 9)
        assert [(e.event, e.data) for e in got] == batch and ids_of(got) == ids
    finally:
        sub.close()
    replay = broker.subscribe("k", from_start=True)
    try:
        assert [(e.event, e.data) for e in collect(replay, 9)] == batch
    finally:
        replay.close()


def test_a_resume_inside_a_publish_replays_the_rest_of_it(broker: Broker) -> None:
    ids = broker.publish("k", items(*range(10)))
    sub = broker.subscribe("k", ids[3])
    try:
        assert ids_of(collect(sub, 6)) == ids[4:]
        assert quiet(sub, 0.1) == []
    finally:
        sub.close()


def test_redis_history_trims_inside_a_publish_exactly(redis_url: str) -> None:
    broker = redis_broker(redis_url, max_len=5)
    try:
        ids = broker.publish("k", items(*range(8)))
        sub = broker.subscribe("k", from_start=True)
        assert ids_of(collect(sub, 5)) == ids[3:]
        sub.close()
        sub = broker.subscribe("k", ids[1])
        got = collect(sub, 6)
        assert reset_fields(got[0])["first_retained_id"] == ids[3]
        assert ids_of(got[1:]) == ids[3:]
        sub.close()
        sub = broker.subscribe("k", ids[2])  # the newest trimmed value: nothing lost after it
        assert ids_of(collect(sub, 5)) == ids[3:]
        sub.close()
    finally:
        broker.close()


def test_redis_reader_behind_the_trim_gives_a_reset_not_a_silent_gap(redis_url: str) -> None:
    reading = redis_broker(redis_url, max_len=5)
    publishing = redis_broker(redis_url, max_len=5)
    publishing.prefix = reading.prefix  # two workers of one service
    sub = reading.subscribe("k")
    try:
        first = publishing.publish("k", items("seen"))
        assert ids_of(collect(sub, 1)) == first
        # Stall this worker's reader (it takes the broker's lock between reads), as a busy
        # worker would, while another worker publishes past the history.
        with reading._lock:
            lost = publishing.publish("k", items(*range(10)))
            lost += publishing.publish("k", items(*range(10)))  # removes the first ten
            kept = publishing.publish("k", items(*range(10)))  # removes the second ten
        got: list[Envelope] = []
        wait_for(lambda: got.extend(sub.get(0.2)) or (got and got[-1].id == kept[-1]), 20)
        resets = [e for e in got if e.event == "reset"]
        assert len(resets) == 1, got
        fields = reset_fields(resets[0])
        before = ids_of(got[: got.index(resets[0])])
        after = ids_of(got[got.index(resets[0]) + 1 :])
        assert before == lost[: len(before)]  # before it: what the reader still got, in order
        # The reset names the subscriber's position: the last entry it got before the gap.
        assert fields["last_event_id"] == (before[-1] if before else first[0])
        assert fields["first_retained_id"] == after[0]
        # A read already under way when the stall began may still see the second publish
        # before the third removes it; either way the reset sits exactly at the gap and what
        # follows it is whole and in order.
        assert before in ([], lost[:10]) and after in (kept, lost[10:] + kept)
    finally:
        sub.close()
        reading.close()
        publishing.close()


def test_redis_split_publish_reaches_a_live_subscriber_in_one_batch(redis_url: str) -> None:
    from stream.broker import redis as module

    broker = redis_broker(redis_url)
    sub = broker.subscribe("k")
    try:
        value = orjson.dumps("x" * 1_000)
        count = module._CALL_BYTES // len(value) + 2_000  # more than one script call
        assert len(module._pack([("message", value)] * count)) == 2
        ids = broker.publish("k", [("message", value)] * count)
        got: list[Envelope] = []
        wait_for(lambda: got.extend(sub.get(0.5)) or got, timeout=30)
        # Whole at the first delivery: the reader held the first call back until the second.
        assert ids_of(got) == ids
    finally:
        sub.close()
        broker.close()


def test_redis_reads_and_trims_entries_of_the_previous_layout(
    redis_url: str, admin: redis.Redis
) -> None:
    broker = redis_broker(redis_url, max_len=5)
    log_key = f"{broker.prefix}log:k"
    try:
        legacy = [
            admin.xadd(log_key, {"e": "message", "d": orjson.dumps(i)}).decode() for i in range(8)
        ]
        sub = broker.subscribe("k", legacy[0])
        assert ids_of(collect(sub, 7)) == legacy[1:]
        new = broker.publish("k", items("new"))
        assert ids_of(collect(sub, 1)) == new
        sub.close()
        # Trimmed to the newest five values, old layout and new together.
        sub = broker.subscribe("k", from_start=True)
        assert ids_of(collect(sub, 5)) == legacy[4:] + new
        sub.close()
        sub = broker.subscribe("k", legacy[2])
        got = collect(sub, 6)
        assert reset_fields(got[0])["first_retained_id"] == legacy[4]
        sub.close()
    finally:
        broker.close()


# -- item 10: bounded work per Redis call ---------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "size"),
    [
        pytest.param(524_000, 1, id="1MiB-of-one-digit-values"),
        pytest.param(9_000, 1_000, id="9MB-of-1KB-values"),
        pytest.param(3, 3_000_000, id="values-over-the-entry-size"),
        pytest.param(1, 0, id="one-empty-value"),
    ],
)
def test_a_publish_is_packed_into_calls_of_bounded_size(count: int, size: int) -> None:
    from stream.broker import redis as module

    values = [("message", b"7" * size)] * count
    calls = module._pack(values)
    total = 0
    for call in calls:
        entries = len(call) // 5
        assert entries <= module._CALL_ENTRIES
        call_bytes = sum(len(d) for d in call[4::5])
        assert call_bytes <= max(module._CALL_BYTES, size)
        for n, data in zip(call[::5], call[4::5], strict=True):
            assert n <= module._ENTRY_VALUES
            assert len(data) <= module._ENTRY_BYTES or n == 1
            total += n
    assert total == count
    if count * size <= 1 << 20:
        assert len(calls) == 1  # any body the service accepts is one atomic call


def test_a_small_publish_during_a_huge_one_completes_first(
    redis_url: str, admin: redis.Redis
) -> None:
    from stream.broker import redis as module

    big_broker = redis_broker(redis_url)
    small_broker = redis_broker(redis_url)
    order: list[str] = []
    started = threading.Event()

    def big() -> None:
        started.set()
        big_broker.publish("channel:big", [("message", b"1")] * 524_000)
        order.append("big")

    thread = threading.Thread(target=big)
    thread.start()
    try:
        started.wait(10)
        small_broker.publish("channel:small", items("small"))
        order.append("small")
        thread.join(60)
        assert not thread.is_alive()
        assert order == ["small", "big"]
        # The 524,000 values are 128 entries, written by one call: bounded work in Redis.
        entries = admin.xlen(f"{big_broker.prefix}log:channel:big")
        assert entries == -(-524_000 // module._ENTRY_VALUES) <= module._CALL_ENTRIES
    finally:
        thread.join(60)
        big_broker.close()
        small_broker.close()


# -- item 8: a resume id ahead of the log ---------------------------------------------------------


AHEAD = "9999999999999-0"


@pytest.mark.parametrize("history", [True, False], ids=["log", "no-log"])
def test_a_resume_id_ahead_of_the_log_resets_then_follows_the_live_tail(
    broker: Broker, history: bool
) -> None:
    if history:
        broker.publish("channel:x", items("old", "older"))
    sub = broker.subscribe("channel:x", AHEAD)
    try:
        got = collect(sub, 1)
        assert reset_fields(got[0]) == {"last_event_id": AHEAD, "first_retained_id": None}
        new = broker.publish("channel:x", items("new"))  # an id smaller than AHEAD
        assert ids_of(collect(sub, 1)) == new
        assert quiet(sub, 0.1) == []
    finally:
        sub.close()


def test_the_largest_id_is_ahead_of_the_log_too(broker: Broker) -> None:
    broker.publish("k", items(1))
    top = "18446744073709551615-18446744073709551615"
    sub = broker.subscribe("k", top)
    try:
        assert reset_fields(collect(sub, 1)[0])["first_retained_id"] is None
        new = broker.publish("k", items(2))
        assert ids_of(collect(sub, 1)) == new
    finally:
        sub.close()


# -- item 4: Redis that cannot write --------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        pytest.param(RedisConnectionError("refused"), True, id="down"),
        pytest.param(RedisTimeoutError("timed out"), True, id="paused"),
        pytest.param(BusyLoadingError("loading"), True, id="loading"),
        pytest.param(OutOfMemoryError("command not allowed", status_code="OOM"), True, id="oom"),
        pytest.param(ReadOnlyError("replica", status_code="READONLY"), True, id="read-only"),
        pytest.param(ResponseError("BUSY Redis is busy running a script"), True, id="busy"),
        pytest.param(ResponseError("MISCONF cannot persist"), True, id="misconf"),
        pytest.param(ResponseError("NOREPLICAS Not enough good replicas"), True, id="noreplicas"),
        pytest.param(ResponseError("MASTERDOWN Link with MASTER is down"), True, id="masterdown"),
        pytest.param(ResponseError("WRONGTYPE Operation against a key"), False, id="wrongtype"),
        pytest.param(ResponseError("ERR syntax error"), False, id="syntax"),
    ],
)
def test_redis_errors_that_mean_cannot_serve_now(error: Exception, unavailable: bool) -> None:
    from stream.broker.redis import _translated

    with pytest.raises(BrokerUnavailable if unavailable else type(error)) as info:
        with _translated():
            raise error
    if unavailable:
        assert info.value.__cause__ is error


def test_out_of_memory_redis_is_broker_unavailable(redis_url: str, admin: redis.Redis) -> None:
    broker = redis_broker(redis_url)
    try:
        ids = broker.publish("job:1", items("before"))
        broker.set_meta("job:1", {"status": "running"})
        sub = broker.subscribe("job:1", from_start=True)
        assert ids_of(collect(sub, 1)) == ids
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            assert not broker.healthy()
            with pytest.raises(BrokerUnavailable) as info:
                broker.publish("job:1", items("refused"))
            assert isinstance(info.value.__cause__, OutOfMemoryError)
            with pytest.raises(BrokerUnavailable):
                broker.set_meta("job:1", {"status": "done"}, ttl=60)
            # Nothing of the refused publish was appended.
            assert admin.xlen(f"{broker.prefix}log:job:1") == 1
        finally:
            admin.config_set("maxmemory", 0)
        assert broker.healthy()
        new = broker.publish("job:1", items("after"))
        assert ids_of(collect(sub, 1)) == new
        sub.close()
    finally:
        broker.close()


def test_read_only_redis_is_broker_unavailable(redis_url: str, admin: redis.Redis) -> None:
    from tests.service import free_port

    broker = redis_broker(redis_url)
    try:
        broker.publish("k", items(1))
        # A replica of a primary that is not there: it keeps its data and refuses writes.
        admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        try:
            wait_for(lambda: not broker.healthy(), timeout=10)
            with pytest.raises(BrokerUnavailable) as info:
                broker.publish("k", items(2))
            assert isinstance(info.value.__cause__, ReadOnlyError)
            with pytest.raises(BrokerUnavailable):
                broker.expire("k", 10)
        finally:
            admin.execute_command("REPLICAOF", "NO", "ONE")
        wait_for(broker.healthy, timeout=10)
        assert len(broker.publish("k", items(3))) == 1
    finally:
        broker.close()


def test_paused_redis_is_broker_unavailable(redis_url: str, admin: redis.Redis) -> None:
    broker = redis_broker(redis_url, socket_timeout=0.5)
    try:
        broker.publish("k", items(1))
        admin.execute_command("CLIENT", "PAUSE", "20000", "WRITE")
        try:
            assert not broker.healthy()
            with pytest.raises(BrokerUnavailable) as info:
                broker.publish("k", items(2))
            assert isinstance(info.value.__cause__, RedisTimeoutError)
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        wait_for(broker.healthy, timeout=10)
    finally:
        broker.close()


def test_out_of_memory_redis_is_503_through_the_service(
    start_service: Callable[..., Service], redis_url: str, admin: redis.Redis
) -> None:
    svc = start_service({"REDIS_URL": redis_url})
    url = svc.url + "/channels/oom"
    assert requests.post(url, json={"n": 1}, timeout=10).status_code == 201
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    try:
        for body, kind in ((b'{"n": 2}', "application/json"), (b"1\n2\n", "application/x-ndjson")):
            response = requests.post(url, data=body, headers={"Content-Type": kind}, timeout=10)
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"].isdigit()
            assert response.json()["error"]["code"] == "broker_unavailable"
        health = requests.get(svc.url + "/healthz", timeout=10)
        assert health.status_code == 503
        assert health.json()["status"] == "degraded"
    finally:
        admin.config_set("maxmemory", 0)
    wait_for(lambda: requests.get(svc.url + "/healthz", timeout=10).status_code == 200, 10)
    assert requests.post(url, json={"n": 3}, timeout=10).status_code == 201
    assert "Traceback" not in svc.log()


# -- item 5: the in-process broker's memory -------------------------------------------------------


def test_memory_broker_bounds_the_bytes_of_all_logs_together() -> None:
    broker = MemoryBroker(max_bytes=2_000_000)
    try:
        value = orjson.dumps("x" * 1_000)
        jobs = [f"job:{i}" for i in range(30)]
        published = {key: broker.publish(key, [("message", value)] * 1_000) for key in jobs}
        assert broker._bytes <= 2_000_000
        # The newest publishes are there, whole.
        sub = broker.subscribe(jobs[-1], from_start=True)
        assert ids_of(collect(sub, 1_000)) == published[jobs[-1]]
        sub.close()
        # The oldest went first: a resume there says so, and what is left of it is its tail.
        first = broker.subscribe(jobs[0], published[jobs[0]][0])
        got = first.get(1)
        assert reset_fields(got[0])["last_event_id"] == published[jobs[0]][0]
        assert ids_of(got[1:]) == published[jobs[0]][len(published[jobs[0]]) - len(got) + 1 :]
        first.close()
        retained = sum(len(log.entries) for log in broker._logs.values())
        assert 0 < retained < 30 * 1_000
        # Every retained entry is newer than every evicted one, whatever its key.
        oldest = min(log.entries[0][0] for log in broker._logs.values() if log.entries)
        newest_trimmed = max(log.trimmed for log in broker._logs.values() if log.trimmed)
        assert newest_trimmed < oldest
    finally:
        broker.close()


def test_memory_broker_memory_stays_near_max_bytes_however_much_is_published() -> None:
    # The attack: many jobs of 1 KB events. 40 MB published, 4 MB allowed: what Python really
    # holds afterwards (tracemalloc) stays near the bound, not near what was published.
    broker = MemoryBroker(max_bytes=4_000_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for job in range(40):
            for batch in range(10):
                # As the service stores them: compact copies (see dumps_compact).
                values = [dumps_compact(f"{job}.{batch}.{i}".ljust(1_000, "x")) for i in range(100)]
                broker.publish(f"job:{job}", [("message", v) for v in values])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        broker.close()
    assert held < 2 * 4_000_000, held


def test_memory_broker_accounting_returns_to_zero_when_logs_expire() -> None:
    broker = MemoryBroker(max_bytes=10_000_000, max_len=50)
    try:
        for i in range(20):
            broker.publish(f"k{i}", items(*range(100)))  # trimmed to 50 by length
            broker.expire(f"k{i}", 0)
        assert broker._bytes == 0 and not broker._batches
    finally:
        broker.close()


def test_create_broker_passes_max_bytes() -> None:
    broker = create_broker(None, max_bytes=123_456)
    try:
        assert isinstance(broker, MemoryBroker) and broker.max_bytes == 123_456
    finally:
        broker.close()
    with pytest.raises(ValueError):
        MemoryBroker(max_bytes=0)


def ndjson_lines(response: requests.Response, n: int, timeout: float = 20.0) -> list[Any]:
    """The next ``n`` JSON lines of a streaming NDJSON response (keep-alives skipped)."""
    out: list[Any] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"only {out} within {timeout} s"
        chunk = response.raw.read1(65536)
        assert chunk, f"the stream ended after {out}"
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        out += [orjson.loads(line) for line in complete if line.strip()]
    return out


def test_a_resume_id_ahead_of_a_redis_channel_resets_through_the_service(
    start_service: Callable[..., Service], redis_url: str
) -> None:
    svc = start_service({"REDIS_URL": redis_url})
    url = f"{svc.url}/channels/ahead-{uuid.uuid4().hex}"
    assert requests.post(url, json="old", timeout=10).status_code == 201
    headers = {"Last-Event-ID": AHEAD, "Accept": "application/x-ndjson"}
    with requests.get(url, headers=headers, stream=True, timeout=(5, 20)) as response:
        assert response.status_code == 200
        reset = ndjson_lines(response, 1)[0]
        assert reset["event"] == "reset" and reset["data"]["last_event_id"] == AHEAD
        new = requests.post(url, json="new", timeout=10).json()["ids"]
        line = ndjson_lines(response, 1)[0]
        assert (line["id"], line["data"]) == (new[0], "new")


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_a_12000_value_publish_reaches_a_live_subscriber_whole_through_the_service(
    start_service: Callable[..., Service], request: pytest.FixtureRequest, kind: str
) -> None:
    env = {"REDIS_URL": request.getfixturevalue("redis_url")} if kind == "redis" else {}
    svc = start_service(env)
    url = f"{svc.url}/channels/big-{uuid.uuid4().hex}"
    headers = {"Accept": "application/x-ndjson"}
    with requests.get(url, headers=headers, stream=True, timeout=(5, 30)) as response:
        assert response.status_code == 200  # subscribed: the headers follow the subscription
        body = b"".join(b"%d\n" % i for i in range(12_000))
        published = requests.post(
            url, data=body, headers={"Content-Type": "application/x-ndjson"}, timeout=30
        )
        assert published.status_code == 201
        ids = published.json()["ids"]
        got = ndjson_lines(response, 12_000, timeout=60)
    assert [line["id"] for line in got] == ids
    assert [line["data"] for line in got] == list(range(12_000))
    assert all(line["event"] == "message" for line in got)
