"""The command line: print a stream's events as they arrive, one compact JSON value per line.

::

    python -m stream URL [--format ndjson|sse|json-seq] [--last-event-id ID] [--max N]
                         [--header 'Name: value' ...] [--raw] [--timeout SECONDS]
                         [--no-reconnect] [--quiet]

stdout gets one compact JSON value per line (the event's data; pipe it into ``jq``), flushed
after every read, so each event shows as soon as it arrives. When stdout is a terminal, events
are shown readably instead: id, type (coloured) and data. ``--raw`` writes the body's bytes as
they arrive (still decoded underneath, so errors, reconnections and exit codes work). stderr
gets the status, reconnections and errors; when it is a terminal, also a live count and rate.

Exit codes:

===  =====================================================================================
0    the stream ended normally (end marker, end of the body, or ``--max`` reached)
1    any other error
2    bad command line
3    HTTP error status before the stream started (4xx, 5xx)
4    the server's error event inside the stream
5    timeout: connecting, or no data within ``--timeout`` seconds
6    malformed data in the body (a line that is not JSON, a line too long)
7    the answer is not a stream (its media type is not NDJSON, SSE or JSON-seq)
8    the connection failed or was lost and could not be resumed
130  interrupted (Ctrl-C)
141  stdout was closed by the reader (broken pipe, e.g. ``| head``)
===  =====================================================================================
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

import orjson

from . import errors
from .event import Event
from .protocol import EVENTS, VALUES, Hooks
from .wire import ERROR, MESSAGE, RESET

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_HTTP = 3
EXIT_REMOTE = 4
EXIT_TIMEOUT = 5
EXIT_DECODE = 6
EXIT_CONTENT_TYPE = 7
EXIT_CONNECTION = 8
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

#: the most specific class first: DecodeError is checked before StreamError, and so on
_EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (errors.HTTPStatusError, EXIT_HTTP),
    (errors.RemoteError, EXIT_REMOTE),
    (errors.StreamTimeout, EXIT_TIMEOUT),
    (errors.DecodeError, EXIT_DECODE),
    (errors.ContentTypeError, EXIT_CONTENT_TYPE),
    (errors.ConnectionLost, EXIT_CONNECTION),
)

_EPILOG = """\
exit codes:
  0    the stream ended normally (end marker, end of the body, or --max reached)
  1    any other error
  2    bad command line
  3    HTTP error status before the stream started
  4    the server's error event inside the stream
  5    timeout (connecting, or no data within --timeout seconds)
  6    malformed data in the body
  7    the answer is not NDJSON, SSE or JSON-seq
  8    the connection failed or was lost and could not be resumed
  130  interrupted (Ctrl-C)
  141  stdout closed by its reader (broken pipe)
"""

_DUMPS = orjson.dumps


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name.strip(), value.strip()


# The converters raise ArgumentTypeError with a sentence: for a plain ValueError argparse would
# print "invalid _positive value", the converter's own name.


def _http_url(text: str) -> str:
    url = text if "://" in text else "http://" + text
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is what checks it (a ValueError)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid URL: {text!r}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise argparse.ArgumentTypeError(
            f"only http:// and https:// URLs can be streamed, not {parts.scheme}:// ({text!r})"
        )
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"no host in {text!r}")
    return url


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):  # NaN fails both
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds, 0 (no timeout) or more, not {text!r}"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line answered in one line (not the usage block too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``--help`` lists the exit codes)."""
    parser = _Parser(
        # the name it was started by: the ``stream`` script of the client extra, or ``-m``
        prog="stream" if os.path.basename(sys.argv[0]) == "stream" else "python -m stream",
        description="Print a stream's events as they arrive, one compact JSON value per line.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url", metavar="URL", type=_http_url, help="the stream's URL (http:// is assumed)"
    )
    parser.add_argument(
        "--format", choices=("ndjson", "sse", "json-seq"), help="ask for this wire format"
    )
    parser.add_argument("--last-event-id", metavar="ID", help="resume after this event id")
    parser.add_argument("--max", type=_positive, metavar="N", help="stop after N events")
    parser.add_argument(
        "--header",
        "-H",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="send this request header (repeatable)",
    )
    parser.add_argument("--raw", action="store_true", help="write the body's bytes as received")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="give up when no data arrives for this long (default 60; 0: never)",
    )
    parser.add_argument(
        "--no-reconnect", action="store_true", help="do not resume a dropped stream"
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="only errors on stderr, no status lines"
    )
    return parser


class _Console:
    """stderr: status lines, errors, and (on a terminal) a live count and rate."""

    def __init__(self, stream: IO[str], *, quiet: bool, live: bool, color: bool) -> None:
        self._stream = stream
        self._quiet = quiet
        self._live = live
        self._color = color
        self._shown = False
        self._started = time.monotonic()
        self._last_draw = 0.0
        self.count = 0

    def _paint(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self._color else text

    def clear(self) -> None:
        """Erase the live line (before anything else is written to the terminal)."""
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False

    def status(self, text: str) -> None:
        """A status line, unless ``--quiet``."""
        if not self._quiet:
            self.clear()
            self._stream.write(self._paint("2", f"stream: {text}") + "\n")
            self._stream.flush()

    def error(self, text: str) -> None:
        """An error line, always."""
        self.clear()
        self._stream.write(self._paint("31", f"stream: error: {text}") + "\n")
        self._stream.flush()

    def progress(self, added: int) -> None:
        """Count events; on a terminal, redraw the live line at most every quarter second."""
        self.count += added
        if not self._live:
            return
        now = time.monotonic()
        if now - self._last_draw < 0.25:
            return
        self._last_draw = now
        elapsed = max(now - self._started, 1e-9)
        line = f"events: {self.count:,}  ({self.count / elapsed:,.0f}/s)"
        self._stream.write("\r\x1b[K" + self._paint("2", line))
        self._stream.flush()
        self._shown = True


def _readable(events: Iterable[Event], color: bool) -> bytes:
    """Events as a terminal shows them: id (dim), type (coloured unless a message), data."""
    lines = []
    for event in events:
        kind = event.event
        if color:
            code = {MESSAGE: "36", RESET: "33", ERROR: "31"}.get(kind, "35")
            head = f"\x1b[2m{event.id}\x1b[0m " if event.id else ""
            head += f"\x1b[{code}m{kind}\x1b[0m "
        else:
            head = (f"{event.id} " if event.id else "") + f"{kind} "
        lines.append(head + event.data + "\n")
    return "".join(lines).encode("utf-8", "replace")


def _compact(values: Iterable[Any]) -> bytes:
    # Not OPT_APPEND_NEWLINE: orjson 3.13 keeps a ~4 KiB allocation behind each such result.
    return b"".join([_DUMPS(value) + b"\n" for value in values])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        # Here, not at the top: --help and a bad command line need no requests either.
        from .client import Client
    except ModuleNotFoundError as exc:  # the client extra is missing: its pip line, once
        sys.stderr.write(f"stream: error: {exc}\n")
        return EXIT_ERROR
    url: str = args.url
    stdout = sys.stdout.buffer
    pretty = not args.raw and sys.stdout.isatty()
    color = "NO_COLOR" not in os.environ
    console = _Console(
        sys.stderr,
        quiet=args.quiet,
        live=sys.stderr.isatty() and not args.quiet,
        color=color and sys.stderr.isatty(),
    )
    color_out = color and pretty
    timeout = args.timeout or None
    connect_timeout = min(10.0, timeout) if timeout else 10.0

    def on_bytes(chunk: bytes) -> None:
        console.clear()
        stdout.write(chunk)
        stdout.flush()

    def on_response(response: Any) -> None:
        kind = response.headers.get("Content-Type", "no Content-Type")
        console.status(f"HTTP {response.status_code} {response.reason} ({kind})")

    def on_reconnect(attempt: int, delay: float, cause: BaseException | None) -> None:
        why = f"{cause}" if cause is not None else "the stream ended without its end marker"
        after = f" after {stream.last_event_id!r}" if stream.last_event_id else ""
        console.status(f"{why}; resuming{after} in {delay:.2f} s (attempt {attempt})")

    def on_reset(event: Event) -> None:
        console.status(
            f"reset: the server no longer has all events after the id sent ({event.data})"
        )

    headers = dict(args.header)
    hooks = Hooks(
        on_bytes=on_bytes if args.raw else None,
        on_response=on_response,
        on_reconnect=on_reconnect,
    )
    client = Client(
        timeout=(connect_timeout, timeout) if timeout else (connect_timeout, None),
        reconnect=False if args.no_reconnect else None,
    )
    stream = client._stream(
        EVENTS if pretty else VALUES,
        url,
        headers=headers,
        format=args.format,
        last_event_id=args.last_event_id,
        on_reset=None if pretty else on_reset,
        hooks=hooks,
    )
    remaining: int | None = args.max
    try:
        with stream:
            for batch in stream._batches:
                items = list(batch if remaining is None else islice(batch, remaining))
                if not args.raw:
                    data = _readable(items, color_out) if pretty else _compact(items)
                    console.clear()
                    stdout.write(data)
                    stdout.flush()
                console.progress(len(items))
                if remaining is not None:
                    remaining -= len(items)
                    if remaining <= 0:
                        break
        console.clear()
        return EXIT_OK
    except KeyboardInterrupt:
        stream.close()
        console.clear()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        stream.close()
        # Python would complain when it flushes stdout at exit: point it at nothing instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except errors.StreamError as exc:
        console.error(str(exc))
        for kind, code in _EXIT_CODES:
            if isinstance(exc, kind):
                return code
        return EXIT_ERROR
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
