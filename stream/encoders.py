"""Encoders of the three wire formats (pure: standard library and orjson only).

One ``Encoder`` per media type turns values, envelopes, errors and keep-alives into bytes. The
hot path is ``encode_value`` (plain streams) and ``encode_envelope`` (jobs and channels): each is
one orjson call or one ``bytes`` concatenation per event, with no other allocation.

Wire shapes (see the contract, "Formats and negotiation"):

- NDJSON: a value is ``<json>\n``; an envelope ``{"id":..,"event":..,"data":..}\n``;
  a keep-alive a single space, with no newline: JSON whitespace before the next value, so a
  strict JSON Lines reader (``jsonlines``, ``ndjson.loads``, ``JSON.parse`` per line) never sees
  the empty line it would refuse as invalid JSON (https://jsonlines.org/).
- SSE: a value is ``data: <json>\n\n``; an envelope ``id: ..\nevent: ..\ndata: <json>\n\n``
  (no ``event:`` line for "message"); a keep-alive ``:\n``.
- JSON-seq (RFC 7464): ``\x1e`` + the NDJSON line; a keep-alive is a lone ``\x1e``.

JSON is compact UTF-8 from orjson; NaN and Infinity are encoded as ``null`` (orjson's rule), so
every line is valid JSON. orjson never writes a raw LF or CR, so one ``data:`` line is always
enough for SSE (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .event import Envelope
from .wire import ERROR, JSON_SEQ, MESSAGE, NDJSON, SSE, error_json

_dumps = orjson.dumps


def dumps_compact(value: Any) -> bytes:
    """``orjson.dumps(value)`` in a bytes object of its own size, for data that is kept.

    orjson 3.13 returns bytes that keep a ~4 KiB allocation each: a log of 10,000 small events
    would hold 40 MB. Encoders concatenate (which copies); what is stored goes through this.
    """
    return bytes(memoryview(_dumps(value)))


#: the head of SSE's error event (its data is the error object)
_SSE_ERROR = b"event: " + ERROR.encode() + b"\ndata: "


# Not orjson's OPT_APPEND_NEWLINE: in orjson 3.13 each result it returns keeps a ~4 KiB
# allocation, which made a buffer of small events 40x its size and NDJSON 3x slower than SSE.
def _ndjson_value(value: Any) -> bytes:
    return _dumps(value) + b"\n"


def _jsonseq_value(value: Any) -> bytes:
    return b"\x1e" + _dumps(value) + b"\n"


def _sse_value(value: Any) -> bytes:
    return b"data: " + _dumps(value) + b"\n\n"


def _envelope_line(env: Envelope) -> bytes:
    # ids and event types are validated to plain ASCII tokens upstream, but they are encoded as
    # JSON strings anyway so that no value can ever break the line.
    return (
        b'{"id":'
        + _dumps(env.id)
        + b',"event":'
        + _dumps(env.event)
        + b',"data":'
        + env.data
        + b"}\n"
    )


def _jsonseq_envelope(env: Envelope) -> bytes:
    return b"\x1e" + _envelope_line(env)


def _sse_envelope(env: Envelope) -> bytes:
    head = b"id: " + env.id.encode() + b"\n"
    if env.event != MESSAGE:
        head += b"event: " + env.event.encode() + b"\n"
    return head + b"data: " + env.data + b"\n\n"


@dataclass(frozen=True, slots=True)
class Encoder:
    """How one media type writes values, envelopes, errors, keep-alives and shutdown hints."""

    media_type: str
    keepalive: bytes
    encode_value: Callable[[Any], bytes]
    encode_envelope: Callable[[Envelope], bytes]
    #: prefix, separator and suffix that frame a batch of bare JSON documents as values
    value_frame: tuple[bytes, bytes, bytes]

    def frame_values(self, documents: list[bytes]) -> bytes:
        """Values already encoded by ``orjson.dumps``, framed in one join (a batch's encoding).

        ``b"".join(map(encode_value, values))`` without a concatenation per value: a fast
        producer keeps the bare documents of a few dozen events and frames them together.
        """
        prefix, separator, suffix = self.value_frame
        return prefix + separator.join(documents) + suffix

    def error(self, code: str, message: str) -> bytes:
        """The error event that ends a stream whose producer failed after it started."""
        body = error_json(code, message)
        if self.media_type == SSE:
            return _SSE_ERROR + body + b"\n\n"
        if self.media_type == JSON_SEQ:
            return b"\x1e" + body + b"\n"
        return body + b"\n"

    def retry_hint(self, milliseconds: int) -> bytes:
        """SSE's ``retry:`` field, sent before a stream ends on shutdown; empty for the others."""
        if self.media_type == SSE:
            # A block with a retry field and no data sets the reconnection time without
            # dispatching an event (WHATWG HTML, "dispatch the event" step 1 and "retry").
            return b"retry: %d\n\n" % milliseconds
        return b""


def _once(media_type: str, encode: Callable[[Envelope], bytes]) -> Callable[[Envelope], bytes]:
    # A fanned-out envelope (event.SharedEnvelope) keeps its bytes per format: every other
    # subscriber of the publish gets the same bytes object.
    return lambda env: env.frame(media_type, encode)


ENCODERS: dict[str, Encoder] = {
    NDJSON: Encoder(
        NDJSON, b" ", _ndjson_value, _once(NDJSON, _envelope_line), (b"", b"\n", b"\n")
    ),
    SSE: Encoder(
        SSE, b":\n", _sse_value, _once(SSE, _sse_envelope), (b"data: ", b"\n\ndata: ", b"\n\n")
    ),
    JSON_SEQ: Encoder(
        JSON_SEQ,
        b"\x1e",
        _jsonseq_value,
        _once(JSON_SEQ, _jsonseq_envelope),
        (b"\x1e", b"\n\x1e", b"\n"),
    ),
}


def encoder_for(media_type: str) -> Encoder:
    """The encoder of a media type chosen by ``formats.negotiate``."""
    return ENCODERS[media_type]
