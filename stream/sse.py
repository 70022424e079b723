"""Incremental Server-Sent Events decoder (pure: no I/O; standard library only).

Spec: WHATWG HTML, "9.2.6 Interpreting an event stream",
https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
The comments below quote its steps. Lines are split at byte level (``stream.lines``), every
complete line of a read is decoded as UTF-8 in one go, and the fields are processed per line.

Departures from the spec, on purpose (do not "fix" them):

- ``last_event_id`` given to the constructor seeds both the spec's *last event ID buffer* and
  the event source's *last event ID string*. The spec starts each connection's buffer empty, so
  a browser that reconnects and then gets an event without ``id:`` reports ``lastEventId == ""``
  and would resume the next time from the very start. A client creates one decoder per
  connection, so carrying the id over keeps the resume point.
- ``retry:`` values too long for Python's ``int()`` (over 4300 digits) are ignored.
- Invalid UTF-8 is a ``DecodeError`` (with the events before the bad line in its ``values``),
  where the spec's "UTF-8 decode" replaces it with U+FFFD: NDJSON and JSON-seq refuse it too,
  and a client library must not change data silently.

Attributes that mirror the spec's state:

- ``last_event_id`` is the *last event ID string*: it takes the value of the buffer at each
  blank line ("dispatch the event", step 1), also when no event is dispatched because the data
  buffer is empty. That is the id a browser sends as ``Last-Event-ID`` when it reconnects;
  unlike the buffer, it never names an event whose block has not ended yet.
- ``retry`` is the event stream's *reconnection time* in milliseconds, set by the latest
  valid ``retry:`` field (None when none came).

Not in the spec, for the clients:

- ``hinted`` is true when a block with a valid ``retry:`` and no data ended after the last
  dispatched event: the hint this project's server sends before it ends a stream it did not
  finish (``stream.protocol`` resumes after it).
- ``block`` holds the lines of the latest ``feed`` (joined by LF, as bytes): the clients look
  in it for integers that orjson would round (``stream.ndjson.long_digits``) before decoding
  the events' data as JSON.
"""

from __future__ import annotations

from .errors import DecodeError
from .event import Event
from .lines import DEFAULT_MAX_LINE, LineSplitter, skip_bom

__all__ = ["SSEDecoder"]


class SSEDecoder:
    """Decode a ``text/event-stream`` body from reads of any size into dispatched ``Event``s."""

    __slots__ = (
        "last_event_id",
        "retry",
        "hinted",
        "block",
        "_lines",
        "_head",
        "_data",
        "_type",
        "_id",
        "_block_retry",
    )

    def __init__(self, *, last_event_id: str = "", max_line: int = DEFAULT_MAX_LINE) -> None:
        self.last_event_id = last_event_id
        self.retry: int | None = None
        self.hinted = False
        self.block = b""
        self._lines = LineSplitter(max_line=max_line)
        # The first bytes, held until we know whether they start a BOM; None once we know.
        self._head: bytes | None = b""
        self._data: list[str] = []  # the data buffer, one item per ``data`` line
        self._type = ""  # the event type buffer
        self._id = last_event_id  # the last event ID buffer
        self._block_retry: int | None = None  # a valid ``retry`` in the current block

    def feed(self, data: bytes) -> list[Event]:
        """The events dispatched by the lines that ``data`` completes."""
        if self._head is not None:
            # "The stream must then be decoded using the UTF-8 decode algorithm": one leading
            # BOM is stripped, only at the start of the stream (also when split across reads).
            self._head, data = skip_bom(self._head, data)
            if self._head is not None:
                return []
        block = self._lines.feed_block(data)
        if block is None:
            return []
        self.block = block
        # CR and LF never occur inside a UTF-8 sequence, so decoding after splitting is the
        # same as decoding first. Splitting on "\n" only (never str.splitlines) keeps U+2028,
        # U+2029 and U+0085 inside lines.
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as exc:
            return self._invalid_utf8(block, exc)
        return self._process(text.split("\n"))

    def pending(self) -> bool:
        """Whether part of an event has arrived and it is not dispatched yet."""
        return bool(self._data) or self._lines.pending()

    def _invalid_utf8(self, block: bytes, exc: UnicodeDecodeError) -> list[Event]:
        """Process the lines before the bad one, then raise DecodeError with their events."""
        lines = block.split(b"\n")
        bad = block.count(b"\n", 0, exc.start)
        events = self._process([line.decode("utf-8") for line in lines[:bad]])
        number = self._lines.line_number - len(lines) + bad + 1
        raise DecodeError(
            f"line {number} is not valid UTF-8: {exc}",
            line_number=number,
            line=lines[bad],
            values=events,
        ) from exc

    def flush(self) -> list[Event]:
        """At the end of the body: nothing, since the spec discards an unfinished event."""
        # "If the file ends in the middle of an event, before the final empty line, the
        # incomplete event is not dispatched."
        self._lines.flush()
        self._head = b""  # a next body (the decoder reused) may start with its own BOM
        self._data = []
        self._type = ""
        self._block_retry = None
        return []

    def _process(self, lines: list[str]) -> list[Event]:
        """Run the spec's per-line steps over ``lines``; return the events they dispatch."""
        # The buffers live in locals for the loop (it runs once per line, millions of times)
        # and go back to the instance at the end; nothing in the loop can raise.
        events: list[Event] = []
        data = self._data
        last_id = self._id
        last_string = self.last_event_id
        type_ = self._type
        block_retry = self._block_retry
        hinted = self.hinted
        for line in lines:
            if not line:
                # "If the line is empty (a blank line): Dispatch the event."
                # Step 1: "Set the last event ID string of the event source to the value of
                # the last event ID buffer."
                last_string = last_id
                # Step 2: "If the data buffer is an empty string, set the data buffer and the
                # event type buffer to the empty string and return."
                if data:
                    # Steps 3-8: remove the data buffer's last LF (join does not add it), type
                    # "message" unless the event type buffer is set, lastEventId = the string.
                    events.append(Event(last_id, type_ or "message", "\n".join(data), block_retry))
                    data = []
                    hinted = False
                elif block_retry is not None:
                    hinted = True
                type_ = ""
                block_retry = None
                continue
            # "Collect the characters on the line before the first U+003A COLON character (:),
            # and let field be that string." No colon: the whole line is the field name and
            # the value is the empty string.
            name, colon, value = line.partition(":")
            if colon:
                if not name:
                    continue  # "If the line starts with a U+003A COLON character (:)": a comment
                # "If value starts with a U+0020 SPACE character, remove it from value."
                if value[:1] == " ":
                    value = value[1:]
            if name == "data":
                # "Append the field value to the data buffer, then append a single U+000A LINE
                # FEED (LF) character to the data buffer."
                data.append(value)
            elif name == "id":
                # "If the field value does not contain U+0000 NULL, then set the last event ID
                # buffer to the field value. Otherwise, ignore the field."
                if "\0" not in value:
                    last_id = value
            elif name == "event":
                type_ = value  # "Set the event type buffer to field value."
            elif name == "retry":
                # "If the field value consists of only ASCII digits, then interpret the field
                # value as an integer in base ten, and set the event stream's reconnection
                # time to that integer. Otherwise, ignore the field." (str.isdigit alone
                # would also accept non-ASCII digits such as "٣" or "²".)
                if value.isascii() and value.isdigit():
                    try:
                        retry = int(value)
                    except ValueError:  # beyond Python's int-from-string digit limit
                        continue
                    self.retry = block_retry = retry
            # "Otherwise: The field is ignored."
        self.last_event_id = last_string
        self.hinted = hinted
        self._data = data
        self._id = last_id
        self._type = type_
        self._block_retry = block_retry
        return events
