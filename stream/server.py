"""Flask glue: turn any iterable of JSON values into a streaming response (the only Flask module).

``stream_response(iterable)`` negotiates the format, keeps the request context alive for the
generator (``stream_with_context``), and hands WSGI a writer object instead of the generator:

- the generator runs in a producer of its own (a greenlet under gevent, a thread otherwise) and
  appends encoded events to a buffer; the writer (the WSGI iterable gunicorn drives) sends
  whatever is buffered in one write. A fast producer gets large writes, a slow one gets each
  event sent the moment it is produced: the writer is woken by the first event of an empty
  buffer, and coalescing only ever takes what is already there (no timer, no added delay);
- the buffer is bounded (``max_chunk`` bytes): a producer that runs ahead of a slow socket waits;
- while the buffer stays empty for ``heartbeat`` seconds the writer sends a keep-alive, even
  while the generator is blocked, so routers and proxies never see a silent connection, and a
  vanished client is noticed at the latest by that write;
- under gunicorn+gevent a watcher also waits for the peer's FIN on the socket, so a client that
  leaves is noticed at once; the producer is then killed, which raises ``GreenletExit`` where the
  generator is blocked and runs its ``finally``;
- an exception in the generator ends the stream with the contract's error event (a
  ``RemoteError`` raised by the generator keeps its code and message; anything else is logged
  and reported as ``internal_error`` without its text, which may hold secrets);
- ``shutdown_streams()`` (called by gunicorn.conf.py's worker hook on SIGTERM/SIGHUP) ends every
  open stream cleanly, with a ``retry:`` hint first for SSE, so clients resume elsewhere.

Under threads (Flask's development server, test clients) a producer blocked inside the generator
cannot be interrupted: it is closed at its next ``yield``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import Response, request, stream_with_context

from . import metrics
from .encoders import Encoder, encoder_for
from .errors import RemoteError
from .event import Envelope
from .formats import NegotiationError, negotiate

log = logging.getLogger("stream.server")

#: bytes buffered before a producer waits for the writer; also the largest single write
DEFAULT_MAX_CHUNK = 256 * 1024
#: how long the first write waits for the producer before it sends a keep-alive instead
FIRST_BYTES_WAIT = 0.005
#: events buffered before the gevent producer first sums the bytes it holds
_FIRST_CHECK = 4
#: reconnection time suggested to SSE clients when the server shuts down, in ms
SHUTDOWN_RETRY_MS = 1000

STREAM_HEADERS = {
    "Cache-Control": "no-cache, no-transform",
    # nginx (and Heroku-style routers built on it) would otherwise buffer the body.
    "X-Accel-Buffering": "no",
}

#: the buffer's "lock" under gevent: the producer and the writer are greenlets of one thread and
#: only switch inside a wait, so a real lock per stream would be memory spent on nothing
_NO_LOCK: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()

_open_streams: set[StreamWriter] = set()
_shutdown_callbacks: list[Callable[[], None]] = []
_shutting_down = False


def _gevent_active() -> bool:
    """Whether gevent has patched this process (then producers are greenlets that can be killed)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def open_streams() -> int:
    """How many streams this process is serving now."""
    return len(_open_streams)


def on_shutdown(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the worker shuts down, before its streams are ended."""
    _shutdown_callbacks.append(callback)


def shutdown_streams() -> int:
    """End every open stream cleanly (SSE gets a ``retry:`` hint); returns how many there were."""
    global _shutting_down
    _shutting_down = True
    for callback in _shutdown_callbacks:
        try:
            callback()
        except Exception:
            log.exception("shutdown callback %r failed", callback)
    streams = list(_open_streams)
    for s in streams:
        s.shut_down()
    return len(streams)


def _close_iterator(items: Iterator[Any]) -> None:
    """Close a generator (running its ``finally``); plain iterators have nothing to close."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


class StreamWriter:
    """The WSGI iterable of a stream: a producer fills a bounded buffer, ``__next__`` drains it."""

    # A worker holds thousands of these at once: no per-instance __dict__.
    __slots__ = (
        "_items",
        "_encode",
        "_encoder",
        "_heartbeat",
        "_max_chunk",
        "_sock",
        "_write_timeout",
        "_name",
        "_on_close",
        "_buf",
        "_size",
        "_check_at",
        "_events",
        "_bytes",
        "_lock",
        "_ready",
        "_space",
        "_done",
        "_stopping",
        "_reason",
        "_started",
        "_closed",
        "_shutdown",
        "_last_write",
        "_opened",
        "_gevent",
        "_producer",
        "_watcher",
        "_old_timeout",
        "__weakref__",
    )

    def __init__(
        self,
        items: Iterator[Any],
        encode: Callable[[Any], bytes],
        encoder: Encoder,
        *,
        heartbeat: float,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        sock: socket.socket | None = None,
        write_timeout: float | None = None,
        name: str = "stream",
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self._items = items
        self._encode = encode
        self._encoder = encoder
        self._heartbeat = heartbeat
        self._max_chunk = max_chunk
        self._sock = sock
        self._write_timeout = write_timeout
        self._name = name
        self._on_close = on_close
        self._buf: list[bytes] = []
        self._size = 0
        self._check_at = _FIRST_CHECK
        self._events = 0
        self._bytes = 0
        self._gevent = _gevent_active()
        # Under gevent the two sides are greenlets of one thread (see _produce_gevent): no lock,
        # and the producer creates its "buffer drained" event only the first time it fills the
        # buffer (a slow stream never does). Threads need both from the start.
        self._lock: contextlib.AbstractContextManager[Any] = (
            _NO_LOCK if self._gevent else threading.Lock()
        )
        self._ready = threading.Event()  # the buffer went from empty to not empty, or we must stop
        self._space: threading.Event | None = None if self._gevent else threading.Event()
        self._done = False  # the producer has finished (normally, with an error, or killed)
        self._stopping = False  # the writer must end the body after what is buffered
        self._reason = "end"
        self._started = False
        self._closed = False
        self._shutdown = False
        self._last_write = 0.0
        self._opened = time.monotonic()
        self._producer: Any = None
        self._watcher: Any = None
        self._old_timeout: float | None = None
        _open_streams.add(self)
        metrics.OPEN_STREAMS.inc()
        if _shutting_down:
            self.shut_down()

    # -- the producer side ------------------------------------------------------------------

    def _produce_gevent(self) -> None:
        # Cooperative: nothing else runs between two statements here unless the generator or
        # a wait switches, so the buffer needs no lock (the writer also runs in this thread).
        # This loop runs once per event: it only appends and compares a length; the bytes
        # buffered are summed on a slow path at lengths estimated from the events seen so far.
        buf = self._buf
        append = buf.append
        encode = self._encode
        ready = self._ready
        count = 0
        try:
            for item in self._items:
                append(encode(item))
                count += 1
                n = len(buf)
                if n == 1:
                    ready.set()
                elif n >= self._check_at:
                    self._check_space(n)
            self._finish(count, None)
        except BaseException as exc:  # noqa: B036 - GreenletExit is how a departed client stops us
            self._finish(count, exc)
        finally:
            _close_iterator(self._items)

    def _check_space(self, n: int) -> None:
        """The slow path of the gevent producer: wait while the buffer holds ``max_chunk`` bytes."""
        size = sum(map(len, self._buf))
        limit = self._max_chunk
        if size < limit:
            # Check again about when the buffer should reach the limit at this event size.
            self._check_at = n + max(1, (limit - size) * n // max(size, 1))
            return
        space = self._space
        if space is None:
            space = self._space = threading.Event()
        space.clear()
        while self._buf and not self._stopping:
            space.wait()

    def _produce_thread(self) -> None:
        buf = self._buf
        encode = self._encode
        ready = self._ready
        space = self._space
        assert space is not None  # created in __init__ for threads
        lock = self._lock
        limit = self._max_chunk
        count = 0
        items = self._items
        try:
            for item in items:
                data = encode(item)
                with lock:
                    buf.append(data)
                    self._size += len(data)
                    full = self._size >= limit
                    first = len(buf) == 1
                count += 1
                if first:
                    ready.set()
                while full and not self._stopping:
                    space.wait(0.5)
                    with lock:
                        space.clear()
                        full = self._size >= limit
                if self._stopping:
                    # A thread cannot be interrupted inside the generator: it is closed below,
                    # at its yield, so its ``finally`` still runs.
                    break
            self._finish(count, None)
        except BaseException as exc:  # noqa: B036 - reported as the stream's error event
            self._finish(count, exc)
        finally:
            _close_iterator(items)

    def _finish(self, count: int, exc: BaseException | None) -> None:
        self._events += count
        if exc is not None and not self._stopping and isinstance(exc, Exception):
            if isinstance(exc, RemoteError):
                code, message = exc.code, exc.message
            else:
                log.error("stream %s failed", self._name, exc_info=exc)
                code, message = "internal_error", "the stream failed on the server"
            frame = self._encoder.error(code, message)
            with self._lock:
                self._buf.append(frame)
                self._size += len(frame)
            self._reason = "error"
        self._done = True
        self._ready.set()

    # -- the writer side (driven by the WSGI server) ----------------------------------------

    def __iter__(self) -> StreamWriter:
        return self

    def _start(self) -> None:
        self._started = True
        self._last_write = time.monotonic()
        if self._gevent:
            import gevent

            self._producer = gevent.spawn(self._produce_gevent)
            if self._sock is not None:
                self._watch_peer(self._sock)
        else:
            self._producer = threading.Thread(
                target=self._produce_thread, name=f"stream-{self._name}", daemon=True
            )
            self._producer.start()
        if self._sock is not None and self._write_timeout is not None:
            # A client that stops reading would block sendall forever: bound every write.
            try:
                self._old_timeout = self._sock.gettimeout()
                self._sock.settimeout(self._write_timeout)
            except OSError:
                pass

    def _watch_peer(self, sock: socket.socket) -> None:
        """Wait for the peer's FIN (HTTP/1.1 clients send nothing else while they read).

        A libev read watcher with a callback, not a greenlet: thousands of open streams would
        otherwise each hold one more greenlet (and its saved stack) just to wait.
        """
        import gevent

        watcher = gevent.get_hub().loop.io(sock.fileno(), 1)
        self._watcher = watcher
        # A bound method, not a closure: no function and cells held per stream.
        watcher.start(self._peer_readable)

    def _peer_readable(self) -> None:
        watcher, sock = self._watcher, self._sock
        assert watcher is not None and sock is not None  # set before the watcher started
        watcher.stop()
        try:
            # The watcher fired, so this returns at once: b"" is the FIN (or an RST).
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            watcher.start(self._peer_readable)  # a spurious wake-up: keep watching
            return
        except Exception:  # noqa: BLE001 - a reset or a closed socket: the peer is gone
            data = b""
        if not data and not self._closed:
            self._reason = "disconnect"
            self._stop()

    def _stop(self) -> None:
        """End the body after what is buffered, and stop the producer."""
        self._stopping = True
        self._wake_producer()
        self._ready.set()
        if self._gevent and self._producer is not None and not self._producer.dead:
            self._producer.kill(block=False)

    def _wake_producer(self) -> None:
        """Wake a producer waiting for buffer space (under gevent only one that ever waited)."""
        space = self._space
        if space is not None:
            space.set()

    def shut_down(self) -> None:
        """Called on worker shutdown: end this stream cleanly, hinting SSE clients to come back."""
        if self._shutdown:
            return
        self._shutdown = True
        hint = self._encoder.retry_hint(SHUTDOWN_RETRY_MS)
        if hint:
            with self._lock:
                self._buf.append(hint)
                self._size += len(hint)
        self._reason = "shutdown"
        self._stop()

    def __next__(self) -> bytes:
        if not self._started:
            self._start()
            self._ready.wait(FIRST_BYTES_WAIT)
            if not self._buf and not self._done and not self._stopping:
                self._last_write = time.monotonic()
                return self._sent(self._encoder.keepalive)
        ready = self._ready
        while True:
            ready.clear()
            if self._buf:
                with self._lock:
                    buf = self._buf
                    data = buf[0] if len(buf) == 1 else b"".join(buf)
                    buf.clear()
                    self._size = 0
                    self._check_at = _FIRST_CHECK
                self._wake_producer()
                self._last_write = time.monotonic()
                return self._sent(data)
            if self._done or self._stopping:
                raise StopIteration
            remaining = self._heartbeat - (time.monotonic() - self._last_write)
            if remaining <= 0:
                self._last_write = time.monotonic()
                return self._sent(self._encoder.keepalive)
            ready.wait(remaining)

    def _sent(self, data: bytes) -> bytes:
        self._bytes += len(data)
        return data

    def close(self) -> None:
        """Called by the WSGI server when the response ends or the client is gone."""
        if self._closed:
            return
        self._closed = True
        if not self._done and self._reason == "end":
            # The server closes us before the producer finished: the write failed.
            self._reason = "disconnect"
        self._stopping = True
        self._wake_producer()
        if self._gevent:
            if self._producer is not None:
                self._producer.kill(block=True, timeout=5)
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher.close()
        elif self._producer is None:
            _close_iterator(self._items)
        if self._sock is not None and self._write_timeout is not None:
            try:
                self._sock.settimeout(self._old_timeout)
            except OSError:
                pass
        if self._shutdown and self._sock is not None:
            # The body is complete (the server wrote its last chunk before calling close):
            # end the connection too, or a stopping worker would wait out the keep-alive.
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        _open_streams.discard(self)
        metrics.OPEN_STREAMS.dec()
        metrics.EVENTS_SENT.inc(self._events)
        metrics.BYTES_SENT.inc(self._bytes)
        metrics.STREAM_DURATION.observe(time.monotonic() - self._opened)
        if self._reason == "disconnect":
            metrics.DISCONNECTS.inc()
        log.info(
            "stream %s ended: %s after %d events, %d bytes, %.1f s",
            self._name,
            self._reason,
            self._events,
            self._bytes,
            time.monotonic() - self._opened,
        )
        if self._on_close is not None:
            self._on_close(self._reason)


def error_response(status: int, code: str, message: str, **headers: str) -> Response:
    """The contract's JSON error: ``{"error": {"code": ..., "message": ...}}``."""
    import orjson

    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status=status, mimetype="application/json", headers=headers)


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
) -> Response:
    """Stream ``iterable``'s JSON values in the format the request negotiates.

    ``format`` is a media type that overrides negotiation; ``heartbeat`` defaults to the app's
    ``STREAM_HEARTBEAT``; with ``envelopes=True`` every item must be an ``Envelope`` (id, event
    type, JSON bytes), as brokers return them. A request that accepts none of the formats gets
    a 406 JSON error instead of a stream.
    """
    from flask import current_app

    config = current_app.config
    if format is None:
        try:
            format = negotiate(request.headers.get("Accept"), request.args.get("format"))
        except NegotiationError as exc:
            status_code = 400 if request.args.get("format") is not None else 406
            return error_response(status_code, "not_acceptable", str(exc))
    encoder = encoder_for(format)
    if heartbeat is None:
        heartbeat = float(config.get("STREAM_HEARTBEAT", 15.0))
    if write_timeout is None:
        write_timeout = config.get("STREAM_WRITE_TIMEOUT", 30.0)
    encode: Callable[[Any], bytes] = encoder.encode_envelope if envelopes else encoder.encode_value
    items = stream_with_context(iter(iterable))
    writer = StreamWriter(
        items,
        encode,
        encoder,
        heartbeat=heartbeat,
        max_chunk=max_chunk,
        sock=request.environ.get("gunicorn.socket"),
        write_timeout=write_timeout,
        name=name or request.path,
        on_close=on_close,
    )
    response = Response(
        writer,
        status=status,
        # content_type, not mimetype: Werkzeug would add "; charset=utf-8" to text/event-stream.
        content_type=format,
        headers={**STREAM_HEADERS, **(headers or {})},
        direct_passthrough=True,
    )
    return response


__all__ = [
    "Envelope",
    "StreamWriter",
    "error_response",
    "on_shutdown",
    "open_streams",
    "shutdown_streams",
    "stream_response",
]
