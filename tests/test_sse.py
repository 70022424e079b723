"""Tests for ``stream.sse`` against the WHATWG event stream interpretation.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
Every case is fed whole, split at every byte, and byte by byte (``decode_three_ways``).
"""

from __future__ import annotations

import pytest

from stream.errors import DecodeError, LineTooLong
from stream.event import Event
from stream.sse import SSEDecoder
from tests.test_lines import decode_three_ways, error_three_ways


def _state(decoder: SSEDecoder) -> tuple[str, int | None]:
    return decoder.last_event_id, decoder.retry


def decode(data: bytes, last_event_id: str = "") -> list[Event]:
    """The events of ``data``, checked to be the same however the body is split."""
    return decode_three_ways(lambda: SSEDecoder(last_event_id=last_event_id), data, _state)


def message(data: str, id: str = "", retry: int | None = None) -> Event:
    return Event(id=id, event="message", data=data, retry=retry)


# --- the examples of the WHATWG page ----------------------------------------------------------


def test_spec_example_stock() -> None:
    # "The stream would be interpreted as one message event with data YHOO\n+2\n10" (the
    # "stock" example of 9.2.5 "Parsing an event stream" / "Authoring notes").
    body = b"data: YHOO\ndata: +2\ndata: 10\n\n"
    assert decode(body) == [message("YHOO\n+2\n10")]


def test_spec_example_first_second_third() -> None:
    # "This stream has four blocks. The first block has just a comment, and will fire nothing.
    # [...] 'first event' [...] set the last event ID to '1' [...] 'second event', and also has
    # an 'id' field, this time with no value, which resets the last event ID to the empty
    # string [...] the last block just fires an event with the data ' third event'."
    body = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    assert decode(body) == [
        message("first event", id="1"),
        message("second event", id=""),
        message(" third event", id=""),
    ]


def test_spec_example_last_block_needs_a_blank_line() -> None:
    # "Note that the last still has to end with a blank line, the end of the stream is not
    # enough to trigger the dispatch of the last event."
    body = b"data: first event\nid: 1\n\ndata:  third event\n"
    assert decode(body) == [message("first event", id="1")]


def test_spec_example_empty_data() -> None:
    # "The first block fires events with the data set to the empty string, as would the last
    # block if it was followed by a blank line. The middle block fires an event with the data
    # set to a single newline character. The last block is discarded because it is not
    # followed by a blank line."
    body = b"data\n\ndata\ndata\n\ndata:"
    assert decode(body) == [message(""), message("\n")]


def test_spec_example_test_with_and_without_space() -> None:
    # "The following stream fires two identical events: [...] This is because the space after
    # the colon is ignored if present."
    assert decode(b"data:test\n\ndata: test\n\n") == [message("test"), message("test")]


def test_spec_example_event_types() -> None:
    # The "add" / "remove" example of 9.2.2: ``event:`` sets the type of the dispatched event.
    body = (
        b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n"
    )
    assert decode(body) == [
        Event("", "add", "73857293"),
        Event("", "remove", "2153"),
        Event("", "add", "113411"),
    ]


# --- the rules, one table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "events"),
    [
        pytest.param(b"", [], id="empty-body"),
        pytest.param(b"data: x\n\n", [message("x")], id="lf"),
        pytest.param(b"data: x\r\n\r\n", [message("x")], id="crlf"),
        pytest.param(b"data: x\r\r", [message("x")], id="cr"),
        pytest.param(b"data: x\r\n\rdata: y\n\r\n", [message("x"), message("y")], id="mixed-ends"),
        pytest.param(b"data: a\rdata: b\r\r", [message("a\nb")], id="cr-between-data-lines"),
        pytest.param(b":\n:comment\n\ndata: x\n\n", [message("x")], id="comments-are-keep-alives"),
        pytest.param(b"data: x\n:comment\n\n", [message("x")], id="comment-inside-a-block"),
        pytest.param(b":\n\n", [], id="only-a-keep-alive"),
        pytest.param(b"data:x\n\n", [message("x")], id="no-space"),
        pytest.param(b"data:  x\n\n", [message(" x")], id="only-one-space-removed"),
        pytest.param(b"data:\tx\n\n", [message("\tx")], id="tab-is-not-removed"),
        pytest.param(b"data: a:b: c\n\n", [message("a:b: c")], id="split-at-first-colon"),
        pytest.param(b"data\n\n", [message("")], id="no-colon-data"),
        pytest.param(b"data:\n\n", [message("")], id="empty-data"),
        pytest.param(b"data:\ndata:\n\n", [message("\n")], id="two-empty-data-lines"),
        pytest.param(b"data: a\n\n\n\ndata: b\n\n", [message("a"), message("b")], id="extra-blank"),
        pytest.param(b"event: x\n\ndata: y\n\n", [message("y")], id="type-reset-without-data"),
        pytest.param(b"event:\ndata: y\n\n", [message("y")], id="empty-type-is-message"),
        pytest.param(
            b"event: a\nevent: b\ndata: y\n\n", [Event("", "b", "y")], id="last-type-wins"
        ),
        pytest.param(
            b"event: end\ndata: y\n\ndata: z\n\n",
            [Event("", "end", "y"), message("z")],
            id="type-per-block",
        ),
        pytest.param(b"Data: x\ndata : y\nfoo: z\n\n", [], id="unknown-fields-ignored"),
        pytest.param(b" data: x\n\n", [], id="leading-space-makes-unknown-field"),
        pytest.param(b"data: x\n", [], id="unfinished-event-discarded"),
        pytest.param(b"data: x", [], id="unterminated-line-discarded"),
        pytest.param(b"data: x\n\ndata: y\r", [message("x")], id="unfinished-after-cr"),
        pytest.param(
            b"id: 1\ndata: a\n\ndata: b\n\n",
            [message("a", "1"), message("b", "1")],
            id="id-carries-over",
        ),
        pytest.param(b"data: a\nid: 1\n\n", [message("a", "1")], id="id-after-data-in-block"),
        pytest.param(
            b"id: 1\ndata: a\n\nid\ndata: b\n\n",
            [message("a", "1"), message("b")],
            id="empty-id-resets",
        ),
        pytest.param(
            b"id: 1\ndata: a\n\nid: 2\x00\ndata: b\n\n",
            [message("a", "1"), message("b", "1")],
            id="id-with-null-ignored",
        ),
        pytest.param(b"id: \xe2\x82\xac\ndata: a\n\n", [message("a", "\u20ac")], id="utf8-id"),
        pytest.param(
            b"retry: 1000\ndata: a\n\ndata: b\n\n",
            [message("a", retry=1000), message("b")],
            id="retry-per-block",
        ),
        pytest.param(
            b"retry: 10\nretry: x\ndata: a\n\n",
            [message("a", retry=10)],
            id="retry-non-digits-ignored",
        ),
        pytest.param(b"retry:  10\ndata: a\n\n", [message("a")], id="retry-two-spaces-ignored"),
        pytest.param(b"retry: 10ms\ndata: a\n\n", [message("a")], id="retry-with-unit-ignored"),
        pytest.param(b"retry: -1\ndata: a\n\n", [message("a")], id="retry-negative-ignored"),
        pytest.param(b"retry:\ndata: a\n\n", [message("a")], id="retry-empty-ignored"),
        pytest.param(
            "retry: ١٢\ndata: a\n\n".encode(), [message("a")], id="retry-non-ascii-digits-ignored"
        ),
        pytest.param(b"retry: 007\ndata: a\n\n", [message("a", retry=7)], id="retry-leading-zeros"),
        pytest.param(b"data: a\x00b\n\n", [message("a\x00b")], id="null-in-data-kept"),
        pytest.param("data: é€😀\n\n".encode(), [message("é€😀")], id="utf8-split-across-reads"),
        pytest.param(
            'data: ["a\u2028b", "\u2029", "\x85", "\x0b\x0c\x1c\x1d\x1e"]\n\n'.encode(),
            [message('["a\u2028b", "\u2029", "\x85", "\x0b\x0c\x1c\x1d\x1e"]')],
            id="unicode-line-separators-do-not-end-lines",
        ),
        pytest.param(
            b'id: 0\ndata: {"event_id": 0, "data": "some data", "is_last_event": false}\n\n',
            [message('{"event_id": 0, "data": "some data", "is_last_event": false}', "0")],
            id="the-seed-stream",
        ),
    ],
)
def test_decode(body: bytes, events: list[Event]) -> None:
    assert decode(body) == events


# --- byte order mark --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "events"),
    [
        pytest.param(b"\xef\xbb\xbfdata: x\n\n", [message("x")], id="bom-stripped"),
        pytest.param(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n", [], id="only-one-bom-stripped"),
        pytest.param(b"\xef\xbb\xbf:\n\xef\xbb\xbfdata: x\n\n", [], id="bom-later-not-stripped"),
        pytest.param(b"\xef\xbb\xbf\n\ndata: x\n\n", [message("x")], id="bom-then-blank-lines"),
        pytest.param(b"\xef\xbb\xbf", [], id="only-a-bom"),
        pytest.param(b"\xef", [], id="only-a-bom-prefix"),
    ],
)
def test_bom(body: bytes, events: list[Event]) -> None:
    assert decode(body) == events


@pytest.mark.parametrize(
    ("data", "line_number"),
    [
        pytest.param(b"data: \xff\xfe\n\n", 1, id="invalid-utf8"),
        pytest.param(b"data: \xe2\x82\n\n", 1, id="truncated-utf8"),
        pytest.param(b"\xef\xbbdata: x\n\n", 1, id="half-a-bom-is-invalid-utf8"),
        pytest.param(b"data: a\n\n:\nid: \xc3\n\n", 4, id="after-an-event"),
        pytest.param(b"data: a\r\n\r\n\xed\xa0\x80\r\n", 3, id="surrogate-bytes-after-crlf"),
    ],
)
def test_invalid_utf8_is_a_decode_error(data: bytes, line_number: int) -> None:
    # Departure from the spec's "UTF-8 decode" (U+FFFD): the same rule as NDJSON and JSON-seq.
    assert error_three_ways(SSEDecoder, data).line_number == line_number


def test_events_before_invalid_utf8_are_in_the_error() -> None:
    decoder = SSEDecoder()
    with pytest.raises(DecodeError) as info:
        decoder.feed(b"id: 1\ndata: a\n\ndata: b\n\ndata: \xff\n\ndata: c\n\n")
    assert info.value.values == [message("a", id="1"), message("b", id="1")]
    assert info.value.line_number == 6


def test_second_bom_is_part_of_the_field_name() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == []
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef\xbb\xbf") == []
    assert decoder.feed(b"\xef\xbb\xbfdata: x\n\ndata: y\n\n") == [message("y")]


# --- state that carries over ------------------------------------------------------------------


def test_last_event_id_is_the_string_set_at_each_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 1\ndata: a\n\nid: 2\n") == [message("a", "1")]
    # "id: 2" is in the buffer, but its block has not ended: resuming must not skip it.
    assert decoder.last_event_id == "1"
    assert decoder.feed(b"data: b\n") == []
    assert decoder.last_event_id == "1"
    assert decoder.feed(b"\n") == [message("b", "2")]
    assert decoder.last_event_id == "2"


def test_id_in_a_block_without_data_moves_the_last_event_id() -> None:
    # "Dispatch the event", step 1 runs before the empty-data check of step 2.
    assert decode(b"id: 7\n\ndata: a\n\n") == [message("a", "7")]
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 7\n\n") == []
    assert decoder.last_event_id == "7"


def test_last_event_id_from_the_constructor_carries_over() -> None:
    assert decode(b"data: a\n\nid: 9\ndata: b\n\n", last_event_id="5") == [
        message("a", "5"),
        message("b", "9"),
    ]
    decoder = SSEDecoder(last_event_id="5")
    assert decoder.last_event_id == "5"
    assert decoder.feed(b"id\n\n") == []
    assert decoder.last_event_id == ""


def test_unfinished_block_does_not_move_the_last_event_id() -> None:
    decoder = SSEDecoder(last_event_id="3")
    assert decoder.feed(b"id: 4\ndata: x\n") == []
    assert decoder.flush() == []
    assert decoder.last_event_id == "3"


def test_retry_attribute_keeps_the_latest_valid_value() -> None:
    decoder = SSEDecoder()
    assert decoder.retry is None
    assert decoder.feed(b"retry: 1500\n\n") == []
    assert decoder.retry == 1500
    assert decoder.feed(b"retry: soon\ndata: a\n\n") == [message("a")]
    assert decoder.retry == 1500
    assert decoder.feed(b"retry: 20\n") == []
    assert decoder.retry == 20  # set at once, not at the end of the block


def test_retry_too_long_for_int_is_ignored() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"retry: " + b"9" * 5000 + b"\ndata: a\n\n") == [message("a")]
    assert decoder.retry is None


# --- delivery as soon as the bytes are there --------------------------------------------------


def test_event_is_dispatched_by_the_read_that_ends_it() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [message("a")]
    assert decoder.feed(b"data: b\r\r") == [message("b")]  # a CR at the end ends the line now
    assert decoder.feed(b"\ndata: c\r\n\r") == [message("c")]  # that LF was the CR's CRLF
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: d\r") == []
    assert decoder.feed(b"\r\n") == [message("d")]


def test_cr_split_from_lf_across_reads_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [message("a\nb")]
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: c\n\n") == [message("c")]


def test_utf8_character_split_across_reads() -> None:
    body = "data: €😀\n\n".encode()
    decoder = SSEDecoder()
    events = []
    for i in range(len(body)):
        events += decoder.feed(body[i : i + 1])
    assert events == [message("€😀")]


def test_flush_discards_the_unfinished_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\ndata: a\nretry: 5") == []
    assert decoder.flush() == []
    # A new body (the decoder reused) starts with empty buffers, and may have a BOM.
    assert decoder.feed(b"\xef\xbb\xbfdata: b\n\n") == [message("b")]


# --- max_line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "line_number"),
    [
        pytest.param(b"data: 123456\n\n", 1, id="complete-line"),
        pytest.param(b":\n\ndata: 123456\n\n", 3, id="third-line"),
        pytest.param(b"data: 123456", 1, id="unterminated-line"),
    ],
)
def test_max_line(body: bytes, line_number: int) -> None:
    error = error_three_ways(lambda: SSEDecoder(max_line=10), body, LineTooLong)
    assert error.line_number == line_number


def test_many_events_in_large_reads() -> None:
    body = b"".join(b'id: %d\ndata: {"event_id": %d}\n\n' % (i, i) for i in range(10_000))
    decoder = SSEDecoder()
    events = []
    for start in range(0, len(body), 65536):
        events += decoder.feed(body[start : start + 65536])
    assert [event.id for event in events] == [str(i) for i in range(10_000)]
    assert [event.json() for event in events] == [{"event_id": i} for i in range(10_000)]
