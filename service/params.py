"""Request values: query parameters, JSON bodies, channel names, resume ids."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import orjson
from flask import request

from service.demo import SEED_MESSAGES
from service.edges import BadRequest
from stream.broker import Broker
from stream.encoders import dumps_compact
from stream.ndjson import loads_exact, long_digits

NAME_RE = re.compile(r"[A-Za-z0-9_\-.:]{1,128}")
EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9_\-.:]{1,64}")
JOB_ID_RE = re.compile(r"[0-9a-f]{32}")
INT_RE = re.compile(r"[0-9]{1,10}")
DECIMAL_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,9})?|\.[0-9]{1,9}")

MAX_COUNT, MAX_INTERVAL, MAX_SIZE = 10_000_000, 60.0, 1_000_000


# -- parameters -----------------------------------------------------------------------------


def int_param(args: Mapping[str, Any], name: str, default: int, maximum: int) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    if isinstance(raw, bool) or not (
        (isinstance(raw, int) and 0 <= raw <= maximum)
        or (isinstance(raw, str) and INT_RE.fullmatch(raw) and int(raw) <= maximum)
    ):
        raise BadRequest(f"{name} must be an integer from 0 to {maximum:,}", code=f"bad_{name}")
    return int(raw)


def decimal_param(args: Mapping[str, Any], name: str, default: float, maximum: float) -> float:
    raw = args.get(name)
    if raw is None:
        return default
    value: float | None = None
    if isinstance(raw, str) and DECIMAL_RE.fullmatch(raw):
        value = float(raw)
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw):
        value = float(raw)
    if value is None or not 0.0 <= value <= maximum:
        raise BadRequest(f"{name} must be a decimal from 0 to {maximum:g}", code=f"bad_{name}")
    return value


def stream_params(args: Mapping[str, Any]) -> tuple[int, float, int]:
    """``count``, ``interval`` and ``size`` from a query string or a JSON body, validated."""
    count = int_param(args, "count", len(SEED_MESSAGES), MAX_COUNT)
    interval = decimal_param(args, "interval", 0.5, MAX_INTERVAL)
    size = int_param(args, "size", 0, MAX_SIZE)
    return count, interval, size


def last_event_id(broker: Broker) -> str | None:
    value = request.args.get("last_event_id")
    if value is None:
        value = request.headers.get("Last-Event-ID")
    if value is None or value == "":
        return None
    if not broker.valid_id(value):
        raise BadRequest(
            "Last-Event-ID is not an id this service gave out", code="bad_last_event_id"
        )
    return value


def compact_json(text: bytes) -> bytes:
    """One published JSON text, compact on one line, exactly what ``json.loads`` reads in it.

    orjson re-encodes the common case. Where orjson refuses what ``json.loads`` accepts (a
    number beyond a double's range, a lone surrogate escape) or would change it (an integer
    beyond 64 bits becomes a float), the text itself is kept, validated by ``json.loads``, with
    its line breaks turned into spaces (JSON strings cannot hold a raw line break, so that only
    touches whitespace between tokens). NaN and Infinity, which are not JSON, are refused.
    Raises ``ValueError`` for anything that is not one JSON text.
    """
    if not long_digits(text):
        try:
            return dumps_compact(orjson.loads(text))
        except orjson.JSONDecodeError:
            pass  # decided below, by the reference parser
    loads_exact(text)  # the clients' own rule for exact values
    return text.strip().replace(b"\r", b" ").replace(b"\n", b" ")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise BadRequest(
            "channel names are 1 to 128 characters of A-Z a-z 0-9 _ - . : (not . or ..)",
            code="bad_channel_name",
        )
    return name
