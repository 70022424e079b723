"""Accept negotiation (RFC 9110 §12.5.1) and the encoders' wire shapes."""

from __future__ import annotations

import json

import orjson
import pytest

from stream.encoders import encoder_for
from stream.event import Envelope
from stream.formats import JSON_SEQ, NDJSON, SSE, NegotiationError, negotiate


@pytest.mark.parametrize(
    ("accept", "fmt", "expected"),
    [
        pytest.param(None, None, NDJSON, id="absent"),
        pytest.param("", None, NDJSON, id="empty"),
        pytest.param("*/*", None, NDJSON, id="any"),
        pytest.param("application/*", None, NDJSON, id="application-any"),
        pytest.param("text/*", None, SSE, id="text-any"),
        pytest.param("text/event-stream", None, SSE, id="sse"),
        pytest.param("TEXT/Event-Stream", None, SSE, id="case-insensitive"),
        pytest.param("application/json-seq", None, JSON_SEQ, id="json-seq"),
        pytest.param("application/x-ndjson", None, NDJSON, id="ndjson"),
        pytest.param("application/ndjson", None, NDJSON, id="ndjson-alias"),
        pytest.param("text/event-stream;q=0.5, application/json-seq", None, JSON_SEQ, id="q-order"),
        pytest.param("text/event-stream;q=0, */*", None, NDJSON, id="q-zero-excludes"),
        pytest.param("*/*;q=0.1, text/event-stream", None, SSE, id="specific-beats-wildcard"),
        pytest.param("application/x-ndjson;q=0, */*", None, SSE, id="ndjson-refused"),
        pytest.param("garbage", None, NDJSON, id="unparseable-limits-nothing"),
        pytest.param("application/json", None, NDJSON, id="json-is-ndjson"),
        pytest.param("Application/JSON; charset=utf-8", None, NDJSON, id="json-with-params"),
        pytest.param("application/json, text/event-stream", None, NDJSON, id="json-and-sse"),
        pytest.param("text/event-stream, application/json;q=0.9", None, SSE, id="json-lower-q"),
        pytest.param(
            "application/x-ndjson;q=0.2, application/json", None, NDJSON, id="alias-best-q"
        ),
        pytest.param("application/json;q=0, */*", None, SSE, id="json-refused-means-ndjson"),
        pytest.param("application/json-seq, application/json;q=0.5", None, JSON_SEQ, id="seq"),
        pytest.param("text/event-stream", "ndjson", NDJSON, id="param-wins"),
        pytest.param(None, "json-seq", JSON_SEQ, id="param-json-seq"),
        pytest.param("text/html", "sse", SSE, id="param-wins-over-refusal"),
    ],
)
def test_negotiate(accept: str | None, fmt: str | None, expected: str) -> None:
    assert negotiate(accept, fmt) == expected


@pytest.mark.parametrize(
    ("accept", "fmt"),
    [
        pytest.param("application/json;q=0", None, id="json-refused"),
        pytest.param("text/html, image/*", None, id="html"),
        pytest.param("*/*;q=0", None, id="nothing"),
        pytest.param("text/event-stream;q=abc", None, id="bad-q-is-zero"),
        pytest.param(None, "xml", id="unknown-format"),
    ],
)
def test_negotiate_refuses(accept: str | None, fmt: str | None) -> None:
    with pytest.raises(NegotiationError):
        negotiate(accept, fmt)


VALUE = {"a": "line\u2028sep", "n": 1}
ENV = Envelope("1-0", "message", b'{"x":1}')


@pytest.mark.parametrize(
    ("media_type", "value", "envelope", "keepalive", "error"),
    [
        pytest.param(
            NDJSON,
            orjson.dumps(VALUE) + b"\n",
            b'{"id":"1-0","event":"message","data":{"x":1}}\n',
            b" ",
            b'{"error":{"code":"c","message":"m"}}\n',
            id="ndjson",
        ),
        pytest.param(
            SSE,
            b"data: " + orjson.dumps(VALUE) + b"\n\n",
            b'id: 1-0\ndata: {"x":1}\n\n',
            b":\n",
            b'event: error\ndata: {"error":{"code":"c","message":"m"}}\n\n',
            id="sse",
        ),
        pytest.param(
            JSON_SEQ,
            b"\x1e" + orjson.dumps(VALUE) + b"\n",
            b'\x1e{"id":"1-0","event":"message","data":{"x":1}}\n',
            b"\x1e",
            b'\x1e{"error":{"code":"c","message":"m"}}\n',
            id="json-seq",
        ),
    ],
)
def test_encoders(
    media_type: str, value: bytes, envelope: bytes, keepalive: bytes, error: bytes
) -> None:
    enc = encoder_for(media_type)
    assert enc.encode_value(VALUE) == value
    assert enc.encode_envelope(ENV) == envelope
    assert enc.keepalive == keepalive
    assert enc.error("c", "m") == error


def test_ndjson_keepalives_leave_every_line_strict_json() -> None:
    # A strict JSON Lines reader (json.loads per line, no blank line allowed) reads a body with
    # keep-alives anywhere between values: each is whitespace before the next value.
    enc = encoder_for(NDJSON)
    ka = enc.keepalive
    body = ka + enc.encode_value(1) + ka + ka + enc.encode_envelope(ENV) + ka + enc.encode_value(2)
    assert b"\n" not in ka
    assert [json.loads(line) for line in body.split(b"\n")[:-1]] == [
        1,
        {"id": "1-0", "event": "message", "data": {"x": 1}},
        2,
    ]


def test_sse_envelope_with_event_type() -> None:
    enc = encoder_for(SSE)
    assert (
        enc.encode_envelope(Envelope("2-1", "end", b"{}")) == b"id: 2-1\nevent: end\ndata: {}\n\n"
    )


def test_retry_hint_only_in_sse() -> None:
    assert encoder_for(SSE).retry_hint(1500) == b"retry: 1500\n\n"
    assert encoder_for(NDJSON).retry_hint(1500) == b""
    assert encoder_for(JSON_SEQ).retry_hint(1500) == b""


def test_nan_is_encoded_as_null() -> None:
    assert encoder_for(NDJSON).encode_value({"x": float("nan")}) == b'{"x":null}\n'


def test_dumps_compact_owns_only_its_size() -> None:
    import tracemalloc

    from stream.encoders import dumps_compact

    tracemalloc.start()
    try:
        kept = [dumps_compact({"n": i}) for i in range(1000)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept[7] == b'{"n":7}'
    assert held < 1000 * 200  # orjson's own results would hold ~4 KiB each
