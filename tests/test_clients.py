"""Both clients, requests (``Client``) and httpx (``AsyncClient``), against the scripted raw server.

Every test runs once per client (the ``client_kind`` fixture). The async client is driven from
these synchronous tests through ``SyncedClient``: each step (``next``, ``with``, ``publish``)
is one ``asyncio.Runner.run`` (what ``asyncio.run`` is made of) on one event loop per test, so
a stream stays open between steps and a test can act between two events (set a server's
``Wait``, say). Both kinds return the same values and raise the same errors, so one assertion
checks both. Async-only behaviour (cancellation, a passed-in httpx client) is in
``test_aio.py``; requests-only behaviour (sessions, closing from a thread) in ``test_client.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import orjson
import pytest

from stream import errors
from stream.aio import AsyncClient, AsyncStream
from stream.client import Client
from stream.event import Event
from tests.rawserver import (
    JSON_SEQ,
    NDJSON,
    SSE,
    Close,
    Cut,
    Hold,
    RawServer,
    Script,
    Sleep,
    Wait,
)

pytestmark = pytest.mark.timeout(20)

FORMATS = {"ndjson": NDJSON, "sse": SSE, "json-seq": JSON_SEQ}
KEEPALIVE = {"ndjson": b" ", "sse": b":\n", "json-seq": b"\x1e"}
ALL_FORMATS = [pytest.param(name, id=name) for name in FORMATS]

T = TypeVar("T")


def value(fmt: str, data: Any) -> bytes:
    """One plain event (no id) in ``fmt``."""
    text = orjson.dumps(data)
    if fmt == "sse":
        return b"data: " + text + b"\n\n"
    return (b"\x1e" if fmt == "json-seq" else b"") + text + b"\n"


def envelope(fmt: str, ident: str, data: Any, event: str = "message") -> bytes:
    """One event with an id (jobs and channels) in ``fmt``."""
    if fmt == "sse":
        head = b"id: " + ident.encode() + b"\n"
        if event != "message":
            head += b"event: " + event.encode() + b"\n"
        return head + b"data: " + orjson.dumps(data) + b"\n\n"
    line = orjson.dumps({"id": ident, "event": event, "data": data}) + b"\n"
    return (b"\x1e" if fmt == "json-seq" else b"") + line


def error_event(fmt: str, code: str, message: str) -> bytes:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    if fmt == "sse":
        return b"event: error\ndata: " + body + b"\n\n"
    return (b"\x1e" if fmt == "json-seq" else b"") + body + b"\n"


def script(fmt: str, *body: Any, **kwargs: Any) -> Script:
    return Script(list(body), content_type=FORMATS[fmt], **kwargs)


# -- the two kinds of client behind one synchronous face ------------------------------------------


class SyncedStream:
    """An ``AsyncStream`` driven from synchronous code, like a ``stream.client.Stream``."""

    def __init__(self, runner: asyncio.Runner, stream: AsyncStream[Any]) -> None:
        self._runner = runner
        self._stream = stream

    @property
    def response(self) -> Any:
        return self._stream.response

    @property
    def last_event_id(self) -> str:
        return self._stream.last_event_id

    def __iter__(self) -> SyncedStream:
        return self

    def __next__(self) -> Any:
        try:
            return self._runner.run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def __enter__(self) -> SyncedStream:
        self._runner.run(self._stream.__aenter__())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._runner.run(self._stream.__aexit__(*exc_info))

    def close(self) -> None:
        self._runner.run(self._stream.aclose())


class SyncedClient:
    """An ``AsyncClient`` driven from synchronous code, like a ``stream.client.Client``."""

    def __init__(self, runner: asyncio.Runner, client: AsyncClient) -> None:
        self._runner = runner
        self._client = client

    def stream(self, path: str, **kwargs: Any) -> SyncedStream:
        return SyncedStream(self._runner, self._client.stream(path, **kwargs))

    def events(self, path: str, **kwargs: Any) -> SyncedStream:
        return SyncedStream(self._runner, self._client.events(path, **kwargs))

    def publish(self, channel: str, *values: Any, **kwargs: Any) -> list[str]:
        return self._runner.run(self._client.publish(channel, *values, **kwargs))

    def __enter__(self) -> SyncedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._client.aclose())


AnyClient = Client | SyncedClient
MakeClient = Callable[..., AnyClient]


@pytest.fixture(params=["sync", "async"])
def client_kind(request: pytest.FixtureRequest) -> str:
    """Which client the test runs with: ``Client`` (requests) or ``AsyncClient`` (httpx)."""
    kind: str = request.param
    return kind


@pytest.fixture
def make_client(client_kind: str) -> Iterator[MakeClient]:
    """Build clients of this test's kind (same arguments as ``Client``); closed at teardown."""
    made: list[AnyClient] = []
    runner = asyncio.Runner() if client_kind == "async" else None

    def make(base_url: str = "", **kwargs: Any) -> AnyClient:
        client: AnyClient
        if runner is None:
            client = Client(base_url, **kwargs)
        else:
            client = SyncedClient(runner, AsyncClient(base_url, **kwargs))
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()
        if runner is not None:
            runner.close()


@pytest.fixture
def fast(make_client: MakeClient) -> AnyClient:
    """A client with a short read timeout and near-instant backoff."""
    return make_client(timeout=(2.0, 5.0), backoff_initial=0.01, backoff_max=0.05)


# -- decoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("framing", ["chunked", "close", "length"])
def test_plain_values_in_every_format_and_framing(fast: AnyClient, fmt: str, framing: str) -> None:
    items = [{"event_id": i, "data": "x" * i, "is_last_event": i == 2} for i in range(3)]
    body = [value(fmt, item) for item in items]
    with RawServer([script(fmt, *body, framing=framing)]) as server:
        assert list(fast.stream(server.url + "/events")) == items


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_envelopes_give_data_and_events(fmt: str, fast: AnyClient) -> None:
    body = [
        envelope(fmt, "1-0", {"n": 1}),
        envelope(fmt, "2-0", [2], event="tick"),
        envelope(fmt, "3-0", None, event="end"),
    ]
    with RawServer([script(fmt, *body), script(fmt, *body)]) as server:
        stream = fast.stream(server.url + "/jobs/a/events")
        assert list(stream) == [{"n": 1}, [2]]
        assert stream.last_event_id == "3-0"
        events = list(fast.events(server.url + "/jobs/a/events"))
        assert events == [Event("1-0", "message", '{"n":1}'), Event("2-0", "tick", "[2]")]
        assert len(server.requests) == 2  # the end marker: no reconnection


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_each_event_is_delivered_before_the_next_is_sent(
    fast: AnyClient, fmt: str, framing: str
) -> None:
    go = threading.Event()
    first, second = value(fmt, {"n": 1}), value(fmt, {"n": 2})
    with RawServer([script(fmt, first, Wait(go), second, framing=framing)]) as server:
        with fast.stream(server.url) as stream:
            items = iter(stream)
            assert next(items) == {"n": 1}  # would hang (and time out) if the client buffered
            go.set()
            assert next(items) == {"n": 2}
            assert list(items) == []


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_keepalives_are_skipped(fast: AnyClient, fmt: str) -> None:
    ka = KEEPALIVE[fmt]
    body = [ka, value(fmt, 1), ka, ka, value(fmt, 2), ka]
    with RawServer([script(fmt, *body)]) as server:
        assert list(fast.stream(server.url)) == [1, 2]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_events_split_across_reads(fast: AnyClient, fmt: str) -> None:
    whole = value(fmt, {"text": "é" * 3}) + value(fmt, 2)
    pieces: list[Any] = []
    for i in range(len(whole)):
        pieces += [whole[i : i + 1], Sleep(0.001)]
    with RawServer([script(fmt, *pieces)]) as server:
        assert list(fast.stream(server.url)) == [{"text": "ééé"}, 2]


def test_gzip_body_is_decoded(fast: AnyClient) -> None:
    packed = gzip.compress(value("ndjson", {"n": 1}) + value("ndjson", {"n": 2}))
    answer = script("ndjson", packed[:10], packed[10:], headers=[("Content-Encoding", "gzip")])
    with RawServer([answer]) as server:
        assert list(fast.stream(server.url)) == [{"n": 1}, {"n": 2}]


def test_iterating_again_continues_where_the_loop_stopped(fast: AnyClient) -> None:
    with RawServer([script("ndjson", *(value("ndjson", n) for n in range(4)))]) as server:
        with fast.stream(server.url) as stream:
            for item in stream:
                if item == 1:
                    break
            assert list(stream) == [2, 3]


def test_format_sends_accept_and_default_accepts_all(fast: AnyClient) -> None:
    with RawServer([script("sse", value("sse", 1)), script("ndjson")]) as server:
        assert list(fast.stream(server.url, format="sse")) == [1]
        assert list(fast.stream(server.url, params={"count": 3})) == []
        first, second = server.requests
        assert first.headers["accept"] == SSE
        assert second.headers["accept"].startswith(NDJSON)
        assert SSE in second.headers["accept"] and JSON_SEQ in second.headers["accept"]
        assert second.target == "/?count=3"


def test_base_url_and_paths(make_client: MakeClient) -> None:
    with RawServer([script("ndjson", value("ndjson", 1))]) as server:
        with make_client(server.url + "/", headers={"X-Test": "yes"}) as client:
            assert list(client.stream("events")) == [1]
        assert server.requests[0].target == "/events"
        assert server.requests[0].headers["x-test"] == "yes"


# -- errors -----------------------------------------------------------------------------------


def test_http_error_with_json_body(fast: AnyClient) -> None:
    body = orjson.dumps({"error": {"code": "not_found", "message": "no such job"}})
    answer = Script([body], status=404, content_type="application/json", framing="length")
    with RawServer([answer]) as server:
        with pytest.raises(errors.HTTPStatusError) as info:
            list(fast.stream(server.url + "/jobs/nope/events"))
    error = info.value
    assert error.status_code == 404
    assert error.body == {"error": {"code": "not_found", "message": "no such job"}}
    assert error.response is not None and error.response.status_code == 404
    assert "not_found: no such job" in str(error)


def test_http_error_raised_by_the_context_manager(fast: AnyClient) -> None:
    answer = Script([b"<h1>bad</h1>"], status=400, content_type="text/html", framing="close")
    with RawServer([answer]) as server:
        with pytest.raises(errors.HTTPStatusError) as info:
            with fast.stream(server.url):
                pass  # pragma: no cover
    assert info.value.body == "<h1>bad</h1>"


def test_wrong_media_type(fast: AnyClient) -> None:
    with RawServer([Script([b"<html>"], content_type="text/html; charset=utf-8")]) as server:
        with pytest.raises(errors.ContentTypeError) as info:
            list(fast.stream(server.url))
    assert info.value.content_type == "text/html; charset=utf-8"


def test_malformed_line_is_a_decode_error_with_its_line_number(fast: AnyClient) -> None:
    with RawServer([script("ndjson", b'{"a": 1}\n', b"{oops\n")]) as server:
        seen = []
        with pytest.raises(errors.DecodeError) as info:
            for item in fast.stream(server.url):
                seen.append(item)
    assert seen == [{"a": 1}]
    assert info.value.line_number == 2


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_remote_error_after_the_events_before_it(fast: AnyClient, fmt: str) -> None:
    body = [value(fmt, 1), value(fmt, 2), error_event(fmt, "boom", "it broke")]
    with RawServer([script(fmt, *body)]) as server:
        seen = []
        with pytest.raises(errors.RemoteError) as info:
            for item in fast.stream(server.url):
                seen.append(item)
    assert seen == [1, 2]
    assert (info.value.code, info.value.message) == ("boom", "it broke")


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_reset_raises_from_stream(fast: AnyClient, fmt: str) -> None:
    body = [envelope(fmt, "7", None, event="reset"), envelope(fmt, "8", 8)]
    with RawServer([script(fmt, *body)]) as server:
        with pytest.raises(errors.StreamReset) as info:
            list(fast.stream(server.url, last_event_id="3"))
        assert server.requests[0].headers["last-event-id"] == "3"
    assert info.value.event.event == "reset"


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_reset_reported_by_events_and_on_reset(fast: AnyClient, fmt: str) -> None:
    body = [
        envelope(fmt, "7", None, event="reset"),
        envelope(fmt, "8", 8),
        envelope(fmt, "9", None, event="end"),
    ]
    with RawServer([script(fmt, *body), script(fmt, *body)]) as server:
        events = list(fast.events(server.url, last_event_id="3"))
        assert [(e.id, e.event) for e in events] == [("7", "reset"), ("8", "message")]
        resets: list[Event] = []
        assert list(fast.stream(server.url, last_event_id="3", on_reset=resets.append)) == [8]
        assert [e.id for e in resets] == ["7"]


def test_read_timeout(fast: AnyClient) -> None:
    never = threading.Event()
    with RawServer([script("ndjson", value("ndjson", 1), Wait(never))]) as server:
        seen = []
        with pytest.raises(errors.StreamTimeout):
            for item in fast.stream(server.url, timeout=(2.0, 0.2)):
                seen.append(item)
        never.set()
    assert seen == [1]


def test_connection_refused(make_client: MakeClient) -> None:
    with RawServer([]) as server:
        url = server.url
    with make_client(url) as client, pytest.raises(errors.ConnectionLost) as info:
        list(client.stream("/events"))
    assert info.value.__cause__ is not None


# -- ends, cuts and resuming ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("framing", "cut"),
    [
        pytest.param("chunked", Close(), id="chunked-without-last-chunk"),
        pytest.param("chunked", Cut(), id="chunked-reset"),
        pytest.param("close", Cut(), id="close-delimited-reset"),
        pytest.param("length", Close(), id="short-content-length"),
    ],
)
def test_cut_without_ids_is_connection_lost(fast: AnyClient, framing: str, cut: Any) -> None:
    delivered = threading.Event()
    body = [value("ndjson", 1), Wait(delivered), cut]
    answer = script("ndjson", *body, framing=framing, content_length=1000)
    with RawServer([answer]) as server:
        seen = []
        with pytest.raises(errors.ConnectionLost):
            for item in fast.stream(server.url):
                seen.append(item)
                delivered.set()
        assert seen == [1]
        assert len(server.requests) == 1


def test_clean_end_without_ids_is_the_end(fast: AnyClient) -> None:
    with RawServer([script("ndjson", value("ndjson", 1), b"2", framing="close")]) as server:
        assert list(fast.stream(server.url)) == [1, 2]  # the last line needs no newline


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("cut", [Close(), Cut()], ids=["fin", "rst"])
def test_resume_after_a_cut_with_last_event_id(fast: AnyClient, fmt: str, cut: Any) -> None:
    delivered = threading.Event()
    first = script(fmt, envelope(fmt, "1", 1), envelope(fmt, "é:2", 2), Wait(delivered), cut)
    second = script(fmt, envelope(fmt, "3", 3), envelope(fmt, "4", None, event="end"))
    with RawServer([first, second]) as server:
        seen = []
        for item in fast.stream(server.url + "/jobs/j/events"):
            seen.append(item)
            if item == 2:
                delivered.set()
        assert seen == [1, 2, 3]
        assert len(server.requests) == 2
        assert "last-event-id" not in server.requests[0].headers
        assert b"\r\nLast-Event-ID: " + "é:2".encode() in server.requests[1].raw_headers


def test_resume_after_a_clean_end_without_end_marker(fast: AnyClient) -> None:
    first = script("sse", envelope("sse", "1", 1), b"retry: 10\n\n", framing="close")
    second = script("sse", envelope("sse", "2", 2), b"event: end\ndata: null\n\n")
    with RawServer([first, second]) as server:
        assert list(fast.stream(server.url)) == [1, 2]
        assert server.requests[1].headers["last-event-id"] == "1"


def test_server_retry_is_honoured(make_client: MakeClient) -> None:
    first = script("sse", envelope("sse", "1", 1), b"retry: 300\n\n", framing="close")
    second = script("sse", b"event: end\ndata: null\n\n")
    with RawServer([first, second]) as server:
        # With no backoff of its own, only the server's retry can make the client wait.
        with make_client(server.url, backoff_initial=0.0) as client:
            stream = client.stream("/channels/c")
            started = time.monotonic()
            assert list(stream) == [1]
            waited = time.monotonic() - started
    assert 0.3 <= waited < 3.0


def test_retryable_status_on_resume_is_retried(fast: AnyClient) -> None:
    first = script("ndjson", envelope("ndjson", "1", 1), Close())
    busy = Script(
        [b'{"error": {"code": "busy", "message": "later"}}'],
        status=503,
        content_type="application/json",
        framing="length",
    )
    last = script("ndjson", envelope("ndjson", "2", 2), envelope("ndjson", "3", None, event="end"))
    with RawServer([first, busy, last]) as server:
        assert list(fast.stream(server.url)) == [1, 2]
        assert [r.headers.get("last-event-id") for r in server.requests] == [None, "1", "1"]


def test_max_attempts_then_connection_lost(make_client: MakeClient) -> None:
    first = script("ndjson", envelope("ndjson", "1", 1), Close())
    empty = [script("ndjson", Close()) for _ in range(3)]
    with RawServer([first, *empty]) as server:
        with make_client(server.url, max_attempts=3, backoff_initial=0.01) as client:
            seen = []
            with pytest.raises(errors.ConnectionLost) as info:
                for item in client.stream("/jobs/j/events"):
                    seen.append(item)
        assert seen == [1]
        assert info.value.attempts == 3
        assert len(server.requests) == 4
        assert all(r.headers["last-event-id"] == "1" for r in server.requests[1:])


def test_reconnect_false_with_ids(fast: AnyClient) -> None:
    with RawServer([script("ndjson", envelope("ndjson", "1", 1), framing="close")]) as server:
        assert list(fast.stream(server.url, reconnect=False)) == [1]
        assert len(server.requests) == 1


# -- closing ----------------------------------------------------------------------------------


def test_context_manager_closes_the_connection(fast: AnyClient) -> None:
    with RawServer([script("ndjson", value("ndjson", 1), Hold())]) as server:
        with fast.stream(server.url) as stream:
            assert stream.response is not None and stream.response.status_code == 200
            assert next(iter(stream)) == 1
        assert server.connections[0].client_closed.wait(5)
        assert list(stream) == []


# -- publish ----------------------------------------------------------------------------------


def test_publish_one_value(make_client: MakeClient) -> None:
    answer = Script(
        [b'{"ids": ["1-0"]}'], status=201, content_type="application/json", framing="length"
    )
    with RawServer([answer]) as server, make_client(server.url) as client:
        assert client.publish("news", {"a": 1}, token="s3cret") == ["1-0"]
        request = server.requests[0]
    assert (request.method, request.target) == ("POST", "/channels/news")
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer s3cret"
    assert orjson.loads(request.body) == {"a": 1}


def test_publish_several_values_as_ndjson(make_client: MakeClient) -> None:
    answer = Script(
        [b'{"ids": ["1-0", "1-1"]}'], status=201, content_type="application/json", framing="length"
    )
    with RawServer([answer]) as server, make_client(server.url) as client:
        assert client.publish("a:b", 1, [2], event="tick") == ["1-0", "1-1"]
        request = server.requests[0]
    assert request.target == "/channels/a%3Ab?event=tick"
    assert request.headers["content-type"] == NDJSON
    assert request.body == b"1\n[2]\n"


def test_publish_error(make_client: MakeClient) -> None:
    body = b'{"error": {"code": "forbidden", "message": "token needed"}}'
    answer = Script([body], status=403, content_type="application/json", framing="length")
    with RawServer([answer]) as server, make_client(server.url) as client:
        with pytest.raises(errors.HTTPStatusError) as info:
            client.publish("news", 1)
    assert info.value.status_code == 403
    assert info.value.body["error"]["code"] == "forbidden"


def test_publish_needs_a_value(make_client: MakeClient) -> None:
    with pytest.raises(ValueError, match="at least one"):
        make_client("http://127.0.0.1:9").publish("news")


def test_relative_path_needs_a_base_url(make_client: MakeClient) -> None:
    with pytest.raises(ValueError, match="base_url"):
        make_client().stream("/events")


def test_publish_unexpected_answer(make_client: MakeClient) -> None:
    answer = Script([b"ok"], status=201, content_type="text/plain", framing="length")
    with RawServer([answer]) as server, make_client(server.url) as client:
        with pytest.raises(errors.StreamError, match="unexpected publish answer"):
            client.publish("news", 1)


def test_closed_before_the_first_read_sends_nothing(fast: AnyClient) -> None:
    with RawServer([]) as server:
        stream = fast.stream(server.url)
        stream.close()
        assert list(stream) == []
        assert server.requests == []


# == issue 10, item 9: the client at the edges ==================================================


# -- the server's retry: is honoured up to backoff_max ---------------------------------------------


@pytest.mark.parametrize(
    "retry",
    [
        pytest.param(b"1000000000000", id="31-years"),
        pytest.param(b"9" * 400, id="too-large-for-a-float"),
    ],
)
def test_server_retry_is_capped_by_backoff_max(make_client: MakeClient, retry: bytes) -> None:
    first = script("sse", envelope("sse", "1", 1), b"retry: " + retry + b"\n\n", framing="close")
    second = script("sse", envelope("sse", "2", 2), b"event: end\ndata: null\n\n")
    with RawServer([first, second]) as server:
        with make_client(server.url, backoff_max=0.3) as client:
            started = time.monotonic()
            assert list(client.stream("/channels/c")) == [1, 2]
            waited = time.monotonic() - started
    # The cap, honoured: no shorter (the server asked for more), and nowhere near 31 years.
    assert 0.3 <= waited < 5.0


# -- deadlines ---------------------------------------------------------------------------------


def test_headers_trickled_past_the_read_timeout(make_client: MakeClient) -> None:
    slow = Script([value("ndjson", 1)], trickle_headers=0.05)
    with RawServer([slow]) as server:
        with make_client(server.url, timeout=(2.0, 0.5)) as client:
            started = time.monotonic()
            with pytest.raises(errors.StreamTimeout):
                list(client.stream("/events"))
            took = time.monotonic() - started
    # About 100 bytes of headers at 20 bytes/s would take 5 s; each byte is well within 0.5 s.
    assert took < 3.0


@pytest.mark.parametrize("fmt", ["ndjson", "sse", "json-seq"])
def test_body_trickled_without_completing_an_event(make_client: MakeClient, fmt: str) -> None:
    start = {"ndjson": b'{"a": ', "sse": b"data: ", "json-seq": b'\x1e{"a": '}[fmt]
    trickle: list[Any] = [value(fmt, 1), start]
    for _ in range(40):
        trickle += [Sleep(0.1), b"1"]  # a byte every 0.1 s: each read well within the timeout
    with RawServer([script(fmt, *trickle)]) as server:
        with make_client(server.url, timeout=(2.0, 0.5)) as client:
            seen = []
            started = time.monotonic()
            with pytest.raises(errors.StreamTimeout):
                for item in client.stream("/events"):
                    seen.append(item)
            took = time.monotonic() - started
    assert seen == [1]
    assert took < 3.0  # the trickle lasts 4 s


@pytest.mark.parametrize(
    ("fmt", "keepalive"),
    [
        pytest.param("ndjson", b" ", id="ndjson-space"),
        pytest.param("ndjson", b"\n", id="ndjson-empty-line"),
        pytest.param("sse", b":\n", id="sse-comment"),
        pytest.param("json-seq", b"\x1e", id="json-seq-lone-rs"),
    ],
)
def test_keepalives_keep_a_quiet_stream_open(
    make_client: MakeClient, fmt: str, keepalive: bytes
) -> None:
    body: list[Any] = [value(fmt, 1)]
    for _ in range(6):
        body += [Sleep(0.25), keepalive]  # 1.5 s of silence, a keep-alive each 0.25 s
    body.append(value(fmt, 2))
    with RawServer([script(fmt, *body)]) as server:
        with make_client(server.url, timeout=(2.0, 0.6)) as client:
            assert list(client.stream("/events")) == [1, 2]


def test_silence_is_still_a_timeout(fast: AnyClient) -> None:
    with RawServer([script("ndjson", value("ndjson", 1), b" ", Sleep(3.0))]) as server:
        seen = []
        with pytest.raises(errors.StreamTimeout):
            for item in fast.stream(server.url, timeout=(2.0, 0.5)):
                seen.append(item)
    assert seen == [1]


# -- SSE: invalid UTF-8 is a DecodeError, as in NDJSON and JSON-seq ----------------------------


def test_sse_invalid_utf8_is_a_decode_error_after_the_events_before_it(fast: AnyClient) -> None:
    body = b'data: 1\n\ndata: 2\n\ndata: "\xff"\n\ndata: 3\n\n'
    with RawServer([script("sse", body)]) as server:
        seen = []
        with pytest.raises(errors.DecodeError) as info:
            for item in fast.stream(server.url):
                seen.append(item)
    assert seen == [1, 2]
    assert info.value.line_number == 5


# -- redirects -----------------------------------------------------------------------------------


def redirect(to: str, status: int = 302) -> Script:
    return Script(
        [], status=status, content_type=None, framing="length", headers=[("Location", to)]
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"], ids=["other-port", "other-host"])
def test_caller_headers_do_not_follow_a_redirect_to_another_origin(
    make_client: MakeClient, host: str
) -> None:
    with RawServer([script("ndjson", value("ndjson", 1))]) as other:
        target = other.url.replace("127.0.0.1", host) + "/events"
        with RawServer([redirect(target)]) as server:
            with make_client(server.url, headers={"X-Api-Key": "k1"}) as client:
                got = list(
                    client.stream("/events", headers={"X-Other": "k2", "Authorization": "Bearer t"})
                )
            assert got == [1]
            first = server.requests[0].headers
            assert (first["x-api-key"], first["x-other"]) == ("k1", "k2")
        headers = other.requests[0].headers
        assert not {"x-api-key", "x-other", "authorization"} & headers.keys()
        assert headers["accept"].startswith("application/x-ndjson")


def test_caller_headers_follow_a_redirect_on_the_same_origin(make_client: MakeClient) -> None:
    with RawServer([redirect("/moved"), script("ndjson", value("ndjson", 1))]) as server:
        with make_client(server.url, headers={"X-Api-Key": "k1"}) as client:
            assert list(client.stream("/events")) == [1]
        moved = server.requests[1]
        assert moved.target == "/moved"
        assert moved.headers["x-api-key"] == "k1"


def test_publish_headers_do_not_follow_a_redirect_to_another_origin(
    make_client: MakeClient,
) -> None:
    answer = Script(
        [b'{"ids": ["1"]}'], status=201, content_type="application/json", framing="length"
    )
    with RawServer([answer]) as other:
        with RawServer([redirect(other.url + "/channels/c", status=307)]) as server:
            with make_client(server.url, headers={"X-Api-Key": "k1"}) as client:
                assert client.publish("c", {"a": 1}, token="t") == ["1"]
        headers = other.requests[0].headers
        assert not {"x-api-key", "authorization"} & headers.keys()
        assert other.requests[0].body == b'{"a":1}'


# == issue 13: other servers' streams, exact decoding, resume rules =============================


def test_openai_style_done_ends_the_stream(fast: AnyClient) -> None:
    body = [b'data: {"choices": [1]}\n\n', b'data: {"choices": [2]}\n\n', b"data: [DONE]\n\n"]
    with RawServer([script("sse", *body, Hold())]) as server:
        # The server keeps the connection open after [DONE]: the client ends by itself.
        assert list(fast.stream(server.url)) == [{"choices": [1]}, {"choices": [2]}]
        assert len(server.requests) == 1


def test_openai_style_post_with_a_json_body(fast: AnyClient) -> None:
    # OpenAI-style APIs stream the answer to a POST: the request carries its method and body.
    body = [b'data: {"delta": "Hel"}\n\n', b'data: {"delta": "lo"}\n\n', b"data: [DONE]\n\n"]
    with RawServer([script("sse", *body)]) as server:
        prompt = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        got = list(fast.stream(server.url, method="POST", json=prompt))
        assert got == [{"delta": "Hel"}, {"delta": "lo"}]
        (request,) = server.requests
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/json"
        assert orjson.loads(request.body) == prompt


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_finite_stream_of_another_server_with_ids_ends(fast: AnyClient, framing: str) -> None:
    # sse-starlette: ids, a retry on each event, a normal end, and a replay on any reconnect.
    body = b"".join(b"id: %d\nretry: 15000\ndata: %d\n\n" % (i, i) for i in range(3))
    replay = script("sse", body, framing=framing)
    with RawServer([replay, replay, replay]) as server:
        assert list(fast.stream(server.url)) == [0, 1, 2]
        events = list(fast.events(server.url))
        assert [e.id for e in events] == ["0", "1", "2"]
        assert len(server.requests) == 2  # one each, never a resume


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_resume_after_the_final_event_gets_204_and_ends(fast: AnyClient, fmt: str) -> None:
    no_content = Script([], status=204, content_type=None, framing="length")
    with RawServer([no_content]) as server:
        assert list(fast.stream(server.url, last_event_id="7", format=fmt)) == []
        assert server.requests[0].headers["last-event-id"] == "7"


def test_204_on_a_resume_ends_the_stream(fast: AnyClient) -> None:
    first = script("ndjson", envelope("ndjson", "1", 1), Close())
    no_content = Script([], status=204, content_type=None, framing="length")
    with RawServer([first, no_content]) as server:
        assert list(fast.stream(server.url)) == [1]
        assert len(server.requests) == 2


@pytest.mark.parametrize("fmt", ["ndjson", "json-seq"])
def test_service_ends_an_unfinished_envelope_stream_and_it_resumes(
    fast: AnyClient, fmt: str
) -> None:
    # Shutdown, lifetime or a slow consumer: the body ends normally, without an end marker.
    first = script(fmt, envelope(fmt, "1", 1), framing="close")
    second = script(fmt, envelope(fmt, "2", 2), envelope(fmt, "3", None, event="end"))
    with RawServer([first, second]) as server:
        assert list(fast.stream(server.url)) == [1, 2]
        assert server.requests[1].headers["last-event-id"] == "1"


def test_sse_id_with_a_leading_space_resumes(fast: AnyClient) -> None:
    first = script("sse", b"id:  5\ndata: 1\n\n", Cut())
    second = script("sse", b"id:  6\nevent: end\ndata: null\n\n")
    with RawServer([first, second]) as server:
        events = list(fast.events(server.url))
        assert [(e.id, e.data) for e in events] == [(" 5", "1")]
        # The bytes a browser sends: fetch strips the value's leading and trailing whitespace.
        assert b"\r\nLast-Event-ID: 5\r\n" in server.requests[1].raw_headers + b"\r\n"


def test_resume_that_cannot_succeed_ends_in_an_error(make_client: MakeClient) -> None:
    first = script("sse", envelope("sse", "1", 1), Cut())
    with RawServer([first]) as server:  # then every connection is refused by closing it
        with make_client(server.url, max_attempts=3, backoff_initial=0.01, backoff_max=0.05) as c:
            seen = []
            started = time.monotonic()
            with pytest.raises(errors.ConnectionLost):
                for item in c.stream("/channels/c"):
                    seen.append(item)
            assert time.monotonic() - started < 10.0
    assert seen == [1]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_exact_values_through_the_client(fast: AnyClient, fmt: str) -> None:
    texts = [b"12345678901234567890123", b"1e400", b'"\\ud800"', b'{"n": -9223372036854775809}']
    body = b"".join(
        (b"data: " + t + b"\n\n")
        if fmt == "sse"
        else (b"\x1e" if fmt == "json-seq" else b"") + t + b"\n"
        for t in texts
    )
    with RawServer([script(fmt, b"\xef\xbb\xbf" + body)]) as server:
        got = list(fast.stream(server.url))
    assert [repr(v) for v in got] == [
        "12345678901234567890123",
        "inf",
        "'\\ud800'",
        "{'n': -9223372036854775809}",
    ]


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_values_before_a_bad_line_in_the_same_read_come_first(fast: AnyClient, fmt: str) -> None:
    bad = {"ndjson": b"nope\n", "sse": b"data: nope\n\n", "json-seq": b"\x1enope\n"}[fmt]
    body = value(fmt, 1) + value(fmt, 2) + bad
    with RawServer([script(fmt, body + value(fmt, 3))]) as server:
        seen = []
        with pytest.raises(errors.DecodeError):
            for item in fast.stream(server.url):
                seen.append(item)
    assert seen == [1, 2]


def test_ndjson_space_keepalives_before_values_and_at_the_end(fast: AnyClient) -> None:
    body = [b" ", b" ", value("ndjson", 1), b" ", value("ndjson", 2), b" "]
    with RawServer([script("ndjson", *body)]) as server:
        assert list(fast.stream(server.url)) == [1, 2]
