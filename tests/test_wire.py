"""The wire vocabulary is one: what the encoders and brokers write, the decoders read back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from stream.broker import reset_envelope
from stream.encoders import encoder_for
from stream.formats import negotiate
from stream.jsonseq import JSONSeqDecoder
from stream.ndjson import NDJSONDecoder
from stream.protocol import media_type, remote_error
from stream.sse import SSEDecoder
from stream.wire import (
    END,
    ERROR,
    JSON_SEQ,
    MESSAGE,
    NDJSON,
    NDJSON_ALIASES,
    RESERVED_EVENTS,
    RESET,
    SSE,
    ResetPayload,
    error_fields,
    error_json,
    reset_json,
)


def test_reserved_events_are_the_protocols_own() -> None:
    assert RESERVED_EVENTS == {END, RESET, ERROR}
    assert MESSAGE not in RESERVED_EVENTS


@pytest.mark.parametrize(
    ("value", "fields"),
    [
        pytest.param({"error": {"code": "boom", "message": "it broke"}}, ("boom", "it broke"),
                     id="error-object"),
        pytest.param({"error": {"code": 7, "message": "x"}}, ("7", "x"), id="code-not-a-string"),
        pytest.param({"error": {"code": "a", "message": "b", "at": 1}}, ("a", "b"),
                     id="extra-detail"),
        pytest.param({"error": {"code": "a", "message": "b"}, "n": 1}, None, id="data-with-error"),
        pytest.param({"error": {"message": "b"}}, None, id="no-code"),
        pytest.param({"error": "boom"}, None, id="error-not-an-object"),
        pytest.param([{"error": {"code": "a", "message": "b"}}], None, id="a-list"),
        pytest.param(None, None, id="null"),
    ],
)  # fmt: skip
def test_error_fields(value: Any, fields: tuple[str, str] | None) -> None:
    assert error_fields(value) == fields
    error = remote_error(value)
    assert (None if error is None else (error.code, error.message)) == fields


def test_error_json_is_the_error_object() -> None:
    assert orjson.loads(error_json("c", "m")) == {"error": {"code": "c", "message": "m"}}


@pytest.mark.parametrize("media", [NDJSON, SSE, JSON_SEQ])
def test_the_error_event_each_encoder_writes_reads_back(media: str) -> None:
    body = encoder_for(media).error("boom", "it broke")
    if media == SSE:
        (event,) = SSEDecoder().feed(body)
        assert event.event == ERROR
        value = orjson.loads(event.data)
    else:
        decoder = NDJSONDecoder() if media == NDJSON else JSONSeqDecoder()
        (value,) = decoder.feed(body) + decoder.flush()
    assert error_fields(value) == ("boom", "it broke")


@pytest.mark.parametrize("first", ["5-0", None])
def test_a_brokers_reset_carries_the_reset_payload(first: str | None) -> None:
    envelope = reset_envelope("3-1", first)
    assert envelope.event == RESET
    payload = orjson.loads(envelope.data)
    assert payload.keys() == ResetPayload.__annotations__.keys()
    assert payload == {"last_event_id": "3-1", "first_retained_id": first}
    assert envelope.data == reset_json("3-1", first)


@pytest.mark.parametrize("alias", sorted(NDJSON_ALIASES))
def test_server_and_client_read_every_ndjson_spelling_alike(alias: str) -> None:
    assert negotiate(alias) == NDJSON
    assert media_type(f"{alias}; charset=utf-8") == NDJSON
