"""Incremental NDJSON decoder (pure: no I/O; standard library and orjson only).

Spec: https://github.com/ndjson/ndjson-spec (each line one JSON text, lines ended by LF,
CRLF tolerated). Also read by the same rules: JSON Lines, https://jsonlines.org/.

Departures from the spec, on purpose:

- Empty and whitespace-only lines are skipped instead of being errors: they are the server's
  keep-alives (CONTRACT.md, "an empty line"), and the ndjson spec's own "parsers MAY silently
  ignore empty lines" covers the empty ones.
- Only LF ends a line, as the spec says; a CR before it is JSON whitespace and orjson ignores it,
  so CRLF needs no extra work. A lone CR is *not* a line end (it would be in SSE).

Speed: a whole read is split at once with ``bytes.split(b"\\n")`` and decoded by one list
comprehension over ``orjson.loads``; only when that raises does a slow path walk the lines
again to find the bad line's number. Only the unfinished last line is carried into the next
read (as a list of pieces, so a long line fed in small reads costs linear time).
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import DecodeError
from .lines import DEFAULT_MAX_LINE, check_lines, too_long

__all__ = ["NDJSONDecoder"]

_WHITESPACE = b" \t\r\n"  # JSON's insignificant whitespace (RFC 8259, section 2)


class NDJSONDecoder:
    """Decode NDJSON from reads of any size into the JSON values of its complete lines."""

    __slots__ = ("max_line", "line_number", "_tail", "_size")

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        #: lines (empty ones included) completed so far; a DecodeError names the line by it
        self.line_number = 0
        self._tail: list[bytes] = []  # pieces of the unfinished last line
        self._size = 0  # their total length

    def feed(self, data: bytes) -> list[Any]:
        """The decoded values of every line that ``data`` completes (keep-alive lines skipped).

        After a ``DecodeError`` the values after the bad line in the same read are lost; the
        decoder itself stays usable.
        """
        lines = data.split(b"\n")
        if len(lines) == 1:
            if data:
                self._tail.append(data)
                self._size += len(data)
                if self._size > self.max_line:
                    raise too_long(self.max_line, self.line_number + 1, b"".join(self._tail))
            return []
        rest = lines.pop()
        first = self.line_number
        if self._tail:
            self._tail.append(lines[0])
            lines[0] = b"".join(self._tail)
        if self._size + len(data) > self.max_line:
            check_lines(lines, self.max_line, first)
        self.line_number = first + len(lines)
        if rest:
            self._tail = [rest]
            self._size = len(rest)
            if len(rest) > self.max_line:
                raise too_long(self.max_line, self.line_number + 1, rest)
        else:
            self._tail = []
            self._size = 0
        loads = orjson.loads
        try:
            return [loads(line) for line in lines if line]
        except orjson.JSONDecodeError:
            return _decode_slowly(lines, first)

    def flush(self) -> list[Any]:
        """At the end of the body: the value of an unterminated last line, if it is not blank."""
        tail = self._tail
        self._tail = []
        self._size = 0
        if not tail:
            return []
        first = self.line_number
        self.line_number = first + 1
        return _decode_slowly([b"".join(tail)], first)


def _decode_slowly(lines: list[bytes], first: int) -> list[Any]:
    """Decode ``lines`` (numbered from ``first + 1``) one by one, raising at the first bad one."""
    values: list[Any] = []
    for index, line in enumerate(lines):
        if not line.strip(_WHITESPACE):
            continue  # a keep-alive
        try:
            values.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            number = first + index + 1
            raise DecodeError(
                f"line {number} is not valid JSON: {exc}", line_number=number, line=line
            ) from exc
    return values
