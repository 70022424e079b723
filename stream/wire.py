"""The wire vocabulary, defined once: media types, reserved event names, error and reset payloads.

Pure (standard library and orjson). The codecs (``formats``, ``encoders``), the clients'
driver (``protocol``), the brokers and the service take their words from here, so a server and
a client of this package cannot disagree on one. The contract's "Formats and negotiation" says
what they mean on the wire:

- Media types: ``NDJSON`` (the default), ``SSE``, ``JSON_SEQ`` (RFC 7464); ``JSON`` for a single
  value (a publish body, an error answer). ``NDJSON_ALIASES`` are other spellings clients send.
- Event types: ``MESSAGE`` for an ordinary event (SSE's default type: no ``event:`` line).
  ``RESERVED_EVENTS`` are the ones the protocol itself uses, which publishers may not send:
  ``END`` (a job's last event), ``RESET`` (the entries after a ``Last-Event-ID`` are gone; its
  data is a ``ResetPayload``) and ``ERROR`` (the stream failed; its data, and on NDJSON and
  JSON-seq the whole last line, is an ``ErrorPayload``).
- ``DONE``: the data of the SSE event that ends an OpenAI-style stream. This service never
  sends it; the clients end ``stream()`` there without an error.
"""

from __future__ import annotations

from typing import Any, Final, TypedDict

import orjson

__all__ = [
    "DONE",
    "END",
    "ERROR",
    "JSON",
    "JSON_SEQ",
    "MESSAGE",
    "NDJSON",
    "NDJSON_ALIASES",
    "RESERVED_EVENTS",
    "RESET",
    "SSE",
    "ErrorDetail",
    "ErrorPayload",
    "ResetPayload",
    "error_fields",
    "error_json",
    "error_payload",
    "reset_json",
]

NDJSON: Final = "application/x-ndjson"
SSE: Final = "text/event-stream"
JSON_SEQ: Final = "application/json-seq"
JSON: Final = "application/json"
#: other spellings of NDJSON's media type (``application/ndjson`` is the ndjson spec's own)
NDJSON_ALIASES: Final = frozenset(
    {"application/ndjson", "application/jsonl", "application/x-jsonlines"}
)

MESSAGE: Final = "message"
END: Final = "end"
RESET: Final = "reset"
ERROR: Final = "error"
RESERVED_EVENTS: Final = frozenset({END, RESET, ERROR})

#: the data that ends an OpenAI-style SSE stream (https://platform.openai.com/docs/api-reference)
DONE: Final = "[DONE]"


class ErrorDetail(TypedDict):
    """What went wrong: a stable machine-readable ``code`` and a sentence for people."""

    code: str
    message: str


class ErrorPayload(TypedDict):
    """``{"error": {"code": ..., "message": ...}}``: a 4xx/5xx body and a stream's error event."""

    error: ErrorDetail


class ResetPayload(TypedDict):
    """The data of a ``reset``: the id the caller resumed from, and the oldest one still kept.

    ``first_retained_id`` is ``None`` when nothing after ``last_event_id`` is retained or the
    caller's id is ahead of the log (its position is unknown).
    """

    last_event_id: str
    first_retained_id: str | None


def error_payload(code: str, message: str) -> ErrorPayload:
    """The error object for ``code`` and ``message``."""
    return {"error": {"code": code, "message": message}}


def error_json(code: str, message: str) -> bytes:
    """The error object as compact JSON bytes."""
    return orjson.dumps(error_payload(code, message))


def error_fields(value: Any) -> tuple[str, str] | None:
    """``(code, message)`` if a decoded JSON value is exactly an error object, else ``None``.

    Exactly: one key, ``"error"``, holding an object with ``"code"`` and ``"message"``; a
    value of the stream that merely has an ``"error"`` key among others is data.
    """
    if type(value) is dict and len(value) == 1:
        error = value.get("error")
        if type(error) is dict and "code" in error and "message" in error:
            return str(error["code"]), str(error["message"])
    return None


def reset_json(last_event_id: str, first_retained_id: str | None) -> bytes:
    """The data of a ``reset`` event as compact JSON bytes."""
    payload: ResetPayload = {
        "last_event_id": last_event_id,
        "first_retained_id": first_retained_id,
    }
    return orjson.dumps(payload)
