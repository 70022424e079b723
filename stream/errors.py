"""The library's errors: one tree, raised by the decoders, the clients and the command line.

::

    StreamError            base of everything this package raises
    ├── HTTPStatusError    a non-2xx answer (.status_code, .body, .response)
    ├── ContentTypeError   a 2xx answer in a media type no decoder reads (.content_type)
    ├── DecodeError        a malformed line or text in the body (.line_number, .line, .values)
    │   └── LineTooLong    a line grew past the decoder's maximum size
    ├── RemoteError        the server's error event after the stream started (.code, .message)
    ├── StreamReset        the events after our Last-Event-ID are gone (.event)
    ├── StreamTimeout      connecting, the response headers, or the next event took too long
    └── ConnectionLost     the connection was cut and cannot be resumed (.attempts)

Transport errors (requests', httpx's, socket errors) are translated in one place per client and
chained with ``raise ... from``, so ``__cause__`` always holds the original.
"""

from __future__ import annotations

from typing import Any


class StreamError(Exception):
    """Base class of every error raised by this package."""


class HTTPStatusError(StreamError):
    """The server answered outside 2xx; ``body`` holds its decoded JSON error, if any."""

    def __init__(self, message: str, *, status_code: int, body: Any, response: Any = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.response = response


class ContentTypeError(StreamError):
    """The server answered 2xx in a media type that is not NDJSON, SSE or JSON-seq."""

    def __init__(self, message: str, *, content_type: str, response: Any = None) -> None:
        super().__init__(message)
        self.content_type = content_type
        self.response = response


class DecodeError(StreamError):
    """A line (NDJSON), an event's data (SSE) or a text (JSON-seq) is not valid JSON or UTF-8.

    Raised by a decoder's ``feed``/``flush``, ``values`` holds what that same call decoded before
    the bad line (the clients deliver them before raising).
    """

    def __init__(
        self, message: str, *, line_number: int, line: bytes = b"", values: list[Any] | None = None
    ) -> None:
        super().__init__(message)
        self.line_number = line_number
        self.line = line
        self.values: list[Any] = values if values is not None else []


class LineTooLong(DecodeError):
    """A line or text grew past the decoder's ``max_line`` bytes without ending."""


class RemoteError(StreamError):
    """The server reported an error inside the stream (``{"error": {"code", "message"}}``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class StreamReset(StreamError):
    """The events after the requested Last-Event-ID are no longer retained by the server."""

    def __init__(self, message: str, *, event: Any = None) -> None:
        super().__init__(message)
        self.event = event


class StreamTimeout(StreamError):
    """Connecting, receiving the response headers, or the next event or keep-alive took longer
    than the timeout (``Client``'s docstring has the exact rule)."""


class ConnectionLost(StreamError):
    """The connection was cut and cannot be resumed (no ids, reconnect off, attempts spent)."""

    def __init__(self, message: str, *, attempts: int = 0) -> None:
        super().__init__(message)
        self.attempts = attempts
