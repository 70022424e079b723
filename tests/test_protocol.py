"""Unit tests of the clients' pure protocol layer (no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from stream.errors import (
    ConnectionLost,
    ContentTypeError,
    DecodeError,
    HTTPStatusError,
    RemoteError,
    StreamReset,
    StreamTimeout,
)
from stream.event import Event
from stream.protocol import (
    ACCEPT_ANY,
    EVENTS,
    VALUES,
    Connect,
    Cut,
    Deliver,
    Hooks,
    Pause,
    Read,
    ReconnectPolicy,
    Release,
    StreamState,
    accept_header,
    drop_on_redirect,
    http_status_error,
    media_type,
    remote_error,
)

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON_SEQ = "application/json-seq"


def drive(state: StreamState, *chunks: bytes, clean_end: bool = True) -> list[Any]:
    """Run the client loop of the module docstring over ``chunks`` and collect what it yields."""
    out: list[Any] = []
    for chunk in chunks:
        items = state.feed(chunk)
        out.extend(items)
        if state.stop:
            state.raise_error()
            return out
    if clean_end:
        out.extend(state.finish())
        state.raise_error()
    return out


def started(media: str, mode: str = VALUES, **kwargs: Any) -> StreamState:
    state = StreamState(mode, **kwargs)  # type: ignore[arg-type]
    state.start(media)
    return state


# -- media types, Accept, error objects --------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        pytest.param("application/x-ndjson", NDJSON, id="ndjson"),
        pytest.param("application/x-ndjson; charset=utf-8", NDJSON, id="ndjson-charset"),
        pytest.param("Application/X-NDJSON", NDJSON, id="case-insensitive"),
        pytest.param("application/ndjson", NDJSON, id="ndjson-spec-alias"),
        pytest.param("text/event-stream;charset=UTF-8", SSE, id="sse-charset"),
        pytest.param("  text/event-stream  ", SSE, id="sse-spaces"),
        pytest.param("application/json-seq", JSON_SEQ, id="json-seq"),
    ],
)
def test_media_type_accepted(content_type: str, expected: str) -> None:
    assert media_type(content_type) == expected


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("text/html; charset=utf-8", id="html"),
        pytest.param("application/json", id="json"),
        pytest.param("text/plain", id="plain"),
    ],
)
def test_media_type_refused(content_type: str | None) -> None:
    with pytest.raises(ContentTypeError) as info:
        media_type(content_type, response="r")
    assert info.value.content_type == (content_type or "")
    assert info.value.response == "r"


@pytest.mark.parametrize(
    ("format", "accept"),
    [
        pytest.param(None, ACCEPT_ANY, id="any"),
        pytest.param("ndjson", NDJSON, id="ndjson"),
        pytest.param("sse", SSE, id="sse"),
        pytest.param("json-seq", JSON_SEQ, id="json-seq"),
    ],
)
def test_accept_header(format: str | None, accept: str) -> None:
    assert accept_header(format) == accept


def test_accept_header_unknown_format() -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        accept_header("xml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(
            {"error": {"code": "boom", "message": "it broke"}}, ("boom", "it broke"), id="error"
        ),
        pytest.param(
            {"error": {"code": 7, "message": "x", "extra": 1}}, ("7", "x"), id="extra-inner"
        ),
        pytest.param({"error": "boom"}, None, id="error-not-object"),
        pytest.param({"error": {"code": "boom"}}, None, id="no-message"),
        pytest.param({"error": {"code": "a", "message": "b"}, "x": 1}, None, id="second-key"),
        pytest.param([1], None, id="list"),
        pytest.param("error", None, id="string"),
    ],
)
def test_remote_error(value: Any, expected: tuple[str, str] | None) -> None:
    error = remote_error(value)
    if expected is None:
        assert error is None
    else:
        assert error is not None
        assert (error.code, error.message) == expected


@pytest.mark.parametrize(
    ("body", "decoded", "message"),
    [
        pytest.param(
            b'{"error": {"code": "not_found", "message": "no such job"}}',
            {"error": {"code": "not_found", "message": "no such job"}},
            "HTTP 404 Not Found: not_found: no such job",
            id="json-error",
        ),
        pytest.param(b"<html>gone</html>", "<html>gone</html>", "HTTP 404 Not Found", id="html"),
        pytest.param(b"", None, "HTTP 404 Not Found", id="empty"),
        pytest.param(b'{"detail": 1}', {"detail": 1}, "HTTP 404 Not Found", id="other-json"),
    ],
)
def test_http_status_error(body: bytes, decoded: Any, message: str) -> None:
    error = http_status_error(404, "Not Found", body, response="r")
    assert isinstance(error, HTTPStatusError)
    assert (error.status_code, error.body, error.response, str(error)) == (
        404,
        decoded,
        "r",
        message,
    )


# -- the reconnect policy ---------------------------------------------------------------------


def test_policy_full_jitter_grows_to_the_cap() -> None:
    policy = ReconnectPolicy(initial=0.5, maximum=3.0, max_attempts=None, random=lambda: 1.0)
    assert [policy.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_policy_jitter_is_a_fraction_of_the_ceiling() -> None:
    policy = ReconnectPolicy(initial=1.0, random=lambda: 0.25)
    assert [policy.next_delay() for _ in range(3)] == [0.25, 0.5, 1.0]


def test_policy_honours_the_servers_retry_as_a_floor() -> None:
    policy = ReconnectPolicy(initial=0.5, maximum=10.0, retry=2.0, random=lambda: 0.5)
    # First attempt: exactly the server's retry; then jitter above it, doubling.
    assert [policy.next_delay() for _ in range(3)] == [2.0, 3.0, 5.0]


def test_policy_retry_is_honoured_up_to_the_cap() -> None:
    policy = ReconnectPolicy(maximum=1.0, retry=5.0, random=lambda: 0.0)
    assert policy.next_delay() == 1.0
    policy = ReconnectPolicy(maximum=1.0, retry=5.0, random=lambda: 1.0)
    assert policy.next_delay() == 1.0


@pytest.mark.parametrize(
    "retry",
    [
        pytest.param(b"1000000000000", id="31-years"),
        pytest.param(b"9" * 400, id="beyond-a-float"),
    ],
)
def test_server_retry_is_capped_by_backoff_max(retry: bytes) -> None:
    state = started(SSE, policy=ReconnectPolicy(maximum=30.0, random=lambda: 0.0))
    drive(state, b"id: 1\ndata: 1\n\nretry: " + retry + b"\n\n")
    assert state.disconnected(clean=True) == 30.0


def test_policy_gives_up_after_max_attempts_and_success_resets() -> None:
    policy = ReconnectPolicy(max_attempts=2, random=lambda: 0.0)
    assert policy.next_delay() == 0.0
    assert policy.next_delay() == 0.0
    assert policy.next_delay() is None
    assert policy.attempts == 2
    policy.succeeded()
    assert policy.next_delay() == 0.0


# -- NDJSON / JSON-seq, values ----------------------------------------------------------------


def test_plain_values_pass_through_as_the_decoders_list() -> None:
    state = started(NDJSON)
    chunk = b'{"event_id": 0, "data": "a", "is_last_event": false}\n1\n"s"\n[1]\n'
    out = state.feed(chunk)
    assert isinstance(out, list)  # the fast path: no generator, no copy
    assert out == [{"event_id": 0, "data": "a", "is_last_event": False}, 1, "s", [1]]
    assert not state.stop and state.last_event_id == ""


@pytest.mark.parametrize("media", [NDJSON, JSON_SEQ])
def test_envelopes_are_unwrapped_and_ids_tracked(media: str) -> None:
    rs = b"\x1e" if media == JSON_SEQ else b""
    state = started(media)
    out = state.feed(
        rs
        + b'{"id": "1-0", "event": "message", "data": {"n": 1}}\n'
        + rs
        + b'{"id": "2-0", "event": "tick", "data": [2]}\n'
    )
    seen = []
    for value in out:
        seen.append((value, state.last_event_id))  # the id of the value being delivered
    assert seen == [({"n": 1}, "1-0"), ([2], "2-0")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param({"id": "1", "event": "message", "data": 5}, 5, id="exact-keys-envelope"),
        pytest.param(
            {"id": "1", "event": "m", "data": 5, "x": 0},
            {"id": "1", "event": "m", "data": 5, "x": 0},
            id="extra-key-plain",
        ),
        pytest.param({"id": "1", "data": 5}, {"id": "1", "data": 5}, id="missing-key-plain"),
        pytest.param({"data": 5}, {"data": 5}, id="subset-plain"),
        pytest.param({"error": "boom"}, {"error": "boom"}, id="error-string-plain"),
    ],
)
def test_envelope_rule_is_exact_keys(value: Any, expected: Any) -> None:
    import orjson

    state = started(NDJSON)
    assert drive(state, orjson.dumps(value) + b"\n") == [expected]


def test_error_object_raises_after_the_values_before_it() -> None:
    state = started(NDJSON)
    out = state.feed(b'1\n2\n{"error": {"code": "boom", "message": "it broke"}}\n3\n')
    assert list(out) == [1, 2]
    assert state.stop
    with pytest.raises(RemoteError) as info:
        state.raise_error()
    assert (info.value.code, info.value.message) == ("boom", "it broke")


def test_end_marker_stops_without_reconnect() -> None:
    state = started(NDJSON)
    out = drive(
        state,
        b'{"id": "1", "event": "message", "data": 1}\n{"id": "2", "event": "end", "data": null}\n'
        b'{"id": "3", "event": "message", "data": 3}\n',
    )
    assert out == [1]
    assert state.ended and state.stop and state.error is None
    assert state.last_event_id == "2"
    assert state.disconnected(clean=True) is None


def test_reset_raises_from_values_without_on_reset() -> None:
    state = started(NDJSON, last_event_id="old")
    state.request_headers()
    out = state.feed(
        b'{"id": "5", "event": "reset", "data": null}\n{"id": "6", "event": "message", "data": 6}\n'
    )
    assert list(out) == []
    with pytest.raises(StreamReset, match="after 'old'") as info:
        state.raise_error()
    assert info.value.event == Event("5", "reset", "null")


def test_reset_calls_on_reset_in_order_and_goes_on() -> None:
    calls: list[Any] = []
    state = started(NDJSON, on_reset=lambda event: calls.append(("reset", event)))
    for value in state.feed(
        b'{"id": "4", "event": "message", "data": 4}\n'
        b'{"id": "5", "event": "reset", "data": {"oldest": "5"}}\n'
        b'{"id": "6", "event": "message", "data": 6}\n'
    ):
        calls.append(value)
    assert calls == [4, ("reset", Event("5", "reset", '{"oldest":"5"}')), 6]
    assert not state.stop


# -- NDJSON / JSON-seq, events ----------------------------------------------------------------


def test_events_from_envelopes_and_plain_values() -> None:
    state = started(NDJSON, EVENTS, last_event_id="0")
    out = drive(
        state,
        b'7\n{"id": "1", "event": "tick", "data": {"a": [1, 2]}}\n'
        b'{"id": "2", "event": "reset", "data": null}\n8\n'
        b'{"id": "3", "event": "end", "data": null}\n',
    )
    assert out == [
        Event("0", "message", "7"),
        Event("1", "tick", '{"a":[1,2]}'),
        Event("2", "reset", "null"),  # reported, not swallowed, and no StreamReset
        Event("2", "message", "8"),
    ]
    assert state.ended


def test_events_error_object_raises() -> None:
    state = started(JSON_SEQ, EVENTS)
    with pytest.raises(RemoteError):
        drive(state, b'\x1e1\n\x1e{"error": {"code": "c", "message": "m"}}\n')


# -- SSE --------------------------------------------------------------------------------------


def test_sse_values_decode_data_and_track_ids() -> None:
    state = started(SSE)
    out = state.feed(b'id: 1\ndata: {"a": 1}\n\n: keep-alive\n\nid: 2\nevent: tick\ndata: [2]\n\n')
    seen = [(value, state.last_event_id) for value in out]
    assert seen == [({"a": 1}, "1"), ([2], "2")]


@pytest.mark.parametrize("mode", [VALUES, EVENTS])
def test_sse_error_event_with_error_object_raises(mode: str) -> None:
    state = started(SSE, mode)
    with pytest.raises(RemoteError, match="boom: it broke"):
        drive(
            state,
            b"data: 1\n\n"
            b'event: error\ndata: {"error": {"code": "boom", "message": "it broke"}}\n\n',
        )


def test_sse_error_event_with_other_data_is_ordinary() -> None:
    state = started(SSE, EVENTS)
    assert drive(state, b'event: error\ndata: {"x": 1}\n\n') == [Event("", "error", '{"x": 1}')]


def test_sse_end_and_reset() -> None:
    state = started(SSE, EVENTS)
    out = drive(state, b"id: 9\nevent: reset\ndata: null\n\ndata: 1\n\nevent: end\ndata: null\n\n")
    assert out == [Event("9", "reset", "null"), Event("9", "message", "1")]
    assert state.ended
    values = started(SSE)
    with pytest.raises(StreamReset):
        drive(values, b"id: 9\nevent: reset\ndata: null\n\n")


def test_sse_values_non_json_data_is_a_decode_error() -> None:
    state = started(SSE)
    out = state.feed(b"data: 1\n\ndata: not json\n\n")
    assert list(out) == [1]
    with pytest.raises(DecodeError, match="not JSON"):
        state.raise_error()


def test_sse_retry_and_last_id_carry_to_the_policy_and_next_decoder() -> None:
    state = started(SSE, EVENTS, policy=ReconnectPolicy(random=lambda: 0.0))
    assert drive(state, b"id: 4\ndata: 1\n\nretry: 250\n\n") == [Event("4", "message", "1")]
    assert state.disconnected(clean=True) == 0.25
    assert state.request_headers() == {"Last-Event-ID": b"4"}
    state.start(SSE)
    assert drive(state, b"data: 2\n\n") == [Event("4", "message", "2")]


# -- disconnects ------------------------------------------------------------------------------


def test_clean_end_without_ids_is_the_end() -> None:
    state = started(NDJSON)
    drive(state, b"1\n")
    assert state.disconnected(clean=True) is None


def test_cut_without_ids_is_connection_lost() -> None:
    state = started(NDJSON)
    drive(state, b"1\n", clean_end=False)
    cause = OSError("reset by peer")
    with pytest.raises(ConnectionLost) as info:
        state.disconnected(clean=False, cause=cause)
    assert info.value.__cause__ is cause


@pytest.mark.parametrize("clean", [True, False], ids=["clean-eof", "cut"])
def test_with_ids_both_ends_resume(clean: bool) -> None:
    state = started(NDJSON, policy=ReconnectPolicy(random=lambda: 0.0))
    drive(state, '{"id": "é-1", "event": "message", "data": 1}\n'.encode(), clean_end=clean)
    assert state.disconnected(clean=clean, cause=None if clean else OSError()) == 0.0
    assert state.request_headers() == {"Last-Event-ID": "é-1".encode()}


@pytest.mark.parametrize(
    ("reconnect", "clean", "expected"),
    [
        pytest.param(True, False, 0.0, id="forced-on-cut"),
        pytest.param(True, True, None, id="forced-on-normal-end"),
        pytest.param(None, True, None, id="auto-no-ids"),
    ],
)
def test_reconnect_switch(reconnect: bool | None, clean: bool, expected: float | None) -> None:
    state = started(NDJSON, reconnect=reconnect, policy=ReconnectPolicy(random=lambda: 0.0))
    drive(state, b"1\n", clean_end=clean)
    assert state.disconnected(clean=clean, cause=None if clean else OSError()) == expected


def test_reconnect_off_with_ids_cut_is_connection_lost() -> None:
    state = started(NDJSON, reconnect=False)
    drive(state, b'{"id": "1", "event": "message", "data": 1}\n', clean_end=False)
    with pytest.raises(ConnectionLost):
        state.disconnected(clean=False, cause=OSError())


def test_attempts_spent_is_connection_lost_and_events_reset_them() -> None:
    state = started(
        NDJSON, last_event_id="1", policy=ReconnectPolicy(max_attempts=2, random=lambda: 0.0)
    )
    assert state.disconnected(clean=False, cause=OSError()) == 0.0
    assert state.connect_failed(OSError()) == 0.0
    with pytest.raises(ConnectionLost) as info:
        state.connect_failed(OSError("refused"))
    assert info.value.attempts == 2
    state.start(NDJSON)
    drive(state, b'{"id": "2", "event": "message", "data": 2}\n', clean_end=False)
    assert state.policy.attempts == 0


def test_last_event_id_given_makes_the_stream_resumable() -> None:
    state = StreamState(VALUES, last_event_id="x")
    assert state.resumable
    assert state.request_headers() == {"Last-Event-ID": b"x"}
    assert StreamState(VALUES).request_headers() == {}


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        StreamState("lines")  # type: ignore[arg-type]


def test_envelope_with_a_non_string_event_or_id() -> None:
    state = started(NDJSON, last_event_id="1")
    assert drive(state, b'{"id": 5, "event": ["x"], "data": 1}\n') == [1]
    assert state.last_event_id == "1"  # only a string id moves the last event ID
    events = started(NDJSON, EVENTS)
    assert drive(events, b'{"id": "2", "event": null, "data": 1}\n') == [Event("2", "message", "1")]


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param(b"1\n2.5\ntrue\nnull\n", id="scalars"),
        pytest.param(b'[[1]]\n[{"a": 1}]\n', id="unhashable-items"),
        pytest.param(b'""\n[]\n["id", "data"]\n{}\n', id="filter-false-positives"),
    ],
)
def test_plain_values_of_every_shape(chunk: bytes) -> None:
    import orjson

    expected = [orjson.loads(line) for line in chunk.splitlines()]
    assert list(started(NDJSON).feed(chunk)) == expected


@pytest.mark.parametrize("mode", ["values", "events"])
def test_error_envelope_raises_remote_error(mode: str) -> None:
    # A job interrupted by a shutdown logs its error as an envelope with event "error".
    state = StreamState(mode)  # type: ignore[arg-type]
    state.start("application/x-ndjson", None)
    body = (
        b'{"id":"1-0","event":"message","data":{"n":1}}\n'
        b'{"id":"1-1","event":"error","data":{"error":{"code":"interrupted","message":"m"}}}\n'
    )
    items = list(state.feed(body))
    assert len(items) == 1
    with pytest.raises(RemoteError) as info:
        state.raise_error()
    assert info.value.code == "interrupted"


# -- resume rules (CONTRACT.md, section 2; "Resuming" in stream.protocol) ------------------------


@pytest.mark.parametrize(
    ("media", "body", "resumes"),
    [
        pytest.param(
            SSE,
            b"id: 1\ndata: 1\n\nretry: 1000\n\n",
            True,
            id="sse-retry-hint-after-the-last-event",
        ),
        pytest.param(SSE, b"id: 1\ndata: 1\n\n", False, id="sse-finite-stream-with-ids"),
        pytest.param(
            SSE, b"id: 1\nretry: 500\ndata: 1\n\n", False, id="sse-retry-inside-an-event-block"
        ),
        pytest.param(
            SSE, b"retry: 1000\n\nid: 1\ndata: 1\n\n", False, id="sse-retry-before-the-last-event"
        ),
        pytest.param(
            NDJSON, b'{"id": "1", "event": "message", "data": 1}\n', True, id="ndjson-envelopes"
        ),
        pytest.param(
            JSON_SEQ, b'\x1e{"id": "1", "event": "m", "data": 1}\n', True, id="json-seq-envelopes"
        ),
        pytest.param(
            NDJSON, b'{"id": "1", "event": "end", "data": null}\n', False, id="ndjson-end-marker"
        ),
        pytest.param(SSE, b"id: 1\nevent: end\ndata: null\n\n", False, id="sse-end-marker"),
        pytest.param(SSE, b"id: 1\ndata: 1\n\ndata: [DONE]\n\n", False, id="sse-done"),
    ],
)
def test_normal_end_resumes_only_an_unfinished_stream(
    media: str, body: bytes, resumes: bool
) -> None:
    for mode in (VALUES, EVENTS):
        state = started(media, mode, policy=ReconnectPolicy(random=lambda: 0.0))
        drive(state, body)
        delay = state.disconnected(clean=True)
        assert (delay is not None) is resumes, mode


def test_an_envelope_stream_stays_resumable_across_an_empty_response() -> None:
    state = started(NDJSON, policy=ReconnectPolicy(random=lambda: 0.0))
    drive(state, b'{"id": "1", "event": "message", "data": 1}\n')
    assert state.disconnected(clean=True) == 0.0
    state.start(NDJSON)  # the resumed body ends at once (the service shut down again)
    drive(state)
    assert state.disconnected(clean=True) == 0.0
    assert state.policy.attempts == 2


def test_a_resume_that_never_delivers_gives_up() -> None:
    state = started(NDJSON, policy=ReconnectPolicy(max_attempts=3, random=lambda: 0.0))
    drive(state, b'{"id": "1", "event": "message", "data": 1}\n')
    with pytest.raises(ConnectionLost):
        for _ in range(4):
            state.disconnected(clean=True)
            state.start(NDJSON)
            drive(state)


def test_no_content_ends_the_stream() -> None:
    state = started(NDJSON, last_event_id="9")
    state.no_content()
    assert state.ended and state.disconnected(clean=True) is None


@pytest.mark.parametrize(
    ("target", "dropped"),
    [
        pytest.param("http://a.test/next", False, id="same-origin"),
        pytest.param("http://a.test:80/next", False, id="default-port-spelled"),
        pytest.param("https://a.test/next", True, id="other-scheme"),
        pytest.param("http://b.test/next", True, id="other-host"),
        pytest.param("http://a.test:8080/next", True, id="other-port"),
    ],
)
def test_drop_on_redirect_only_across_origins(target: str, dropped: bool) -> None:
    headers: dict[str, Any] = {"Authorization": "secret", "Accept": "x"}
    drop_on_redirect(headers, {"Authorization", "X-Absent"}, "http://a.test/start", target)
    expected = {"Accept": "x"} if dropped else {"Authorization": "secret", "Accept": "x"}
    assert headers == expected


def test_opened_says_whether_a_body_follows() -> None:
    no_content = StreamState(VALUES)
    assert no_content.opened(204, None) is False
    assert no_content.ended and no_content.media_type is None
    ok = StreamState(VALUES)
    assert ok.opened(200, NDJSON) is True
    assert not ok.ended and ok.media_type == NDJSON


def test_sse_done_ends_stream_and_events() -> None:
    values = started(SSE)
    assert drive(values, b"data: 1\n\ndata: [DONE]\n\ndata: 2\n\n") == [1]
    assert values.ended
    events = started(SSE, EVENTS)
    out = drive(events, b"data: 1\n\ndata: [DONE]\n\ndata: 2\n\n")
    assert out == [Event("", "message", "1"), Event("", "message", "[DONE]")]
    assert events.ended


@pytest.mark.parametrize(
    ("ident", "header"),
    [
        pytest.param(" 5", {"Last-Event-ID": b"5"}, id="leading-space"),
        pytest.param("5\t", {"Last-Event-ID": b"5"}, id="trailing-tab"),
        pytest.param("a b", {"Last-Event-ID": b"a b"}, id="inner-space-kept"),
        pytest.param(" ", {}, id="only-whitespace"),
    ],
)
def test_last_event_id_is_sent_as_a_browser_sends_it(ident: str, header: dict[str, bytes]) -> None:
    state = StreamState(VALUES, last_event_id=ident)
    assert state.request_headers() == header
    assert state.last_event_id == ident


def test_sse_id_with_a_leading_space_is_kept_as_the_spec_says() -> None:
    state = started(SSE, policy=ReconnectPolicy(random=lambda: 0.0))
    assert drive(state, b"id:  5\ndata: 1\n\n") == [1]
    assert state.last_event_id == " 5"
    assert state.request_headers() == {"Last-Event-ID": b"5"}


@pytest.mark.parametrize(
    ("media", "body"),
    [
        pytest.param(NDJSON, b"1\n2\nbad\n3\n", id="ndjson"),
        pytest.param(JSON_SEQ, b"\x1e1\n\x1e2\n\x1ebad\n\x1e3\n", id="json-seq"),
        pytest.param(SSE, b"data: 1\n\ndata: 2\n\ndata: \xff\n\n", id="sse-invalid-utf8"),
        pytest.param(SSE, b"data: 1\n\ndata: 2\n\ndata: bad\n\n", id="sse-not-json"),
    ],
)
def test_values_before_a_bad_line_are_delivered_first(media: str, body: bytes) -> None:
    state = started(media)
    out = state.feed(body)
    assert list(out) == [1, 2]
    assert state.stop
    with pytest.raises(DecodeError):
        state.raise_error()


def test_end_marker_before_a_bad_line_wins() -> None:
    state = started(NDJSON)
    out = state.feed(b'{"id": "1", "event": "end", "data": null}\nbad\n')
    assert list(out) == []
    assert state.ended and state.error is None


@pytest.mark.parametrize(
    ("media", "chunks", "pending"),
    [
        pytest.param(NDJSON, [b'{"a"'], True, id="ndjson-partial"),
        pytest.param(NDJSON, [b" "], False, id="ndjson-space-keep-alive"),
        pytest.param(NDJSON, [b"1\n"], False, id="ndjson-complete"),
        pytest.param(SSE, [b"data: 1\n"], True, id="sse-block-not-dispatched"),
        pytest.param(SSE, [b"da"], True, id="sse-partial-line"),
        pytest.param(SSE, [b":\n"], False, id="sse-comment"),
        pytest.param(JSON_SEQ, [b"\x1e[1"], True, id="json-seq-partial"),
        pytest.param(JSON_SEQ, [b"\x1e"], False, id="json-seq-keep-alive"),
        pytest.param(JSON_SEQ, [b"\x1e[1]\n"], False, id="json-seq-complete"),
    ],
)
def test_pending(media: str, chunks: list[bytes], pending: bool) -> None:
    state = started(media)
    drive(state, *chunks, clean_end=False)
    assert state.pending() is pending


# -- the driver: the connect/read/resume loop both clients run ------------------------------


def run_driver(
    state: StreamState,
    answers: list[Any],
    *,
    read_timeout: float | None = None,
    clock: Any = None,
    hooks: Hooks | None = None,
) -> list[Any]:
    """Perform the driver's commands from a script: each Read or Connect takes the next answer
    (an exception is thrown into the driver); return the commands as short tuples."""
    now = [0.0]
    clock = clock or (lambda: now[0])
    if hooks is None:
        driver = state.drive(read_timeout=read_timeout, clock=clock)
    else:
        driver = state.drive(read_timeout=read_timeout, clock=clock, hooks=hooks)
    seen: list[Any] = []
    answer: Any = None
    error: BaseException | None = None
    while True:
        try:
            command = driver.throw(error) if error is not None else driver.send(answer)
        except StopIteration:
            return seen
        error = answer = None
        if isinstance(command, Read):
            seen.append(("read", command.limit))
            got = answers.pop(0)
            if isinstance(got, float):  # time passes, then the bytes arrive
                now[0] += got
                got = answers.pop(0)
            answer = got
        elif isinstance(command, Deliver):
            seen.append(("deliver", list(command.batch)))
        elif isinstance(command, Release):
            seen.append(("release",))
        elif isinstance(command, Pause):
            seen.append(("pause", command.seconds, command.attempt))
        else:
            assert isinstance(command, Connect)
            seen.append(("connect",))
            got = answers.pop(0)
            if isinstance(got, BaseException):
                error = got
            else:
                answer = got


def test_driver_reads_delivers_and_ends() -> None:
    state = started(NDJSON)
    assert run_driver(state, [b"1\n2", b"\n", b""]) == [
        ("read", None),
        ("deliver", [1]),
        ("read", None),
        ("deliver", [2]),
        ("read", None),
        ("release",),
    ]


def test_driver_resumes_a_cut_and_retries_a_503() -> None:
    state = started(NDJSON, policy=ReconnectPolicy(random=lambda: 0.0, initial=1.0))
    busy = HTTPStatusError("HTTP 503", status_code=503, body=None)
    answers = [
        b'{"id": "1", "event": "message", "data": 1}\n',
        Cut(OSError("reset")),
        busy,
        (200, NDJSON, None),
        b'{"id": "2", "event": "end", "data": null}\n',
    ]
    assert run_driver(state, answers) == [
        ("read", None),
        ("deliver", [1]),
        ("read", None),
        ("release",),
        ("pause", 0.0, 1),
        ("connect",),
        ("pause", 0.0, 2),
        ("connect",),
        ("read", None),
        ("deliver", []),
    ]
    assert state.ended and state.request_headers() == {"Last-Event-ID": b"2"}


def test_driver_calls_the_hooks_in_the_order_of_its_commands() -> None:
    state = started(NDJSON, policy=ReconnectPolicy(random=lambda: 0.0, initial=1.0))
    seen: list[Any] = []
    cut = OSError("reset")
    hooks = Hooks(
        on_bytes=lambda data: seen.append(("bytes", data)),
        on_reconnect=lambda attempt, delay, cause: seen.append(("reconnect", attempt, cause)),
    )
    answers = [
        b'{"id": "1", "event": "message", "data": 1}\n',
        Cut(cut),
        (200, NDJSON, None),
        b" ",
        b'{"id": "2", "event": "end", "data": null}\n',
    ]
    commands = run_driver(state, answers, hooks=hooks)
    assert commands[:6] == [
        ("read", None),
        ("deliver", [1]),
        ("read", None),
        ("release",),
        ("pause", 0.0, 1),
        ("connect",),
    ]
    # The bytes of every read (a keep-alive too) before they were decoded; no bytes for the cut
    # or the clean end; the reconnection announced with the cause of the pause that follows it.
    assert seen == [
        ("bytes", b'{"id": "1", "event": "message", "data": 1}\n'),
        ("reconnect", 1, cut),
        ("bytes", b" "),
        ("bytes", b'{"id": "2", "event": "end", "data": null}\n'),
    ]


def test_driver_raises_a_status_that_resuming_cannot_fix() -> None:
    state = started(NDJSON, policy=ReconnectPolicy(random=lambda: 0.0))
    gone = HTTPStatusError("HTTP 404", status_code=404, body=None)
    with pytest.raises(HTTPStatusError):
        run_driver(state, [b'{"id": "1", "event": "message", "data": 1}\n', Cut(OSError()), gone])


def test_driver_ends_at_a_204_on_resume() -> None:
    state = started(NDJSON, policy=ReconnectPolicy(random=lambda: 0.0))
    answers = [b'{"id": "1", "event": "message", "data": 1}\n', Cut(OSError()), (204, None, None)]
    assert run_driver(state, answers)[-2:] == [("pause", 0.0, 1), ("connect",)]
    assert state.ended


def test_driver_bounds_an_item_that_never_completes() -> None:
    # A byte every 0.4 s keeps each read within a 1 s timeout; the item never completes.
    state = started(NDJSON)
    answers = [b"1\n", 0.1, b'{"a', 0.4, b"b", 0.4, b"c", 0.4, b"d"]
    with pytest.raises(StreamTimeout):
        run_driver(state, answers, read_timeout=1.0)
    assert not answers[1:]  # timed out before the last byte was asked for


def test_driver_keepalives_restart_the_clock() -> None:
    state = started(NDJSON)
    answers = [b'{"a', 0.9, b'": 1}\n', 0.9, b" ", 0.9, b" ", 0.5, b"2\n", b""]
    commands = run_driver(state, answers, read_timeout=1.0)
    assert ("deliver", [{"a": 1}]) in commands and ("deliver", [2]) in commands
    limits = [c[1] for c in commands if c[0] == "read"]
    assert limits[0] is None and limits[1] == pytest.approx(1.0)  # a partial item: bounded
    assert limits[2:] == [None, None, None, None]  # whitespace holds no item
