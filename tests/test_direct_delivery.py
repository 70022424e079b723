"""Units of direct delivery: a fan-out writes a publish to a waiting subscriber's socket itself.

``LocalSubscription.deliver_to`` hands a live batch to a sink while the reader waits with
nothing queued; ``GeventWriter._deliver`` is the sink of a stream whose generator follows the
subscription. Whatever the sink takes or declines, the subscriber gets every entry once and in
order, and the bytes on the wire stay framed (a partial write owes its rest, which goes out
before anything else). End to end, through gunicorn: tests/test_channels_jobs.py (every
channel test runs this path) and ``test_a_subscriber_that_stops_reading_*`` below.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import gevent
import gevent.event
import gevent.socket
import orjson
import pytest
import requests

from stream.broker.base import IdTuple, LocalSubscription
from stream.encoders import encoder_for
from stream.event import Envelope, SharedEnvelope
from stream.formats import NDJSON, SSE
from stream.pacing import State, Transport
from stream.runners import GeventWriter
from tests.service import Service, wait_for

pytestmark = pytest.mark.timeout(30)


def entry(n: int, data: bytes = b"{}") -> SharedEnvelope:
    return SharedEnvelope(f"{n}-0", "message", data)


def ids(n: int) -> tuple[IdTuple, IdTuple]:
    return (n, 0), (n, 0)


class Sink:
    def __init__(self, takes: bool) -> None:
        self.takes = takes
        self.batches: list[list[Envelope]] = []

    def __call__(self, batch: list[Envelope]) -> bool:
        self.batches.append(batch)
        return self.takes


def waiting_reader(sub: LocalSubscription, timeout: float) -> tuple[threading.Thread, list[object]]:
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(sub.get(timeout)))
    thread.start()
    wait_for(lambda: sub._waiting, 5, 0.005)
    return thread, got


# -- the subscription's side -----------------------------------------------------------------


def test_a_waiting_reader_is_not_woken_for_what_the_sink_took() -> None:
    sub = LocalSubscription("k", 100, lambda s: None)
    sink = Sink(takes=True)
    sub.deliver_to(sink)
    thread, got = waiting_reader(sub, 0.3)
    batch = [entry(1)]
    assert sub.push(batch, *ids(1))
    assert sink.batches == [batch]
    assert not sub._event.is_set()  # no wake-up
    thread.join(5)
    assert got == [[]]  # the wait timed out: the reader never saw the batch
    # A duplicate of what the sink took is dropped like any duplicate.
    thread, got = waiting_reader(sub, 0.2)
    assert sub.push([entry(1)], *ids(1))
    thread.join(5)
    assert sink.batches == [batch] and got == [[]]


def test_what_the_sink_declines_reaches_the_reader_in_order() -> None:
    sub = LocalSubscription("k", 100, lambda s: None)
    sink = Sink(takes=False)
    sub.deliver_to(sink)
    thread, got = waiting_reader(sub, 5.0)
    assert sub.push([entry(1)], *ids(1))
    # Queued (and the reader woken): what follows queues behind it, never around it.
    sink.takes = True
    assert sub.push([entry(2)], *ids(2))
    thread.join(5)
    assert len(sink.batches) == 1
    taken = got[0] + sub.get(0)  # type: ignore[operator]
    assert [e.id for e in taken] == ["1-0", "2-0"]


def test_no_sink_while_the_reader_is_busy_or_has_a_replay() -> None:
    sub = LocalSubscription("k", 100, lambda s: None)
    sink = Sink(takes=True)
    sub.deliver_to(sink)
    assert sub.push([entry(1)], *ids(1))  # nobody waits: queued
    assert sink.batches == []
    assert [e.id for e in sub.get(0)] == ["1-0"]
    sub.start([entry(0)], None)  # a replay not taken yet
    assert sub.push([entry(2)], *ids(2))
    assert sink.batches == []
    assert [e.id for e in sub.get(0)] == ["0-0", "2-0"]


def test_closing_forgets_the_sink() -> None:
    sub = LocalSubscription("k", 100, lambda s: None)
    sub.deliver_to(Sink(takes=True))
    sub.close()
    assert sub._sink is None
    sub2 = LocalSubscription("k", 100, lambda s: None)
    sub2.deliver_to(Sink(takes=True))
    sub2.deliver_to(None)
    assert sub2._sink is None


# -- the writer's side -----------------------------------------------------------------------


class Source:
    """A ``DirectSource``: keeps the sink the writer gives it."""

    def __init__(self) -> None:
        self.sink: Callable[[list[Envelope]], bool] | None = None

    def deliver_to(self, sink: Callable[[list[Envelope]], bool] | None) -> None:
        self.sink = sink


class Parked:
    """A generator that waits (on a gevent event) for what to yield, as a follower would."""

    def __init__(self) -> None:
        self.ready = gevent.event.Event()
        self.queue: list[Envelope] = []

    def items(self) -> Iterator[Envelope]:
        while True:
            self.ready.wait()
            self.ready.clear()
            yield from self.queue
            self.queue.clear()


def inline_writer(
    media_type: str = NDJSON,
    framing: str = "chunked",
    heartbeat: float = 60,
    write_timeout: float | None = None,
) -> tuple[GeventWriter, Source, Parked, socket.socket, list[bytes]]:
    """A writer parked inside its generator (INLINE), its socket's peer, and what it returned."""
    ours, peer = gevent.socket.socketpair()
    SOCKETS.extend([ours, peer])
    source, parked = Source(), Parked()
    writer = GeventWriter(
        parked.items(),
        encoder_for(media_type),
        envelopes=True,
        heartbeat=heartbeat,
        write_timeout=write_timeout,
        sock=ours,
        transport=Transport(framing=framing, has_socket=True),
        direct=source,
    )
    returned: list[bytes] = []

    def serve() -> None:  # as the server's greenlet does
        for data in writer:
            if data:  # b"": the headers' turn
                returned.append(data)

    SERVING[writer] = gevent.spawn(serve)
    settle(lambda: writer._in_gen)  # the generator waits for its next value
    assert writer._pacer.state is State.INLINE and source.sink is not None
    assert writer._in_gen
    # The first keep-alive went out FIRST_BYTES_WAIT after the headers: out of the way.
    keepalive = encoder_for(media_type).keepalive
    if framing == "chunked":
        keepalive = b"%X\r\n%s\r\n" % (len(keepalive), keepalive)
    assert read_exactly(peer, len(keepalive)) == keepalive
    return writer, source, parked, peer, returned


SERVING: dict[GeventWriter, gevent.Greenlet] = {}


def settle(condition: Callable[[], object]) -> None:
    """Wait (bounded) for what this thread's greenlets do next."""
    wait_for(condition, 5, 0.001, sleep=gevent.sleep)


SOCKETS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_sockets() -> Iterator[None]:
    yield
    while SOCKETS:
        SOCKETS.pop().close()


def finish(writer: GeventWriter) -> None:
    """End the stream as a worker's stop would, then close it as the server does."""
    writer.shut_down(retry_ms=0)
    SERVING.pop(writer).join(timeout=5)
    writer.close()


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk
        data += chunk
    return data


def test_the_sink_writes_a_chunk_framed_batch_while_the_generator_waits() -> None:
    writer, source, parked, peer, returned = inline_writer()
    assert source.sink is not None
    line1 = b'{"id":"1-0","event":"message","data":{"a":1}}\n'
    line2 = b'{"id":"2-0","event":"message","data":{"a":2}}\n'
    assert source.sink([entry(1, b'{"a":1}'), entry(2, b'{"a":2}')])
    expected = b"%X\r\n%s\r\n" % (len(line1 + line2), line1 + line2)
    assert read_exactly(peer, len(expected)) == expected
    assert writer._events == 2 and returned == []
    # The generator's own next value goes out after it, through the server.
    parked.queue.append(entry(3, b'{"a":3}'))
    parked.ready.set()
    settle(lambda: returned)
    assert returned == [b'{"id":"3-0","event":"message","data":{"a":3}}\n']
    finish(writer)
    assert source.sink is None


def test_sse_over_http10_is_written_unframed() -> None:
    writer, source, _, peer, _ = inline_writer(SSE, framing="close")
    assert source.sink is not None
    assert source.sink([entry(7, b"[1]")])
    expected = b"id: 7-0\ndata: [1]\n\n"
    assert read_exactly(peer, len(expected)) == expected
    finish(writer)


def test_a_full_socket_owes_the_rest_and_pays_it_before_anything_else() -> None:
    writer, source, parked, peer, returned = inline_writer()
    assert source.sink is not None
    ours = writer._sock
    assert ours is not None
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    big = b'"' + b"x" * 2_000_000 + b'"'
    assert source.sink([entry(1, big)])  # taken: the socket took part, the rest is owed
    assert writer._owed
    # Nothing goes around an owed rest: the next batch is declined (the generator gets it).
    assert not source.sink([entry(2)])
    parked.queue.append(entry(2))
    line1 = b'{"id":"1-0","event":"message","data":' + big + b"}\n"
    first = b"%X\r\n%s\r\n" % (len(line1), line1)
    line2 = b'{"id":"2-0","event":"message","data":{}}\n'
    received = gevent.spawn(read_exactly, peer, len(first))
    assert received.get(timeout=10) == first  # the write watcher finished the rest
    assert not writer._owed and writer._owed_watcher is None
    parked.ready.set()
    settle(lambda: returned)
    assert returned == [line2]
    finish(writer)


def test_a_rest_the_client_never_reads_ends_the_stream_after_the_write_timeout() -> None:
    writer, source, parked, peer, returned = inline_writer(heartbeat=0.05, write_timeout=0.2)
    assert source.sink is not None
    ours = writer._sock
    assert ours is not None
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    assert source.sink([entry(1, b'"' + b"x" * 2_000_000 + b'"')])
    assert writer._owed
    serving = SERVING.pop(writer)
    serving.join(timeout=5)  # the heartbeat gave up on the rest: the stream ended
    assert serving.dead
    assert not writer._owed and writer._owed_watcher is None
    writer.close()
    assert writer._pacer.reason == "disconnect"


def test_the_sink_declines_once_the_generator_is_not_waiting() -> None:
    writer, source, parked, _, _ = inline_writer()
    sink = source.sink
    assert sink is not None
    writer.shut_down(retry_ms=0)
    SERVING.pop(writer).join(timeout=5)  # the generator was stopped where it waited
    assert not writer._in_gen
    assert not sink([entry(1)])
    writer.close()
    assert not sink([entry(2)])
    assert writer._events == 0


def test_a_stream_that_never_ran_inline_gives_no_sink() -> None:
    source, parked = Source(), Parked()
    writer = GeventWriter(
        parked.items(),
        encoder_for(NDJSON),
        envelopes=True,
        heartbeat=60,
        transport=Transport(),  # no socket: nothing may go around the server
        direct=source,
    )
    writer._start()
    assert writer._pacer.state is State.PRODUCER
    assert source.sink is None
    writer.close()


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_subscriber_that_stops_reading_gets_everything_intact_once_it_reads(
    service: Service,
) -> None:
    """Its socket fills while the fan-out writes for it: partial writes, an owed rest, then
    declined batches its generator writes through the server. Every event arrives, framed."""
    channel = f"direct-{uuid.uuid4().hex[:8]}"
    slow = socket.create_connection(("127.0.0.1", service.port), timeout=10)
    slow.sendall(f"GET /channels/{channel} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += slow.recv(1)
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    wait_for(lambda: service.metrics()["stream_open_streams"] >= 1)
    pad = "y" * 100_000
    # 12 MB: more than the kernel's buffers between the two hold while it does not read (the
    # server's send buffer grows to 4 MB at most, net.ipv4.tcp_wmem), so the socket fills.
    total = 120
    for n in range(total):
        resp = requests.post(
            f"{service.url}/channels/{channel}",
            data=orjson.dumps({"n": n, "pad": pad}),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert resp.status_code == 201
    body, values = b"", []
    slow.settimeout(20)
    while len(values) < total:
        chunk = slow.recv(1 << 20)
        assert chunk, "the stream ended early"
        body += chunk
        chunks, body = dechunk(body)
        for data in chunks:
            values += data.decode().splitlines(keepends=True)
    lines = [orjson.loads(v) for v in values if v.strip()]
    assert [line["data"]["n"] for line in lines] == list(range(total))
    assert all(line["data"]["pad"] == pad for line in lines)
    slow.close()


def dechunk(body: bytes) -> tuple[list[bytes], bytes]:
    """The whole chunks at the head of a chunked body, and the rest."""
    chunks = []
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            return chunks, body
        size = int(size_line, 16)
        if len(rest) < size + 2:
            return chunks, body
        assert rest[size : size + 2] == b"\r\n", "a chunk is not followed by CRLF"
        chunks.append(rest[:size])
        body = rest[size + 2 :]


# -- the fan-out's pace ----------------------------------------------------------------------


class Clock:
    """``time`` as stream.broker.base sees it: gevent's sleep (as the worker's monkey-patching
    gives it), and a thread CPU clock a test can hold still (as if the thread waited)."""

    def __init__(self, cpu_runs: bool = True) -> None:
        self.monotonic = time.monotonic
        self.cpu_runs = cpu_runs
        self.sleeps: list[float] = []

    def thread_time(self) -> float:
        return time.thread_time() if self.cpu_runs else 0.0

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        gevent.sleep(seconds)


def waiting_subscriptions(
    count: int, sink: Callable[[list[Envelope]], bool]
) -> list[LocalSubscription]:
    subs = []
    for _ in range(count):
        sub = LocalSubscription("k", 100, lambda s: None)
        sub.deliver_to(sink)
        sub._waiting = True  # as a reader parked in get() is
        subs.append(sub)
    return subs


def test_a_fan_out_that_writes_itself_lets_the_hub_poll_sockets_between_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stream.broker import base

    monkeypatch.setattr(base, "time", Clock())
    written: list[int] = []

    def sink(batch: list[Envelope]) -> bool:
        until = time.perf_counter() + 20e-6  # a write's cost
        while time.perf_counter() < until:
            pass
        written.append(1)
        return True

    subs = waiting_subscriptions(base.FANOUT_SLICE * 40, sink)  # about 50 ms of writes
    ours, peer = gevent.socket.socketpair()
    SOCKETS.extend([ours, peer])
    sent_at: list[int] = []
    seen_at: list[int] = []

    def request() -> None:  # another thread: a request arriving while the fan-out runs
        wait_for(lambda: len(written) >= 5 * base.FANOUT_SLICE, 10, 0.0005)
        sent_at.append(len(written))
        peer.sendall(b"a request")

    reader = gevent.spawn(lambda: (ours.recv(100), seen_at.append(len(written))))
    gevent.sleep(0)  # the reader waits for its socket
    sender = threading.Thread(target=request)
    sender.start()
    fanning = gevent.spawn(
        base.fan_out, subs, [([Envelope("1-0", "message", b"{}")], (1, 0), (1, 0), None)]
    )
    assert fanning.get(timeout=10) == []
    reader.join(timeout=5)
    sender.join(5)
    assert len(written) == len(subs)
    # Served within a slice or two of its arrival, not after the whole fan-out.
    assert seen_at and seen_at[0] - sent_at[0] <= 2 * base.FANOUT_SLICE, (sent_at, seen_at)


def test_a_fan_out_that_waited_for_a_cpu_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream.broker import base

    subs = waiting_subscriptions(base.FANOUT_SLICE * 3, lambda batch: True)
    batches = [([Envelope("1-0", "message", b"{}")], (1, 0), (1, 0), None)]
    busy = Clock()  # CPU time keeps up with wall time: nobody else wanted the core
    monkeypatch.setattr(base, "time", busy)
    base.fan_out(subs, batches)
    assert busy.sleeps == [base._YIELD, base._YIELD]
    starved = Clock(cpu_runs=False)  # wall time passes, CPU time does not: it waited for one
    monkeypatch.setattr(base, "time", starved)
    for sub in subs:
        sub._last = None
    fake_wait = time.monotonic
    ticks = iter(range(1_000_000))
    monkeypatch.setattr(starved, "monotonic", lambda: fake_wait() + next(ticks) * 0.01)
    base.fan_out(subs, batches)
    assert starved.sleeps == [base.FANOUT_BACKOFF, base.FANOUT_BACKOFF]
