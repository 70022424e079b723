"""Tests for ``stream.ndjson``: every case fed whole, split at every byte, and byte by byte."""

from __future__ import annotations

from typing import Any

import pytest

from stream.errors import DecodeError, LineTooLong
from stream.ndjson import NDJSONDecoder
from tests.test_lines import decode_three_ways, error_three_ways


@pytest.mark.parametrize(
    ("data", "values"),
    [
        pytest.param(b"", [], id="empty-body"),
        pytest.param(b'{"a": 1}\n', [{"a": 1}], id="one-line"),
        pytest.param(
            b'{"a":1}\n[2]\n"s"\n3\ntrue\nnull\n',
            [{"a": 1}, [2], "s", 3, True, None],
            id="any-json-value",
        ),
        pytest.param(b"1\r\n2\r\n", [1, 2], id="crlf"),
        pytest.param(b"1\n\n\n2\n", [1, 2], id="keep-alive-empty-lines"),
        pytest.param(b"1\n \t\r\n2\n", [1, 2], id="whitespace-only-lines"),
        pytest.param(b"\n", [], id="only-a-keep-alive"),
        pytest.param(b"1\n2", [1, 2], id="unterminated-last-line"),
        pytest.param(b"1\n2\r", [1, 2], id="unterminated-last-line-with-cr"),
        pytest.param(b"1\n  \r", [1], id="unterminated-blank-last-line"),
        pytest.param(b'  {"a" : [1, 2] }  \n', [{"a": [1, 2]}], id="insignificant-whitespace"),
        pytest.param(
            '["a\u2028b", "\u2029", "\x85"]\n'.encode(),
            [["a\u2028b", "\u2029", "\x85"]],
            id="unicode-line-separators-kept-in-strings",
        ),
        pytest.param('"é€😀"\n'.encode(), ["é€😀"], id="utf8-split-across-reads"),
        pytest.param(
            b'{"event_id": 0, "data": "some data", "is_last_event": false}\n'
            b'{"event_id": 1, "data": "finally the end", "is_last_event": true}\n',
            [
                {"event_id": 0, "data": "some data", "is_last_event": False},
                {"event_id": 1, "data": "finally the end", "is_last_event": True},
            ],
            id="the-seed-stream",
        ),
    ],
)
def test_decode(data: bytes, values: list[Any]) -> None:
    assert decode_three_ways(NDJSONDecoder, data) == values


@pytest.mark.parametrize(
    ("data", "line_number", "line"),
    [
        pytest.param(b"{\n", 1, b"{", id="first-line"),
        pytest.param(b"1\n\n2\nnope\n3\n", 4, b"nope", id="empty-lines-are-counted"),
        pytest.param(b"1\n2\n{", 3, b"{", id="truncated-last-line-at-flush"),
        pytest.param(b"1\r2\n", 1, b"1\r2", id="lone-cr-does-not-end-a-line"),
        pytest.param(b"1 2\n", 1, b"1 2", id="two-values-on-a-line"),
        pytest.param(b"NaN\n", 1, b"NaN", id="nan-is-not-json"),
        pytest.param(b'"\xff"\n', 1, b'"\xff"', id="invalid-utf8"),
        pytest.param(b"\x0c\n", 1, b"\x0c", id="form-feed-is-not-json-whitespace"),
    ],
)
def test_malformed_line(data: bytes, line_number: int, line: bytes) -> None:
    error = error_three_ways(NDJSONDecoder, data)
    assert error.line_number == line_number
    assert error.line.rstrip(b"\r") == line
    assert isinstance(error.__cause__, ValueError)


@pytest.mark.parametrize(
    ("data", "line_number"),
    [
        pytest.param(b"12345\n", 1, id="complete-line"),
        pytest.param(b"1\n\n12345\n", 3, id="after-an-empty-line"),
        pytest.param(b"1\n12345", 2, id="unterminated-buffer"),
    ],
)
def test_max_line(data: bytes, line_number: int) -> None:
    error = error_three_ways(lambda: NDJSONDecoder(max_line=4), data, LineTooLong)
    assert error.line_number == line_number


def test_line_of_exactly_max_line_is_fine() -> None:
    assert decode_three_ways(lambda: NDJSONDecoder(max_line=4), b"1234\n5678") == [1234, 5678]


def test_each_line_is_delivered_with_the_read_that_ends_it() -> None:
    decoder = NDJSONDecoder()
    assert decoder.feed(b'{"a"') == []
    assert decoder.feed(b": 1}") == []
    assert decoder.feed(b"\n[") == [{"a": 1}]
    assert decoder.feed(b"]\n\n") == [[]]
    assert decoder.line_number == 3
    assert decoder.flush() == []
    assert decoder.line_number == 3


def test_line_number_counts_the_flushed_line() -> None:
    decoder = NDJSONDecoder()
    assert decoder.feed(b"1\n2") == [1]
    assert decoder.flush() == [2]
    assert decoder.line_number == 2


def test_decoder_is_usable_after_a_malformed_line() -> None:
    decoder = NDJSONDecoder()
    with pytest.raises(DecodeError) as info:
        decoder.feed(b"1\nbad\n3\n4")
    assert info.value.line_number == 2
    assert decoder.feed(b"\n5\n") == [4, 5]
    assert decoder.line_number == 5


def test_large_read_of_many_lines() -> None:
    data = b"".join(b'{"event_id": %d, "data": "some data"}\n' % i for i in range(10_000))
    decoder = NDJSONDecoder()
    values = []
    for start in range(0, len(data), 65536):
        values += decoder.feed(data[start : start + 65536])
    values += decoder.flush()
    assert [value["event_id"] for value in values] == list(range(10_000))


@pytest.mark.timeout(20)
def test_long_line_in_small_reads_is_linear() -> None:
    decoder = NDJSONDecoder()
    piece = b"x" * 64
    assert decoder.feed(b'"') == []
    for _ in range(64 * 1024):
        assert decoder.feed(piece) == []
    assert decoder.feed(b'"\n') == [(piece * 64 * 1024).decode()]
