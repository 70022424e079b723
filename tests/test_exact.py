"""Exact decoding in every format: a value is what ``json.loads`` gives for its text, or an error.

CONTRACT.md, section 2: integers of any size exact, a UTF-8 BOM at the start of a body skipped,
values before a malformed line delivered before the ``DecodeError``, whitespace between values
(the NDJSON keep-alive is a single space) nothing at all.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from stream.errors import DecodeError, LineTooLong
from stream.jsonseq import JSONSeqDecoder
from stream.ndjson import NDJSONDecoder, decode_exact, long_digits
from stream.protocol import StreamState
from tests.test_lines import decode_three_ways, error_three_ways

#: texts where orjson alone differs from json.loads (rounds, or refuses what json.loads reads)
TEXTS = [
    pytest.param(b"12345678901234567890123", id="int-beyond-64-bits"),
    pytest.param(b"18446744073709551616", id="2**64"),
    pytest.param(b"-9223372036854775809", id="below-int64"),
    pytest.param(b'{"a": [99999999999999999999, 1]}', id="nested-big-int"),
    pytest.param(b"1" * 400, id="400-digits"),
    pytest.param(b"1e400", id="overflows-a-double"),
    pytest.param(b"-1e400", id="overflows-negative"),
    pytest.param(b'"\\ud800"', id="lone-high-surrogate"),
    pytest.param(b'["\\udc00x"]', id="lone-low-surrogate"),
    pytest.param(b'"12345678901234567890123"', id="digits-in-a-string"),
    pytest.param(b"0.12345678901234567890123", id="long-fraction"),
    pytest.param(b"18446744073709551615", id="2**64-1-orjson-exact"),
]


def same(got: list[Any], texts: list[bytes]) -> None:
    """``got`` holds exactly json.loads's values: same types, same reprs (inf, big ints)."""
    want = [json.loads(text) for text in texts]
    assert [(type(v), repr(v)) for v in got] == [(type(v), repr(v)) for v in want]


@pytest.mark.parametrize("text", TEXTS)
def test_ndjson_is_exact(text: bytes) -> None:
    same(decode_three_ways(NDJSONDecoder, b"1\n" + text + b"\n2\n"), [b"1", text, b"2"])


@pytest.mark.parametrize("text", TEXTS)
def test_json_seq_is_exact(text: bytes) -> None:
    body = b"\x1e1\n\x1e" + text + b"\n\x1e2\n"
    same(decode_three_ways(JSONSeqDecoder, body), [b"1", text, b"2"])


@pytest.mark.parametrize("text", TEXTS)
def test_sse_values_are_exact(text: bytes) -> None:
    state = StreamState("values")
    state.start("text/event-stream")
    got = list(state.feed(b"data: 1\n\ndata: " + text + b"\n\ndata: 2\n\n"))
    same(got, [b"1", text, b"2"])


def test_a_big_int_split_across_reads_is_exact() -> None:
    decoder = NDJSONDecoder()
    assert decoder.feed(b'{"n": 1234567890') == []
    assert decoder.feed(b'1234567890123}\n{"m": 1}\n') == [
        {"n": 12345678901234567890123},
        {"m": 1},
    ]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"NaN", id="nan"),
        pytest.param(b"Infinity", id="infinity"),
        pytest.param(b"-Infinity", id="minus-infinity"),
        pytest.param(b"[1,]", id="trailing-comma"),
        pytest.param(b"'a'", id="single-quotes"),
        pytest.param(b'"\xff"', id="invalid-utf8"),
    ],
)
def test_what_is_not_json_stays_an_error(text: bytes) -> None:
    # json.loads reads NaN and Infinity; they are not JSON (RFC 8259), so never a value.
    with pytest.raises(ValueError):
        decode_exact(text)
    assert error_three_ways(NDJSONDecoder, b"1\n" + text + b"\n").line_number == 2


@pytest.mark.parametrize(
    ("data", "found"),
    [
        pytest.param(b"1234567890123456789", True, id="19-digits"),
        pytest.param(b"x" * 17 + b"1234567890123456789" + b"y", True, id="19-digits-unaligned"),
        pytest.param(b"123456789012345678", False, id="18-digits"),
        pytest.param(b"123456789 123456789 123456789", False, id="short-runs"),
        pytest.param(b"", False, id="empty"),
    ],
)
def test_long_digits(data: bytes, found: bool) -> None:
    for shift in range(10):
        assert long_digits(b"-" * shift + data) is found


# -- the BOM, whitespace keep-alives, values before a bad line ------------------------------------


@pytest.mark.parametrize(
    ("make", "body", "values"),
    [
        pytest.param(NDJSONDecoder, b"\xef\xbb\xbf1\n2\n", [1, 2], id="ndjson-bom"),
        pytest.param(NDJSONDecoder, b"\xef\xbb\xbf", [], id="ndjson-only-a-bom"),
        pytest.param(NDJSONDecoder, b'\xef\xbb\xbf{"a":1}', [{"a": 1}], id="ndjson-bom-one-line"),
        pytest.param(JSONSeqDecoder, b"\xef\xbb\xbf\x1e1\n\x1e2\n", [1, 2], id="json-seq-bom"),
        pytest.param(JSONSeqDecoder, b"\xef\xbb\xbf", [], id="json-seq-only-a-bom"),
        pytest.param(NDJSONDecoder, b' {"a":1}\n  [2]\n', [{"a": 1}, [2]], id="space-keep-alives"),
        pytest.param(NDJSONDecoder, b"1\n ", [1], id="ndjson-trailing-lone-space"),
        pytest.param(NDJSONDecoder, b" ", [], id="ndjson-only-keep-alives"),
        pytest.param(NDJSONDecoder, b"1\n \t \n2\n", [1, 2], id="ndjson-whitespace-line"),
        pytest.param(JSONSeqDecoder, b"\x1e1\n \x1e 2\n ", [1, 2], id="json-seq-spaces"),
    ],
)
def test_bom_and_whitespace(make: Any, body: bytes, values: list[Any]) -> None:
    assert decode_three_ways(make, body) == values


@pytest.mark.parametrize(
    ("make", "line_number"),
    [
        pytest.param(NDJSONDecoder, 2, id="ndjson-second-bom"),
        pytest.param(JSONSeqDecoder, 1, id="json-seq-second-bom"),
    ],
)
def test_only_the_first_bom_is_skipped(make: Any, line_number: int) -> None:
    body = (
        b"\xef\xbb\xbf1\n\xef\xbb\xbf2\n"
        if make is NDJSONDecoder
        else b"\xef\xbb\xbf\x1e\xef\xbb\xbf1\n"
    )
    assert error_three_ways(make, body).line_number == line_number


@pytest.mark.parametrize(
    ("make", "body", "values", "line_number"),
    [
        pytest.param(NDJSONDecoder, b"1\n2\nbad\n4\n", [1, 2], 3, id="ndjson"),
        pytest.param(NDJSONDecoder, b"1\n\n[\n", [1], 3, id="ndjson-after-a-keep-alive"),
        pytest.param(JSONSeqDecoder, b"\x1e1\n\x1e2\n\x1ebad\n\x1e4\n", [1, 2], 3, id="json-seq"),
        pytest.param(
            JSONSeqDecoder, b"\x1e1\n\x1e2\n\x1e3\x1e4\n", [1, 2], 3, id="json-seq-truncated-number"
        ),
    ],
)
def test_values_before_a_bad_line_are_in_the_error(
    make: Any, body: bytes, values: list[Any], line_number: int
) -> None:
    decoder = make()
    with pytest.raises(DecodeError) as info:
        decoder.feed(body)
        decoder.flush()
    assert info.value.values == values
    assert info.value.line_number == line_number


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"1\n2\n123456789\n3\n", id="complete-line-too-long"),
        pytest.param(b"1\n2\n123456789", id="unfinished-line-too-long"),
    ],
)
def test_values_before_a_line_too_long_are_in_the_error(body: bytes) -> None:
    decoder = NDJSONDecoder(max_line=8)
    with pytest.raises(LineTooLong) as info:
        decoder.feed(body)
    assert info.value.values == [1, 2]
    assert info.value.line_number == 3


def test_event_json_is_exact() -> None:
    # Event.json() follows the same rule as stream(): what json.loads gives.
    from stream.event import Event

    assert Event("", "message", '{"n": 12345678901234567890123}').json() == {
        "n": 12345678901234567890123
    }
    assert Event("", "message", "1e400").json() == float("inf")
