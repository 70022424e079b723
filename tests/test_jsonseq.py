"""Tests for ``stream.jsonseq`` (RFC 7464): each case fed whole, split at every byte, bytewise."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from stream.errors import DecodeError, LineTooLong
from stream.jsonseq import JSONSeqDecoder
from tests.test_lines import decode_three_ways, error_three_ways

RS = b"\x1e"


@pytest.mark.parametrize(
    ("data", "values"),
    [
        pytest.param(b"", [], id="empty-body"),
        pytest.param(b'\x1e{"a": 1}\n', [{"a": 1}], id="one-text"),
        pytest.param(
            b'\x1e{"a":1}\n\x1e[2]\n\x1e"s"\n\x1e3\n\x1etrue\n\x1enull\n',
            [{"a": 1}, [2], "s", 3, True, None],
            id="any-json-value",
        ),
        pytest.param(b"\x1e1\r\n\x1e2\r\n", [1, 2], id="crlf"),
        pytest.param(b"\x1e\x1e1\n\x1e\x1e\x1e2\n\x1e", [1, 2], id="keep-alive-lone-rs"),
        pytest.param(b"\x1e", [], id="only-a-keep-alive"),
        pytest.param(b"\x1e\n\x1e \t\r\n\x1e1\n", [1], id="whitespace-only-texts"),
        pytest.param(b'\x1e{"a": 1}\x1e[2]\x1e"s"', [{"a": 1}, [2], "s"], id="no-lf-before-rs"),
        pytest.param(b"\x1e1 \x1e2\t\x1e3\r", [1, 2, 3], id="numbers-followed-by-whitespace"),
        pytest.param(
            b'\x1e{\n  "a": [\n    1,\n    2\n  ],\n  "b": {}\n}\n\x1e[\n]\n',
            [{"a": [1, 2], "b": {}}, []],
            id="pretty-printed",
        ),
        pytest.param(b"\x1e[1,\n2]\n\x1e3\n", [[1, 2], 3], id="multi-line-text"),
        pytest.param(b"1\n\x1e2\n", [1, 2], id="text-before-the-first-rs"),
        pytest.param(b"\n\x1e2\n", [2], id="whitespace-before-the-first-rs"),
        pytest.param(b"\x1e[1]", [[1]], id="unterminated-last-text"),
        pytest.param(b"\x1e1\n\n \n", [1], id="whitespace-after-a-text"),
        pytest.param(
            '\x1e["a\u2028b", "\u2029", "\x85"]\n'.encode(),
            [["a\u2028b", "\u2029", "\x85"]],
            id="unicode-line-separators-kept-in-strings",
        ),
        pytest.param('\x1e"é€😀"\n'.encode(), ["é€😀"], id="utf8-split-across-reads"),
        pytest.param(
            b'\x1e{"event_id": 0, "data": "some data", "is_last_event": false}\n',
            [{"event_id": 0, "data": "some data", "is_last_event": False}],
            id="the-seed-stream",
        ),
    ],
)
def test_decode(data: bytes, values: list[Any]) -> None:
    assert decode_three_ways(JSONSeqDecoder, data) == values


@pytest.mark.parametrize(
    ("data", "line_number"),
    [
        pytest.param(b"\x1e{\x1e1\n", 1, id="first-text"),
        pytest.param(b"\x1e1\n\x1e\x1e\x1enope\n\x1e3\n", 2, id="keep-alives-not-counted"),
        pytest.param(b"\x1e1\n\x1e[1, 2", 2, id="truncated-at-flush"),
        pytest.param(b"\x1e1\n\x1e{\n", 2, id="truncated-after-lf-at-flush"),
        pytest.param(b"\x1e12\x1e3\n", 1, id="number-not-followed-by-whitespace"),
        pytest.param(b"\x1e1\n\x1etrue", 2, id="true-not-followed-by-whitespace-at-flush"),
        pytest.param(b"\x1enull\x1e", 1, id="null-not-followed-by-whitespace"),
        pytest.param(b"\x1e1.5e3\x1e", 1, id="float-not-followed-by-whitespace"),
        pytest.param(b"\x1e1\n2\n\x1e", 1, id="garbage-after-a-complete-text"),
        pytest.param(b"\x1e1 2\x1e", 1, id="two-values-in-a-text"),
        pytest.param(b"\x1eNaN\n\x1e", 1, id="nan-is-not-json"),
        pytest.param(b"\x1e{}\n\x1e\xff\n\x1e", 2, id="invalid-utf8"),
    ],
)
def test_malformed_text(data: bytes, line_number: int) -> None:
    error = error_three_ways(JSONSeqDecoder, data)
    assert error.line_number == line_number


@pytest.mark.parametrize(
    ("data", "line_number"),
    [
        pytest.param(b"\x1e12345\n\x1e", 1, id="complete-text"),
        pytest.param(b"\x1e1\n\x1e\x1e12345\n", 2, id="after-a-keep-alive"),
        pytest.param(b"\x1e1\n\x1e[1,\n2,\n3]\n", 2, id="pretty-printed-text"),
        pytest.param(b"\x1e1\n\x1e12345", 2, id="unterminated-buffer"),
    ],
)
def test_max_line(data: bytes, line_number: int) -> None:
    error = error_three_ways(lambda: JSONSeqDecoder(max_line=4), data, LineTooLong)
    assert error.line_number == line_number


def test_text_of_exactly_max_line_is_fine() -> None:
    data = b'\x1e123\n\x1e[1]\n\x1e"ab"\x1e'
    assert decode_three_ways(lambda: JSONSeqDecoder(max_line=4), data) == [123, [1], "ab"]


def test_text_is_delivered_at_its_lf_without_waiting_for_the_next_rs() -> None:
    decoder = JSONSeqDecoder()
    assert decoder.feed(b'\x1e{"a"') == []
    assert decoder.feed(b": 1}") == []
    assert decoder.feed(b"\n") == [{"a": 1}]
    assert decoder.feed(b"\x1e") == []
    assert decoder.feed(b"[1,\n") == []  # ends in LF but does not parse yet: keep it
    assert decoder.feed(b"2]\n") == [[1, 2]]
    assert decoder.feed(b"\x1e12") == []
    assert decoder.feed(b"\n") == [12]
    assert decoder.feed(b"\x1e") == []
    assert decoder.line_number == 3
    assert decoder.flush() == []


def test_number_is_kept_until_whitespace_shows_it_is_whole() -> None:
    decoder = JSONSeqDecoder()
    assert decoder.feed(b"\x1e12") == []
    assert decoder.feed(b"3") == []
    assert decoder.feed(b"\n\x1e") == [123]


def test_flush_decodes_the_last_text() -> None:
    decoder = JSONSeqDecoder()
    assert decoder.feed(b'\x1e{"a": [1, 2]}') == []  # no LF: the text may go on
    assert decoder.flush() == [{"a": [1, 2]}]
    assert decoder.line_number == 1
    assert decoder.flush() == []


def test_flush_of_a_truncated_text_raises() -> None:
    decoder = JSONSeqDecoder()
    assert decoder.feed(b'\x1e{"a": 1}\n\x1e{"a": [1, ') == [{"a": 1}]
    with pytest.raises(DecodeError, match="truncated") as info:
        decoder.flush()
    assert info.value.line_number == 2
    assert info.value.line == b'{"a": [1, '


@pytest.mark.timeout(20)
def test_long_pretty_printed_text_in_line_sized_reads_is_not_quadratic() -> None:
    # Every read ends in LF, so each is a chance to try parsing; re-parsing the whole text at
    # each one would be quadratic. 4 MiB of indented JSON, one line per read.
    value = [{"id": i, "tags": [[i], {"deep": [i, i]}], "x": i} for i in range(40_000)]
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n"
    decoder = JSONSeqDecoder()
    assert decoder.feed(RS) == []
    got: list[Any] = []
    for line in text.splitlines(keepends=True):  # bytes.splitlines: test data only, ASCII
        got += decoder.feed(line)
    assert got == [value]


@pytest.mark.timeout(20)
def test_long_text_in_small_reads_is_linear() -> None:
    decoder = JSONSeqDecoder()
    piece = b"x" * 64
    assert decoder.feed(b'\x1e"') == []
    for _ in range(64 * 1024):
        assert decoder.feed(piece) == []
    assert decoder.feed(b'"\n') == [(piece * 64 * 1024).decode()]


def test_many_texts_in_large_reads() -> None:
    data = b"".join(b'\x1e{"event_id": %d}\n' % i for i in range(10_000))
    decoder = JSONSeqDecoder()
    values = []
    for start in range(0, len(data), 65536):
        values += decoder.feed(data[start : start + 65536])
    values += decoder.flush()
    assert values == [{"event_id": i} for i in range(10_000)]
    assert decoder.line_number == 10_000
