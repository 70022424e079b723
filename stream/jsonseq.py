"""Incremental JSON text sequence decoder, RFC 7464 (pure: no I/O; standard library and orjson).

Spec: https://www.rfc-editor.org/rfc/rfc7464 . Each text is ``RS JSON-text LF`` (RS = 0x1E).

When a text is complete:

- when the next RS arrives (section 2.1: the octets between two RSes are one possible text), or
- as soon as it ends with LF *and* parses. Waiting for the next RS would hold every event back
  until the one after it. A prefix that ends in LF and parses cannot be the start of a longer
  JSON text (a value followed by whitespace can only be followed by more whitespace), so this
  never splits a text. A pretty-printed text whose lines end in LF is kept until it parses.

Section 2.4: a text that is a top-level number, ``true``, ``false`` or ``null`` must be followed
by whitespace, or it may have been truncated (``12`` of ``123``): such a text is a DecodeError.

Departures from the spec, on purpose:

- A text that does not parse raises ``DecodeError`` (``line_number`` = its index, 1-based,
  counting JSON texts, not keep-alives) instead of being skipped ("SHOULD nonetheless continue
  parsing", section 2.1): a client library must not lose data silently. Likewise for
  non-whitespace bytes after a text that was already delivered and before the next RS.
- Bytes before the first RS are read as a text, as if the stream had begun with RS, so a
  server that forgets the first RS still gets through.
- Empty and whitespace-only texts (a lone RS, consecutive RSes) are skipped: they are the
  server's keep-alives (CONTRACT.md); section 2.1 allows ignoring consecutive RSes.
- A UTF-8 byte order mark at the very start of the body is skipped, as in NDJSON.

Values are decoded exactly as ``json.loads`` would (``stream.ndjson.decode_exact``: orjson,
with ``json.loads`` where orjson refuses a text or may round a long integer).

Speed: a read is split on RS at once; when every RS in it follows an LF (the usual case) the
complete texts are decoded by one list comprehension over ``orjson.loads``, with a slow path to
find the bad text's number. Re-parsing a long unfinished text on every read that ends in LF
would be quadratic, so that is only tried when the text could have ended (its last byte could
close a JSON value and, past 64 KiB, its brackets balance).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from .errors import DecodeError
from .lines import DEFAULT_MAX_LINE, check_lines, skip_bom, too_long
from .ndjson import decode_exact, long_digits

__all__ = ["JSONSeqDecoder"]

_RS: Final = b"\x1e"
_WHITESPACE: Final = b" \t\r\n"  # JSON's insignificant whitespace (RFC 8259, section 2)
#: the last byte of a complete JSON text can only be one of these
_CAN_END: Final = frozenset(b'}]"0123456789el')
#: an unfinished text up to this size is re-parsed whenever it ends in LF and could have ended
_CHEAP_PARSE: Final = 64 * 1024


class JSONSeqDecoder:
    """Decode ``application/json-seq`` from reads of any size into the values of its texts."""

    __slots__ = (
        "max_line",
        "line_number",
        "_pieces",
        "_size",
        "_depth",
        "_last",
        "_delivered",
        "_head",
    )

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        #: JSON texts seen so far (keep-alives not counted); a DecodeError names a text by it
        self.line_number = 0
        self._pieces: list[bytes] = []  # the current (unfinished) text, in pieces
        self._size = 0  # their total length
        self._depth = 0  # opening minus closing brackets in them (strings not excluded)
        self._last = 0  # their last non-whitespace byte (0: none yet)
        self._delivered = False  # the current text already parsed at an LF and was delivered
        # The first bytes, held until we know whether they start a BOM; None once we know.
        self._head: bytes | None = b""

    def feed(self, data: bytes) -> list[Any]:
        """The values of every text that ``data`` completes (keep-alives skipped).

        A ``DecodeError`` carries in ``values`` the values of the texts before the bad one in
        this read.
        """
        if self._head is not None:
            self._head, data = skip_bom(self._head, data)
            if self._head is not None:
                return []
        start = data.find(_RS)
        if start < 0:
            self._append(data)
            return self._try_current()
        if start:
            self._append(data[:start])
        values = self._finish_current(truncated=False)
        rest = data[start + 1 :]
        texts = rest.split(_RS)
        last = texts.pop()
        if texts:
            if len(rest) > self.max_line:
                check_lines(texts, self.max_line, self.line_number)
            # Every RS right after an LF: each complete text is non-empty and ends in
            # whitespace, so section 2.4's truncation check cannot fail.
            if rest.count(b"\n\x1e") == len(texts) and not long_digits(rest):
                try:
                    decoded = list(map(orjson.loads, texts))
                except orjson.JSONDecodeError:
                    decoded = self._decode_slowly(texts, before=values)
                else:
                    self.line_number += len(texts)
            else:
                decoded = self._decode_slowly(texts, before=values)
            if values:
                values.extend(decoded)
            else:
                values = decoded
        if last:
            try:
                self._append(last)
                values.extend(self._try_current())
            except DecodeError as exc:
                exc.values[:0] = values
                raise
        return values

    def flush(self) -> list[Any]:
        """At the end of the body: the value of the last text; a truncated one is a DecodeError."""
        if self._head:
            self._append(self._head)  # a body of one or two bytes of a BOM: not JSON
        self._head = b""  # a next body (the decoder reused) may start with its own BOM
        return self._finish_current(truncated=True)

    def pending(self) -> bool:
        """Whether part of a text has arrived and it is not complete yet (whitespace is none)."""
        return self._last != 0 and not self._delivered

    def _append(self, data: bytes) -> None:
        """Add ``data`` to the current text."""
        if not data:
            return
        if self._delivered:
            if data.strip(_WHITESPACE):
                number = self.line_number
                raise DecodeError(
                    f"JSON text {number} continues after a complete value",
                    line_number=number,
                    line=data,
                )
            return
        self._pieces.append(data)
        self._size += len(data)
        if self._size > self.max_line:
            raise too_long(self.max_line, self.line_number + 1, b"".join(self._pieces))
        self._depth += data.count(b"{") + data.count(b"[") - data.count(b"}") - data.count(b"]")
        stripped = data.rstrip(_WHITESPACE)
        if stripped:
            self._last = stripped[-1]

    def _try_current(self) -> list[Any]:
        """Deliver the current text now if it ends in LF and parses (it may be unfinished)."""
        pieces = self._pieces
        if not pieces or pieces[-1][-1] != 0x0A or self._last not in _CAN_END:
            return []
        if self._size > _CHEAP_PARSE and self._depth > 0:
            return []
        text = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        try:
            value = decode_exact(text)
        except ValueError:
            self._pieces = [text]  # pretty-printed and not finished yet: wait for more
            return []
        self.line_number += 1
        self._reset()
        self._delivered = True
        return [value]

    def _finish_current(self, *, truncated: bool) -> list[Any]:
        """The current text has ended (an RS or the end of the body): decode it or raise."""
        if self._delivered or not self._pieces:
            self._reset()
            return []
        pieces = self._pieces
        text = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._reset()
        return self._decode_slowly([text], truncated=truncated)

    def _reset(self) -> None:
        """Start a new, empty current text."""
        self._pieces = []
        self._size = 0
        self._depth = 0
        self._last = 0
        self._delivered = False

    def _decode_slowly(
        self, texts: list[bytes], *, truncated: bool = False, before: list[Any] | None = None
    ) -> list[Any]:
        """Decode ``texts`` one by one, counting them and raising at the first bad one.

        The error's ``values`` are ``before`` (what this read decoded earlier) and the values of
        the texts before the bad one.
        """
        values: list[Any] = []
        for text in texts:
            if not text.strip(_WHITESPACE):
                continue  # a keep-alive
            self.line_number += 1
            number = self.line_number
            what = "truncated" if truncated else "not valid JSON"
            try:
                value = decode_exact(text)
            except ValueError as exc:
                raise DecodeError(
                    f"JSON text {number} is {what}: {exc}",
                    line_number=number,
                    line=text,
                    values=[*(before or ()), *values],
                ) from exc
            # RFC 7464, section 2.4: a top-level number, true, false or null must be followed
            # by whitespace, else it may have been cut short.
            if (value is None or isinstance(value, int | float)) and text[-1] not in _WHITESPACE:
                raise DecodeError(
                    f"JSON text {number} may be truncated (a top-level {type(value).__name__} "
                    "not followed by whitespace)",
                    line_number=number,
                    line=text,
                    values=[*(before or ()), *values],
                )
            values.append(value)
        return values
