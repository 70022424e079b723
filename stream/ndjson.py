"""Incremental NDJSON decoder, and the exact JSON decoding every decoder shares (pure: no I/O).

Spec: https://github.com/ndjson/ndjson-spec (each line one JSON text, lines ended by LF,
CRLF tolerated). Also read by the same rules: JSON Lines, https://jsonlines.org/.

Exact decoding (CONTRACT.md, section 2): a value is what ``json.loads`` gives for its text, or a
``DecodeError``. orjson, the fast path, differs in three places: it rounds integers beyond 64
bits to floats (``12345678901234567890123``), and refuses numbers that overflow a double
(``1e400``, ``inf`` for ``json.loads``) and lone surrogate escapes (``"\\ud800"``). A text orjson
refuses is decoded again by ``json.loads`` (``NaN`` and ``Infinity`` still refused: they are not
JSON); a read that may hold an integer orjson rounds (a run of 19 or more digits: 2**63 has 19)
is decoded by ``json.loads`` line by line where such a run is. ``long_digits`` tells at the cost
of a ninth of the read: any 19 consecutive bytes hold two positions that are multiples of 9.

Departures from the spec, on purpose:

- Whitespace between values is nothing: empty and whitespace-only lines are skipped, and so is
  whitespace before a value on its line. The server's NDJSON keep-alive is a single space with
  no newline (CONTRACT.md), JSON whitespace before the next value; older servers sent an empty
  line, which the ndjson spec's "parsers MAY silently ignore empty lines" covers.
- Only LF ends a line, as the spec says; a CR before it is JSON whitespace and orjson ignores it,
  so CRLF needs no extra work. A lone CR is *not* a line end (it would be in SSE).
- A UTF-8 byte order mark at the very start of the body is skipped (RFC 8259, section 8.1,
  lets a parser ignore it).

Speed: a whole read is split at once with ``bytes.split(b"\\n")`` and decoded by ``map`` over
``orjson.loads``; only when that raises (a blank line, a bad line, a text orjson refuses) or the
read may hold a long integer does a slow path walk the lines again. Only the unfinished last
line is carried into the next read (as a list of pieces, so a long line fed in small reads
costs linear time).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

from .errors import DecodeError, LineTooLong
from .lines import DEFAULT_MAX_LINE, check_lines, skip_bom, too_long

__all__ = ["NDJSONDecoder", "decode_exact", "loads_exact", "long_digits"]

_WHITESPACE: Final = b" \t\r\n"  # JSON's insignificant whitespace (RFC 8259, section 2)
_NOT_WHITESPACE: Final = re.compile(rb"[^ \t\r\n]")
#: bytes.translate table: digits stay "0", every other byte becomes a space
_DIGITS: Final = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
#: the shortest digit run that may be an integer orjson rounds (-2**63 - 1 has 19 digits)
_RUN: Final = b"0" * 19


def long_digits(data: bytes) -> bool:
    """Whether ``data`` holds a run of 19 or more ASCII digits (an integer orjson may round)."""
    # Any run of 19 bytes covers two adjacent positions of data[::9]: a cheap filter first.
    return b"00" in data[::9].translate(_DIGITS) and _RUN in data.translate(_DIGITS)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_exact(text: bytes | str) -> Any:
    """What ``json.loads`` gives for one JSON text (``NaN``/``Infinity`` refused: not JSON)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # strict: invalid UTF-8 is a UnicodeDecodeError (ValueError)
    return json.loads(text, parse_constant=_no_constant)


def decode_exact(text: bytes | str) -> Any:
    """One JSON text, exactly: orjson where it is exact, else ``json.loads`` (or ValueError)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        try:
            return loads_exact(text)
        except (ValueError, RecursionError):
            raise exc from None  # orjson's message says where the text went wrong
    # A str is checked as its UTF-8 bytes: encoding and one translate cost less than a regex
    # scan of the str (orjson parsed it, so it holds no lone surrogate and encodes).
    raw = text.encode() if isinstance(text, str) else text
    if _RUN in raw.translate(_DIGITS):
        return loads_exact(text)
    return value


class NDJSONDecoder:
    """Decode NDJSON from reads of any size into the JSON values of its complete lines."""

    __slots__ = ("max_line", "line_number", "_tail", "_size", "_head")

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        #: lines (empty ones included) completed so far; a DecodeError names the line by it
        self.line_number = 0
        self._tail: list[bytes] = []  # pieces of the unfinished last line
        self._size = 0  # their total length
        # The first bytes, held until we know whether they start a BOM; None once we know.
        self._head: bytes | None = b""

    def feed(self, data: bytes) -> list[Any]:
        """The decoded values of every line that ``data`` completes (keep-alives skipped).

        A ``DecodeError`` carries in ``values`` the values of the lines before the bad one in
        this read; those after it are lost. The decoder itself stays usable.
        """
        if self._head is not None:
            self._head, data = skip_bom(self._head, data)
            if self._head is not None:
                return []
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
        joined = False
        if self._tail:
            self._tail.append(lines[0])
            lines[0] = b"".join(self._tail)
            joined = True
        if self._size + len(data) > self.max_line:
            try:
                check_lines(lines, self.max_line, first)
            except LineTooLong as exc:
                # The lines before it are delivered first, like those before a malformed line.
                exc.values = _decode_slowly(lines[: exc.line_number - first - 1], first)
                raise
        self.line_number = first + len(lines)
        if rest:
            self._tail = [rest]
            self._size = len(rest)
        else:
            self._tail = []
            self._size = 0
        try:
            values = list(map(orjson.loads, lines))
        except orjson.JSONDecodeError:
            values = _decode_slowly(lines, first)
        else:
            if long_digits(data) or (joined and long_digits(lines[0])):
                values = _decode_slowly(lines, first)
        if len(rest) > self.max_line:
            error = too_long(self.max_line, self.line_number + 1, rest)
            error.values = values
            raise error
        return values

    def flush(self) -> list[Any]:
        """At the end of the body: the value of an unterminated last line, if it is not blank."""
        tail = self._tail
        if self._head:
            tail = [self._head, *tail]  # a body of one or two bytes of a BOM: not JSON
        self._head = b""  # a next body (the decoder reused) may start with its own BOM
        self._tail = []
        self._size = 0
        if not tail:
            return []
        first = self.line_number
        self.line_number = first + 1
        return _decode_slowly([b"".join(tail)], first)

    def pending(self) -> bool:
        """Whether part of a value has arrived and its line has not ended (whitespace is none)."""
        tail = self._tail
        if not tail:
            return False  # the usual case, asked after every read: no generator for nothing
        search = _NOT_WHITESPACE.search
        for piece in tail:
            if search(piece) is not None:
                return True
        return False


def _decode_slowly(lines: list[bytes], first: int) -> list[Any]:
    """Decode ``lines`` (numbered from ``first + 1``) one by one, raising at the first bad one."""
    values: list[Any] = []
    for index, line in enumerate(lines):
        if not line.strip(_WHITESPACE):
            continue  # a keep-alive
        try:
            values.append(decode_exact(line))
        except ValueError as exc:
            number = first + index + 1
            raise DecodeError(
                f"line {number} is not valid JSON: {exc}",
                line_number=number,
                line=line,
                values=values,
            ) from exc
    return values
