"""Flask glue: turn any iterable of JSON values into a streaming response (the only Flask module).

``stream_response(iterable)`` negotiates the format, keeps the request context alive for the
generator (``stream_with_context``), and hands WSGI a writer object instead of the generator.
The writer is three pieces:

- ``stream.pacing``: the pacing as a pure state machine (IDLE, INLINE, PRODUCER, THREAD,
  ENDING, CLOSED): how the generator runs, when a keep-alive is due, when a fast stream moves to
  a producer and a slow one comes back, how the stream ends and why. No I/O;
- ``stream.runners``: the I/O around it, a gevent runner (the generator inline in the server's
  greenlet while it waits, a producer greenlet that coalesces while it yields back to back,
  libev watchers for keep-alives and the peer's leaving) and a thread runner, plus the
  ``registry`` of a process's open streams that the worker's stop ends;
- here: ``detect_transport``, the one place that decides from the WSGI environ what the server
  under a request allows. Writing around the server (inline keep-alives to the descriptor) is
  allowed only on plain TCP under gunicorn's HTTP/1.x framing; under TLS, ``--protocol uwsgi``
  and HTTP/2 every byte goes through the server's own write path.

What a stream does on every transport: while nothing is sent for ``heartbeat`` seconds a
keep-alive goes out, even while the generator is blocked, and the first bytes follow the headers
within ``FIRST_BYTES_WAIT``; a client that leaves is noticed (at once through the TCP hang-up
where the connection is the stream's, else at the next write) and the generator's ``finally``
runs; an exception in the generator ends the stream with the contract's error event (a
``RemoteError`` keeps its code and message; anything else is logged and reported as
``internal_error`` without its text, which may hold secrets); ``shutdown_streams()`` (called by
stream.gunicorn's worker hook on SIGTERM/SIGHUP) ends every open stream cleanly, with a
``retry:`` hint first for SSE (3 s plus a random share of 7 s per stream, see
SHUTDOWN_RETRY_MS), so clients resume elsewhere, and not all at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

try:
    from flask import Response, request, stream_with_context
except ModuleNotFoundError as exc:
    from ._extras import missing

    raise missing("flask", exc) from exc

from .encoders import encoder_for
from .event import Envelope
from .formats import NegotiationError, negotiate
from .pacing import FIRST_BYTES_WAIT, Transport
from .runners import (
    DEFAULT_MAX_CHUNK,
    SHUTDOWN_RETRY_MS,
    SHUTDOWN_RETRY_WINDOW_MS,
    DirectSource,
    StreamWriter,
    Unfinished,
    close_iterator,
    registry,
)
from .wire import JSON, error_json

STREAM_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    # nginx (and Heroku-style routers built on it) would otherwise buffer the body.
    "X-Accel-Buffering": "no",
}


def open_streams() -> int:
    """How many streams this process is serving now."""
    return len(registry.open)


def inline_keepalives(enabled: bool) -> None:
    """Say whether the server is gunicorn framing bodies as HTTP/1.x itself (its default
    ``--protocol http``), so inline streams may frame keep-alives as it does. stream.gunicorn's
    ``post_worker_init`` calls this from gunicorn's own setting; until then (another server,
    ``--protocol uwsgi``, no hooks) every stream's bytes go through the server's writes."""
    registry.http_framing = enabled


def on_shutdown(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the worker shuts down, before its streams are ended."""
    registry.callbacks.append(callback)


def shutdown_streams(retry_ms: int | None = None, retry_window_ms: int | None = None) -> int:
    """End every open stream cleanly (SSE gets a ``retry:`` hint); returns how many there were.

    Each SSE stream is told to come back after ``retry_ms`` plus a random share of
    ``retry_window_ms`` (defaults: SHUTDOWN_RETRY_MS, SHUTDOWN_RETRY_WINDOW_MS).
    """
    return registry.shutdown(retry_ms, retry_window_ms)


def detect_transport(environ: Mapping[str, Any], headers: Mapping[str, str]) -> Transport:
    """What the server under this request allows the writer (the one place that looks).

    Writing around the server needs gunicorn's socket, plain TCP (not TLS: bytes written to the
    descriptor would bypass the session), one request per connection (not HTTP/2) and the
    body's framing known: gunicorn's HTTP protocol (not ``--protocol uwsgi``) chunks a body
    without Content-Length from HTTP/1.1 on and ends it with the connection before.
    """
    sock = environ.get("gunicorn.socket")
    protocol = str(environ.get("SERVER_PROTOCOL", "HTTP/1.1"))
    # Not HTTP_VERSION: that is a request header ("Version:") any client may send.
    multiplexed = protocol.startswith("HTTP/2") or "gunicorn.http2.send_trailers" in environ
    # ssl.SSLSocket and gevent's SSLSocket both have do_handshake; a plain socket has not.
    tls = sock is not None and hasattr(sock, "do_handshake")
    framing = None
    if (
        sock is not None
        and registry.http_framing
        and not multiplexed
        and not any(k.lower() == "content-length" for k in headers)
    ):
        framing = "close" if protocol in ("HTTP/1.0", "HTTP/0.9") else "chunked"
    return Transport(framing=framing, tls=tls, multiplexed=multiplexed, has_socket=sock is not None)


def error_response(status: int, code: str, message: str, **headers: str) -> Response:
    """The contract's JSON error: ``{"error": {"code": ..., "message": ...}}``."""
    return Response(error_json(code, message), status=status, mimetype=JSON, headers=headers)


def stream_response(
    iterable: Iterable[Any],
    *,
    format: str | None = None,
    heartbeat: float | None = None,
    envelopes: bool = False,
    max_chunk: int = DEFAULT_MAX_CHUNK,
    write_timeout: float | None = None,
    name: str | None = None,
    status: int = 200,
    headers: dict[str, str] | None = None,
    on_close: Callable[[str], None] | None = None,
    direct: DirectSource | None = None,
) -> Response:
    """Stream ``iterable``'s JSON values in the format the request negotiates.

    ``format`` is a media type that overrides negotiation; ``heartbeat`` defaults to the app's
    ``STREAM_HEARTBEAT``; with ``envelopes=True`` every item must be an ``Envelope`` (id, event
    type, JSON bytes), as brokers return them. A request that accepts none of the formats gets
    a 406 JSON error instead of a stream.

    ``direct`` (with ``envelopes``): the broker subscription ``iterable`` follows, when it yields
    each live entry unchanged and does nothing else with it (a channel's follower; not a job's,
    which stops at its end). Where the writer writes around the server (plain HTTP/1.x under
    gunicorn's gevent worker), the fan-out then writes a publish to this stream's socket while
    the generator waits, instead of waking it: see ``DirectSource``.
    """
    from flask import current_app

    config = current_app.config
    if format is None:
        try:
            format = negotiate(request.headers.get("Accept"), request.args.get("format"))
        except NegotiationError as exc:
            status_code = 400 if request.args.get("format") is not None else 406
            # No stream will run it: what the caller opened for it (a subscription) ends now.
            close_iterator(iter(iterable))
            if on_close is not None:
                on_close("refused")
            return error_response(status_code, "not_acceptable", str(exc))
    encoder = encoder_for(format)
    if heartbeat is None:
        heartbeat = float(config.get("STREAM_HEARTBEAT", 15.0))
    if write_timeout is None:
        write_timeout = config.get("STREAM_WRITE_TIMEOUT", 30.0)
    all_headers = {**STREAM_HEADERS, **(headers or {})}
    environ = request.environ
    if environ.get("REQUEST_METHOD") == "HEAD":
        # Headers only: a HEAD stream would otherwise run its generator for nothing.
        close_iterator(iter(iterable))
        if on_close is not None:
            on_close("end")
        # An empty iterator, not b"": no Content-Length (a stream never has one).
        return Response(iter(()), status=status, content_type=format, headers=all_headers)
    sock = environ.get("gunicorn.socket")
    writer = StreamWriter(
        stream_with_context(iter(iterable)),
        encoder,
        envelopes=envelopes,
        heartbeat=heartbeat,
        max_chunk=max_chunk,
        sock=sock,
        write_timeout=write_timeout,
        transport=detect_transport(environ, all_headers),
        name=name or request.path,
        on_close=on_close,
        direct=direct,
    )
    response = Response(
        writer,
        status=status,
        # content_type, not mimetype: Werkzeug would add "; charset=utf-8" to text/event-stream.
        content_type=format,
        headers=all_headers,
        direct_passthrough=True,
    )
    return response


__all__ = [
    "DEFAULT_MAX_CHUNK",
    "DirectSource",
    "FIRST_BYTES_WAIT",
    "SHUTDOWN_RETRY_MS",
    "SHUTDOWN_RETRY_WINDOW_MS",
    "Envelope",
    "StreamWriter",
    "Unfinished",
    "detect_transport",
    "error_response",
    "inline_keepalives",
    "on_shutdown",
    "open_streams",
    "shutdown_streams",
    "stream_response",
]
