"""Byte-level line splitting on CR, LF and CRLF, incremental across reads (pure: no I/O).

The line endings are the ones the WHATWG event stream grammar allows
(https://html.spec.whatwg.org/multipage/server-sent-events.html#parsing-an-event-stream):
``end-of-line = ( cr lf / cr / lf )``. Whole reads are split at once in C
(``bytes.replace`` + ``bytes.split``); only the unfinished last line is carried into the next
read, as a list of pieces, so a long line fed in many small reads costs linear time.

A CR at the end of a read ends its line at once (a line is delivered as soon as it is known to
be complete); the decoder only remembers to drop an LF at the start of the next read, so that
a CRLF split across two reads is still one line end.

UTF-8 never uses the bytes CR (0x0D) or LF (0x0A) inside a multi-byte character, so splitting
before decoding is exact, and a character split across reads decodes once its line is complete.
"""

from __future__ import annotations

from typing import Final

from .errors import LineTooLong

__all__ = ["BOM", "DEFAULT_MAX_LINE", "LineSplitter", "skip_bom"]

#: the largest line (or JSON-seq text) a decoder accepts by default, in bytes
DEFAULT_MAX_LINE: Final = 16 * 1024 * 1024

#: how much of an over-long line ``LineTooLong.line`` keeps (the whole line may be huge)
_SHOWN: Final = 80


#: UTF-8's byte order mark: skipped once at the start of a body, as UTF-8 decoding does
BOM: Final = b"\xef\xbb\xbf"


def skip_bom(head: bytes, data: bytes) -> tuple[bytes | None, bytes]:
    """At the start of a body: ``(None, the bytes without a leading BOM)`` once that is known,
    or ``(the bytes so far, b"")`` while they could still be the start of a split BOM.

    The decoders keep the first item as their ``_head`` (``None``: past the start).
    """
    data = head + data
    if len(data) < len(BOM) and BOM.startswith(data):
        return data, b""
    return None, data[len(BOM) :] if data.startswith(BOM) else data


def too_long(max_line: int, line_number: int, line: bytes) -> LineTooLong:
    """The ``LineTooLong`` error for line ``line_number`` (only a prefix of ``line`` is kept)."""
    return LineTooLong(
        f"line {line_number} is longer than max_line={max_line} bytes",
        line_number=line_number,
        line=line[:_SHOWN],
    )


def check_lines(lines: list[bytes], max_line: int, first: int) -> None:
    """Raise ``LineTooLong`` for the first line over ``max_line`` (numbered after ``first``)."""
    for index, line in enumerate(lines):
        if len(line) > max_line:
            raise too_long(max_line, first + index + 1, line)


class LineSplitter:
    """Split a byte stream into lines ended by CR, LF or CRLF, as its reads arrive."""

    __slots__ = ("max_line", "line_number", "_tail", "_size", "_skip_lf")

    def __init__(self, *, max_line: int = DEFAULT_MAX_LINE) -> None:
        self.max_line = max_line
        #: lines completed so far (empty ones included)
        self.line_number = 0
        self._tail: list[bytes] = []  # pieces of the unfinished last line
        self._size = 0  # their total length
        self._skip_lf = False  # the last read ended in CR: an LF starting the next one is its CRLF

    def feed(self, data: bytes) -> list[bytes]:
        """The lines completed by ``data``, without their line ends."""
        block = self.feed_block(data)
        return [] if block is None else block.split(b"\n")

    def feed_block(self, data: bytes) -> bytes | None:
        """The lines completed by ``data`` joined by LF (to decode in one go), or None if none."""
        if self._skip_lf and data:
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
        if b"\r" in data:
            if data[-1] == 0x0D:
                # A CR at the end of a read ends its line now; the next read may start with
                # the LF of the same CRLF, which must not end a second (empty) line.
                self._skip_lf = True
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = data.rfind(b"\n")
        tail = self._tail
        if end < 0:
            if data:
                tail.append(data)
                self._size += len(data)
                if self._size > self.max_line:
                    raise too_long(self.max_line, self.line_number + 1, b"".join(tail))
            return None
        if tail:
            tail.append(data[:end])
            block = b"".join(tail)
        else:
            block = data[:end]
        rest = data[end + 1 :]
        first = self.line_number
        self.line_number = first + block.count(b"\n") + 1
        if len(block) > self.max_line:
            check_lines(block.split(b"\n"), self.max_line, first)
        if rest:
            self._tail = [rest]
            self._size = len(rest)
            if len(rest) > self.max_line:
                raise too_long(self.max_line, self.line_number + 1, rest)
        else:
            self._tail = []
            self._size = 0
        return block

    def pending(self) -> bool:
        """Whether an unfinished line is held."""
        return bool(self._tail)

    def flush(self) -> list[bytes]:
        """At the end of the stream: the unterminated last line, if it has any bytes."""
        tail = self._tail
        self._tail = []
        self._size = 0
        self._skip_lf = False
        if not tail:
            return []
        self.line_number += 1
        return [b"".join(tail)]
