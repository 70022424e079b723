"""Tests for ``stream.lines``, and the feed-it-three-ways helpers the decoder tests share."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pytest

from stream.errors import DecodeError, LineTooLong
from stream.lines import LineSplitter


class Decoder(Protocol):
    """What the helpers drive: ``feed`` and ``flush``, as every decoder in ``stream`` has."""

    def feed(self, data: bytes) -> Sequence[Any]: ...

    def flush(self) -> Sequence[Any]: ...


def _run(make: Callable[[], Decoder], chunks: Sequence[bytes]) -> tuple[list[Any], Decoder]:
    decoder = make()
    out: list[Any] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    out.extend(decoder.flush())
    return out, decoder


def _splits(data: bytes) -> list[tuple[str, list[bytes]]]:
    """``data`` whole, in two reads split at every position, and one byte per read."""
    ways = [("whole", [data])]
    ways += [(f"split at {i}", [data[:i], data[i:]]) for i in range(len(data) + 1)]
    ways.append(("byte by byte", [data[i : i + 1] for i in range(len(data))]))
    return ways


def decode_three_ways(
    make: Callable[[], Decoder],
    data: bytes,
    state: Callable[[Any], object] = lambda decoder: None,
) -> list[Any]:
    """Decode ``data`` whole, split at every byte, and byte by byte; assert one result, return it.

    ``state`` picks what else must agree at the end (e.g. an SSE decoder's ``last_event_id``).
    """
    expected, decoder = _run(make, [data])
    expected_state = state(decoder)
    for how, chunks in _splits(data):
        got, decoder = _run(make, chunks)
        assert got == expected, how
        assert state(decoder) == expected_state, how
    return expected


def error_three_ways(
    make: Callable[[], Decoder], data: bytes, error: type[DecodeError] = DecodeError
) -> DecodeError:
    """Assert that ``data`` raises ``error`` with the same line number however it is fed."""
    numbers = set()
    caught: DecodeError | None = None
    for how, chunks in _splits(data):
        with pytest.raises(error) as info:
            _run(make, chunks)
        assert type(info.value) is error, how
        numbers.add(info.value.line_number)
        caught = info.value
    assert len(numbers) == 1, numbers
    assert caught is not None
    return caught


# --- LineSplitter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        pytest.param(b"", [], id="empty"),
        pytest.param(b"a\nb\n", [b"a", b"b"], id="lf"),
        pytest.param(b"a\r\nb\r\n", [b"a", b"b"], id="crlf"),
        pytest.param(b"a\rb\r", [b"a", b"b"], id="cr"),
        pytest.param(b"a\r\rb\n", [b"a", b"", b"b"], id="cr-cr-is-two-line-ends"),
        pytest.param(b"a\n\rb\r\n\n", [b"a", b"", b"b", b""], id="lf-cr-is-two-line-ends"),
        pytest.param(b"a\r\n\r\nb", [b"a", b"", b"b"], id="unterminated-last-line"),
        pytest.param(b"\n\n", [b"", b""], id="empty-lines"),
        pytest.param(
            "x\u2028y\u2029z\x85w\x0b\x0c\n".encode(),
            ["x\u2028y\u2029z\x85w\x0b\x0c".encode()],
            id="only-cr-and-lf-end-lines",
        ),
        pytest.param("é€😀\n".encode(), ["é€😀".encode()], id="utf8-intact"),
    ],
)
def test_line_splitter(data: bytes, lines: list[bytes]) -> None:
    assert decode_three_ways(LineSplitter, data) == lines


def test_cr_at_end_of_read_ends_the_line_at_once() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\r") == [b"a"]
    assert splitter.feed(b"\nb\r") == [b"b"]
    assert splitter.feed(b"") == []
    assert splitter.feed(b"\n") == []
    assert splitter.feed(b"\r") == [b""]
    assert splitter.feed(b"c\n") == [b"c"]
    assert splitter.line_number == 4


def test_flush_returns_the_unterminated_line_once() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"a\nbc") == [b"a"]
    assert splitter.flush() == [b"bc"]
    assert splitter.flush() == []
    assert splitter.line_number == 2


def test_feed_block_joins_the_complete_lines() -> None:
    splitter = LineSplitter()
    assert splitter.feed_block(b"ab") is None
    assert splitter.feed_block(b"c\r\nd\re") == b"abc\nd"
    assert splitter.feed_block(b"\n") == b"e"


@pytest.mark.parametrize(
    ("data", "line_number"),
    [
        pytest.param(b"12345\n", 1, id="complete-line"),
        pytest.param(b"1234\n12345\n", 2, id="second-line"),
        pytest.param(b"1234\n12345", 2, id="unterminated-line"),
        pytest.param(b"1\r\n123456789", 2, id="after-crlf"),
    ],
)
def test_line_too_long(data: bytes, line_number: int) -> None:
    error = error_three_ways(lambda: LineSplitter(max_line=4), data, LineTooLong)
    assert error.line_number == line_number


def test_line_of_exactly_max_line_is_fine() -> None:
    assert decode_three_ways(lambda: LineSplitter(max_line=4), b"1234\r\n1234") == [
        b"1234",
        b"1234",
    ]


@pytest.mark.timeout(20)
def test_long_line_in_small_reads_is_linear() -> None:
    # 4 MiB in 64-byte reads: re-joining or re-scanning the buffer on every read would copy
    # about 128 GiB; keeping the pieces copies it once.
    splitter = LineSplitter()
    piece = b"x" * 64
    for _ in range(64 * 1024):
        assert splitter.feed(piece) == []
    assert splitter.feed(b"\n") == [piece * 64 * 1024]
