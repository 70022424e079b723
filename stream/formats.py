"""Media types of the three wire formats and ``Accept`` negotiation (pure: no I/O).

The contract: ``application/x-ndjson`` is the default (also for an absent ``Accept`` or ``*/*``);
``text/event-stream`` and ``application/json-seq`` (RFC 7464) on request; ``application/json``
(what OpenAPI-generated clients send) gets NDJSON; ``?format=`` wins over ``Accept``; an
``Accept`` that allows none of them is refused (406).

Negotiation follows RFC 9110 §12.5.1: each format gets the quality of the most specific media
range that matches it, ``q=0`` means "not acceptable", and among equal qualities the server's
order below decides (NDJSON first, as the contract's default).
"""

from __future__ import annotations

from typing import Final

# The media types are stream.wire's; re-exported here, where negotiation names them.
from .wire import JSON, JSON_SEQ, NDJSON, NDJSON_ALIASES, SSE

__all__ = [
    "FORMAT_NAMES",
    "JSON_SEQ",
    "MEDIA_TYPES",
    "NDJSON",
    "SSE",
    "NegotiationError",
    "negotiate",
]

#: the server's order of preference, which breaks ties between equal qualities
MEDIA_TYPES: Final = (NDJSON, SSE, JSON_SEQ)

#: ``?format=`` values and the media types they name
FORMAT_NAMES: Final = {"ndjson": NDJSON, "sse": SSE, "json-seq": JSON_SEQ}

#: other spellings clients send for the same formats (``application/ndjson`` is the ndjson spec's).
#: ``application/json`` is not NDJSON's media type, but a client that asks for JSON (every
#: OpenAPI-generated one does) reads a stream of JSON values best as NDJSON: one JSON text a line.
_ALIASES: Final = {alias: NDJSON for alias in (JSON, *NDJSON_ALIASES)}


class NegotiationError(ValueError):
    """The request names no format this service speaks (``?format=`` unknown, or ``Accept``)."""


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """Parse an ``Accept`` header into ``(media range, quality)`` pairs, skipping junk."""
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        fields = part.split(";")
        media = fields[0].strip().lower()
        if not media or "/" not in media:
            continue
        quality = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
                # RFC 9110 §12.4.2: qvalues lie in [0, 1]; out-of-range ones are not honoured.
                if not 0.0 <= quality <= 1.0:
                    quality = 0.0
        ranges.append((_ALIASES.get(media, media), quality))
    return ranges


def _quality(media_type: str, ranges: list[tuple[str, float]]) -> float:
    """The quality the ranges give to ``media_type``: the most specific match wins."""
    kind = media_type.split("/", 1)[0]
    best_specificity = -1
    quality = 0.0
    for media, q in ranges:
        if media == media_type:
            specificity = 2
        elif media == kind + "/*":
            specificity = 1
        elif media == "*/*":
            specificity = 0
        else:
            continue
        if specificity > best_specificity:
            best_specificity, quality = specificity, q
        elif specificity == best_specificity:
            # Aliases give one format several exact ranges: the most generous one counts.
            quality = max(quality, q)
    return quality


def negotiate(accept: str | None, format_param: str | None = None) -> str:
    """Pick the media type for a stream from ``?format=`` (which wins) or the ``Accept`` header."""
    if format_param is not None:
        try:
            return FORMAT_NAMES[format_param]
        except KeyError:
            names = ", ".join(FORMAT_NAMES)
            raise NegotiationError(f"format must be one of {names}") from None
    if accept is None or not accept.strip():
        return NDJSON
    ranges = _media_ranges(accept)
    if not ranges:
        # An Accept header with nothing parseable in it limits nothing (RFC 9110 §12.5.1).
        return NDJSON
    best, best_q = None, 0.0
    for media_type in MEDIA_TYPES:
        q = _quality(media_type, ranges)
        if q > best_q:
            best, best_q = media_type, q
    if best is None:
        raise NegotiationError("Accept allows none of " + ", ".join(MEDIA_TYPES))
    return best
