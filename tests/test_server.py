"""``stream_response`` in process (the thread-based producer), through Flask's test client.

The gevent producer, the peer watcher and the shutdown hook run under gunicorn in the
end-to-end tests; these check what both backends share.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from flask import Flask, request

from stream.encoders import encoder_for
from stream.errors import RemoteError
from stream.event import Envelope
from stream.formats import SSE
from stream.server import StreamWriter, Unfinished, stream_response
from tests.service import wait_for

pytestmark = pytest.mark.timeout(30)


def make_app(source: Any, **kwargs: Any) -> Flask:
    app = Flask(__name__)
    app.config["STREAM_HEARTBEAT"] = kwargs.pop("heartbeat_config", 15.0)

    @app.get("/s")
    def s() -> Any:
        return stream_response(source(), **kwargs)

    return app


def lines(body: bytes) -> list[Any]:
    return [orjson.loads(line) for line in body.split(b"\n") if line.strip()]


def test_values_in_order() -> None:
    app = make_app(lambda: ({"i": i} for i in range(1000)))
    resp = app.test_client().get("/s")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/x-ndjson"
    assert lines(resp.data) == [{"i": i} for i in range(1000)]


def test_request_context_alive_in_generator() -> None:
    def gen() -> Iterator[Any]:
        yield {"arg": request.args["x"]}

    app = make_app(gen)
    assert lines(app.test_client().get("/s?x=42").data) == [{"arg": "42"}]


def test_coalescing_keeps_order_and_bounds_chunks() -> None:
    # A fast producer: many events per write, none lost or reordered, no write much above
    # max_chunk (one event may cross it).
    app = make_app(lambda: ({"i": i, "pad": "x" * 50} for i in range(20_000)), max_chunk=4096)
    resp = app.test_client().get("/s", buffered=False)
    chunks = list(resp.response)
    resp.close()
    values = lines(b"".join(chunks))
    assert [v["i"] for v in values] == list(range(20_000))
    assert len(chunks) < 20_000 / 10
    assert max(len(c) for c in chunks) < 4096 + 100


def test_slow_producer_events_are_not_held_back() -> None:
    # Each event of a slow producer is its own write, sent as soon as it is produced.
    def gen() -> Iterator[Any]:
        for i in range(3):
            time.sleep(0.05)
            yield {"i": i}

    app = make_app(gen)
    resp = app.test_client().get("/s", buffered=False)
    chunks = [c for c in resp.response if c.strip()]
    resp.close()
    assert [orjson.loads(c) for c in chunks] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_keepalive_while_generator_blocks() -> None:
    release = threading.Event()

    def gen() -> Iterator[Any]:
        yield {"first": True}
        release.wait(5)
        yield {"last": True}

    app = make_app(gen, heartbeat=0.05, format="text/event-stream")
    resp = app.test_client().get("/s", buffered=False)
    it = iter(resp.response)
    seen = []
    for chunk in it:
        seen.append(chunk)
        if seen.count(b":\n") >= 2:
            release.set()
    resp.close()
    body = b"".join(seen)
    assert body.startswith(b'data: {"first":true}\n\n')
    assert body.count(b":\n") >= 2
    assert body.endswith(b'data: {"last":true}\n\n')


def test_first_bytes_at_once_when_producer_is_slow() -> None:
    release = threading.Event()

    def gen() -> Iterator[Any]:
        release.wait(5)
        yield {"late": True}

    app = make_app(gen)
    resp = app.test_client().get("/s", buffered=False)
    it = iter(resp.response)
    start = time.monotonic()
    assert next(it) == b" "  # a keep-alive: the headers go out with it
    assert time.monotonic() - start < 1.0
    release.set()
    assert b"".join(it) == b'{"late":true}\n'
    resp.close()


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        pytest.param(RemoteError("quota", "no more"), "quota", "no more", id="remote-error"),
        pytest.param(
            ValueError("secret=hunter2"),
            "internal_error",
            "the stream failed on the server",
            id="other-hides-text",
        ),
    ],
)
def test_exception_becomes_error_event(exc: Exception, code: str, message: str) -> None:
    def gen() -> Iterator[Any]:
        yield {"i": 0}
        raise exc

    app = make_app(gen)
    assert lines(app.test_client().get("/s").data) == [
        {"i": 0},
        {"error": {"code": code, "message": message}},
    ]


def test_generator_finally_runs_when_client_leaves() -> None:
    finished = threading.Event()

    def gen() -> Iterator[Any]:
        try:
            i = 0
            while True:
                yield {"i": i}
                i += 1
                time.sleep(0.01)
        finally:
            finished.set()

    app = make_app(gen)
    resp = app.test_client().get("/s", buffered=False)
    it = iter(resp.response)
    next(it)
    resp.close()
    assert finished.wait(5)


def test_envelopes() -> None:
    def gen() -> Iterator[Envelope]:
        yield Envelope("1-0", "message", b'{"a":1}')
        yield Envelope("1-1", "end", b"{}")

    app = make_app(gen, envelopes=True)
    assert app.test_client().get("/s?format=sse").data.replace(b":\n", b"") == (
        b'id: 1-0\ndata: {"a":1}\n\nid: 1-1\nevent: end\ndata: {}\n\n'
    )
    assert lines(app.test_client().get("/s").data) == [
        {"id": "1-0", "event": "message", "data": {"a": 1}},
        {"id": "1-1", "event": "end", "data": {}},
    ]


def test_accept_json_gets_ndjson() -> None:
    # OpenAPI-generated clients send Accept: application/json: they get NDJSON, not a 406.
    app = make_app(lambda: iter([{"a": 1}, 2]))
    resp = app.test_client().get("/s", headers={"Accept": "application/json"})
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/x-ndjson"
    assert lines(resp.data) == [{"a": 1}, 2]


def test_not_acceptable_is_406_json() -> None:
    app = make_app(lambda: iter([1]))
    resp = app.test_client().get("/s", headers={"Accept": "text/html"})
    assert resp.status_code == 406
    assert resp.json == {
        "error": {"code": "not_acceptable", "message": resp.json["error"]["message"]}
    }


@pytest.mark.parametrize(
    ("query", "status"), [("", 406), ("?format=xml", 400)], ids=["accept", "format"]
)
def test_a_refused_stream_closes_its_generator_and_calls_on_close(query: str, status: int) -> None:
    # What the caller opened before the refusal (a subscription) must end with it.
    finished: list[str] = []
    reasons: list[str] = []

    def subscription() -> Iterator[int]:
        try:
            yield 1
            yield 2
        finally:
            finished.append("finally")

    def running() -> Iterator[int]:
        items = subscription()
        next(items)  # running, as a caller that primed it (or stream_with_context) leaves it
        return items

    app = make_app(running, on_close=reasons.append)
    resp = app.test_client().get("/s" + query, headers={"Accept": "text/html"})
    assert resp.status_code == status
    assert resp.json["error"]["code"] == "not_acceptable"
    assert finished == ["finally"]
    assert reasons == ["refused"]


def test_shut_down_sends_retry_hint_and_ends() -> None:
    release = threading.Event()

    def gen() -> Iterator[Any]:
        yield 1
        release.wait(5)

    enc = encoder_for(SSE)
    writer = StreamWriter(gen(), enc, heartbeat=15)
    it = iter(writer)
    assert next(it) == b"data: 1\n\n"
    writer.shut_down(1000)
    assert b"".join(it) == b"retry: 1000\n\n"
    release.set()
    writer.close()


def test_keepalive_cut_short_by_the_socket_is_finished_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Inline keep-alives are written without blocking: a frame the socket takes only part of
    # must be completed before anything else, or the chunked framing would break. A write
    # watcher finishes it once the socket takes more; nothing is written around it meanwhile.
    import socket

    import gevent

    import stream.runners as runners
    from stream.pacing import Transport

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        transport = Transport(framing="chunked", has_socket=True)
        writer = runners.GeventWriter(
            iter([]), encoder_for(SSE), heartbeat=15, sock=ours, transport=transport
        )
        writer._loop = gevent.get_hub().loop  # as starting the stream sets it
        real_write = runners.os.write
        monkeypatch.setattr(runners.os, "write", lambda fd, data: real_write(fd, data[:3]))
        writer._write_keepalive(b":\n")  # 3 of b"2\r\n:\n\r\n": owes the other 4

        def full(fd: int, data: bytes) -> int:
            raise BlockingIOError

        monkeypatch.setattr(runners.os, "write", full)
        writer._write_keepalive(b":\n")  # skipped: nothing goes out before the rest
        assert bytes(writer._owed) == b":\n\r\n"
        monkeypatch.setattr(runners.os, "write", real_write)
        gevent.sleep(0.05)  # the socket takes more: the watcher writes the rest
        assert not writer._owed and writer._owed_watcher is None
        writer._write_keepalive(b":\n")  # a whole frame again
        writer.close()
        theirs.settimeout(5)
        received = b""
        while len(received) < 14:
            received += theirs.recv(100)
        assert received == b"2\r\n:\n\r\n" * 2


@pytest.mark.parametrize(
    ("environ", "http_framing", "framing", "raw"),
    [
        pytest.param({"SERVER_PROTOCOL": "HTTP/1.1"}, True, "chunked", True, id="http11-chunked"),
        pytest.param({"SERVER_PROTOCOL": "HTTP/1.0"}, True, "close", True, id="http10-raw"),
        pytest.param({"SERVER_PROTOCOL": "HTTP/1.1"}, False, None, False, id="uwsgi-no-inline"),
        pytest.param(
            {"SERVER_PROTOCOL": "HTTP/2", "HTTP_VERSION": "2"}, True, None, False, id="h2"
        ),
    ],
)
def test_inline_framing_follows_gunicorn(
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str],
    http_framing: bool,
    framing: str | None,
    raw: bool,
) -> None:
    # Inline keep-alives are framed as gunicorn frames the body, and not written at all when
    # gunicorn does not speak HTTP/1.x itself (its uwsgi protocol, HTTP/2).
    import socket

    import stream.server as server

    monkeypatch.setattr(server.registry, "http_framing", True)  # restored after the test
    server.inline_keepalives(http_framing)
    app = make_app(lambda: iter([1]))
    with (
        socket.socket() as sock,
        app.test_request_context("/s", environ_overrides={"gunicorn.socket": sock, **environ}),
    ):
        writer = stream_response(iter([1])).response
        assert isinstance(writer, StreamWriter)
        assert writer._transport.framing == framing
        assert writer._transport.raw_writes is raw
        writer.close()


def test_tls_socket_is_never_written_around(monkeypatch: pytest.MonkeyPatch) -> None:
    # A TLS session's descriptor carries records: a keep-alive written to it directly would
    # break the session (curl: "wrong version number"), so TLS streams go through the server,
    # even under gunicorn's HTTP framing.
    import socket
    import ssl

    from stream.server import detect_transport, registry

    monkeypatch.setattr(registry, "http_framing", True)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with (
        socket.socket() as raw,
        context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False) as tls,
    ):
        transport = detect_transport({"gunicorn.socket": tls, "SERVER_PROTOCOL": "HTTP/1.1"}, {})
        assert transport.tls and transport.framing == "chunked"
        assert not transport.raw_writes and transport.watch_peer
    with socket.socket() as plain:
        transport = detect_transport({"gunicorn.socket": plain}, {"Content-Length": "3"})
        assert transport.framing is None and not transport.raw_writes
        monkeypatch.setattr(registry, "http_framing", False)  # not proven: no hooks, uwsgi
        assert not detect_transport({"gunicorn.socket": plain}, {}).raw_writes


def counting(produced: list[int], finished: threading.Event, size: int) -> Iterator[Any]:
    """An endless generator that never waits, counting what it produced."""
    try:
        i = 0
        while True:
            produced[0] = i
            yield {"i": i, "pad": "x" * size}
            i += 1
    finally:
        finished.set()


@pytest.mark.parametrize(
    "how", [pytest.param("close", id="client-left"), pytest.param("shut_down", id="shutdown")]
)
def test_thread_producer_stops_when_the_client_leaves(how: str) -> None:
    # The producer thread fills its bounded buffer and waits: once the stream stops (the client
    # left, the worker stops) it stops at once, its generator closed, not run to its end.
    produced, finished = [0], threading.Event()
    writer = StreamWriter(
        counting(produced, finished, 1000), encoder_for(SSE), heartbeat=15, max_chunk=64 * 1024
    )
    it = iter(writer)
    assert next(it).startswith(b'data: {"i":0,')

    # The buffer fills up (64 KiB of 1 KB events) and the producer waits for space.
    def still() -> bool:
        before = produced[0]
        time.sleep(0.1)
        return produced[0] == before

    wait_for(still, timeout=5)
    stalled = produced[0]
    assert stalled < 1000
    getattr(writer, how)()
    if how == "shut_down":
        assert b"".join(it).endswith(b"\n\n")  # what was buffered, then the end
        writer.close()
    assert finished.wait(5)
    assert produced[0] <= stalled + 1


def test_shutdown_spreads_retry_hints_over_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every SSE stream of a stopping worker gets its own retry: within [base, base + window],
    # so its clients do not all come back in the same second.
    import stream.server as server

    for name in ("shutting_down", "retry_base", "retry_window"):
        # restored after the test
        monkeypatch.setattr(server.registry, name, getattr(server.registry, name))
    monkeypatch.setattr(server.registry, "open", set())
    release = threading.Event()

    def gen() -> Iterator[Any]:
        yield 1
        release.wait(5)

    writers = [StreamWriter(gen(), encoder_for(SSE), heartbeat=15) for _ in range(20)]
    iters = [iter(w) for w in writers]
    for it in iters:
        assert next(it) == b"data: 1\n\n"
    assert server.shutdown_streams(retry_ms=5000, retry_window_ms=2000) == 20
    late = StreamWriter(gen(), encoder_for(SSE), heartbeat=15)  # opened while stopping
    hints = []
    for it in [*iters, iter(late)]:
        tail = b"".join(it)
        last = tail.split(b"\n\n")[-2]  # the body's last block
        assert last.startswith(b"retry: ") and tail.endswith(b"\n\n"), tail
        hints.append(int(last.removeprefix(b"retry: ")))
    release.set()
    for writer in [*writers, late]:
        writer.close()
    assert all(5000 <= hint <= 7000 for hint in hints), hints
    assert len(set(hints)) > 1


@pytest.mark.parametrize(
    "fmt, tail",
    [("sse", b"retry: 2500\n\n"), ("ndjson", b"")],
    ids=["sse-retry-hint", "ndjson-no-marker"],
)
def test_unfinished_end_hints_sse_clients_to_resume(fmt: str, tail: bytes) -> None:
    # A lifetime end or a slow consumer cut off: a clean end, no error event; SSE gets the
    # retry: hint that marks an unfinished end (clients resume from their id).
    def gen() -> Iterator[Any]:
        yield {"i": 1}
        raise Unfinished("lifetime", retry_ms=2500)

    app = make_app(gen)
    body = app.test_client().get(f"/s?format={fmt}").data
    assert body.endswith(tail)
    assert b"error" not in body
    assert b'{"i":1}' in body
