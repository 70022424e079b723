"""Flask glue: turn any iterable of JSON values into a streaming response (the only Flask module).

``stream_response(iterable)`` negotiates the format, keeps the request context alive for the
generator (``stream_with_context``), and hands WSGI a writer object instead of the generator:

- under gunicorn+gevent the generator first runs *inline*, in the greenlet that serves the
  request: each value it yields after a wait is sent at once, in its own write (no hand-off,
  no added delay), and an open stream that mostly waits costs one greenlet. Once it yields
  values back to back (``_BURST`` in a row without waiting) it is handed to a *producer*
  greenlet that fills a bounded buffer (``max_chunk`` bytes; it waits while the buffer is full)
  while the serving greenlet sends whatever is buffered in one write (and hands the generator
  back, between two values, once they come one at a time again). The producer keeps the
  bare orjson documents of a few dozen values and frames them in one join; an event that is
  not followed at once by another still goes out at once (the writer wakes on the first event
  of an empty buffer and only ever takes what is already there). Without gevent (Flask's
  development server, test clients) the producer is a thread;
- while nothing is sent for ``heartbeat`` seconds a keep-alive goes out, even while the
  generator is blocked (inline: a libev timer writes it to the socket, framed as gunicorn
  frames the body), so routers and proxies never see a silent connection; the first bytes
  follow the headers within ``FIRST_BYTES_WAIT``;
- under gunicorn+gevent a libev watcher waits for the peer's FIN, so a client that leaves is
  noticed at once: ``GreenletExit`` is raised where the generator waits, and its ``finally``
  runs. A generator that never waits never switches, so a kill would never land: its producer
  also checks at every batch it seals whether the stream stopped (the client left, a write
  failed or timed out, the worker stops), so it stops within one batch, never producing the
  rest of a long stream into memory;
- an exception in the generator ends the stream with the contract's error event (a
  ``RemoteError`` raised by the generator keeps its code and message; anything else is logged
  and reported as ``internal_error`` without its text, which may hold secrets);
- ``shutdown_streams()`` (called by gunicorn.conf.py's worker hook on SIGTERM/SIGHUP) ends every
  open stream cleanly, with a ``retry:`` hint first for SSE (3 s plus a random share of 7 s per
  stream, see SHUTDOWN_RETRY_MS), so clients resume elsewhere, and not all at once.

Under threads (Flask's development server, test clients) a producer blocked inside the generator
cannot be interrupted: it is closed at its next ``yield``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

try:
    from flask import Response, request, stream_with_context
except ModuleNotFoundError as exc:
    from ._extras import missing

    raise missing("flask", exc) from exc

from . import metrics
from .encoders import Encoder, encoder_for
from .errors import RemoteError
from .event import Envelope
from .formats import NegotiationError, negotiate
from .wire import JSON, error_json

log = logging.getLogger("stream.server")

#: bytes buffered before a producer waits for the writer; also the largest single write
DEFAULT_MAX_CHUNK = 256 * 1024
#: how long the first write waits for the producer before it sends a keep-alive instead
FIRST_BYTES_WAIT = 0.005
#: events a producer batch starts with, the most it holds, and the bytes it aims at
_BATCH_FIRST, _BATCH_MAX, _BATCH_BYTES = 8, 64, 16 * 1024
#: events in a row yielded without waiting after which an inline stream gets a producer
_BURST = 2
#: drains in a row of one event the writer had to wait for, after which the producer hands an
#: inline-capable generator back to the serving greenlet
_SLOW_DRAINS = 3
# how the generator runs (see StreamWriter)
_NOT_STARTED, _INLINE, _PRODUCER, _THREAD = 0, 1, 2, 3
#: what ends a generator without being its failure (and greenlet's GreenletExit)
_NOT_FAILURES = (KeyboardInterrupt, SystemExit, GeneratorExit)
#: "no value" (None is a JSON value)
_NOTHING: Any = object()
#: the reconnection time (``retry:``, in ms) a stopping worker's SSE streams are told: at least
#: SHUTDOWN_RETRY_MS, plus a random share of SHUTDOWN_RETRY_WINDOW_MS drawn per stream.
#: The base outlasts a full restart behind a proxy with a single upstream: gunicorn takes about
#: 2 s to stop and start again, nginx answers 502 meanwhile, and an EventSource that gets a 502
#: fails for good instead of retrying (WHATWG HTML, "fail the connection"). The window spreads
#: a worker's clients over 7 s instead of bringing them all back in the same second (10,000
#: streams come back at about 1,400 a second); 10 s at most keeps readers' gap short and under
#: the 30 s cap clients put on ``retry:``.
SHUTDOWN_RETRY_MS = 3000
SHUTDOWN_RETRY_WINDOW_MS = 7000

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
#: SHUTDOWN_RETRY_MS and SHUTDOWN_RETRY_WINDOW_MS, or what shutdown_streams() was given
_retry_base, _retry_window = SHUTDOWN_RETRY_MS, SHUTDOWN_RETRY_WINDOW_MS
#: whether gunicorn frames bodies as HTTP (see inline_keepalives)
_http_framing = True


class Unfinished(Exception):
    """Raised by a stream's generator to end its stream before the stream's own end.

    The body ends cleanly and clients resume from their last id: SSE first gets a ``retry:``
    hint of ``retry_ms``, which is how a reader tells this end from a finished stream (as on
    shutdown); NDJSON and JSON-seq envelope streams without an end marker are resumed anyway.
    For a stream that reached its lifetime, or a subscriber cut off for falling behind.
    """

    def __init__(self, reason: str = "unfinished", retry_ms: int = 1000) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_ms = retry_ms


def _gevent_active() -> bool:
    """Whether gevent has patched this process (then producers are greenlets that can be killed)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def _is_greenlet_exit(exc: BaseException) -> bool:
    greenlet = sys.modules.get("greenlet")
    return greenlet is not None and isinstance(exc, greenlet.GreenletExit)


def open_streams() -> int:
    """How many streams this process is serving now."""
    return len(_open_streams)


def inline_keepalives(enabled: bool) -> None:
    """Whether inline streams may write keep-alives to gunicorn's socket themselves.

    They frame them as gunicorn frames an HTTP body (chunked from HTTP/1.1 on). Under
    gunicorn's ``--protocol uwsgi`` bodies are not HTTP-framed: gunicorn.conf.py turns this off
    then, and every stream uses a producer greenlet (whose keep-alives gunicorn writes).
    """
    global _http_framing
    _http_framing = enabled


def on_shutdown(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the worker shuts down, before its streams are ended."""
    _shutdown_callbacks.append(callback)


def shutdown_streams(retry_ms: int | None = None, retry_window_ms: int | None = None) -> int:
    """End every open stream cleanly (SSE gets a ``retry:`` hint); returns how many there were.

    Each SSE stream is told to come back after ``retry_ms`` plus a random share of
    ``retry_window_ms`` (defaults: SHUTDOWN_RETRY_MS, SHUTDOWN_RETRY_WINDOW_MS).
    """
    global _shutting_down, _retry_base, _retry_window
    _shutting_down = True
    if retry_ms is not None:
        _retry_base = retry_ms
    if retry_window_ms is not None:
        _retry_window = retry_window_ms
    for callback in _shutdown_callbacks:
        try:
            callback()
        except Exception:
            log.exception("shutdown callback %r failed", callback)
    streams = list(_open_streams)
    for s in streams:
        s.shut_down()
    return len(streams)


def _shutdown_retry() -> int:
    """A stream's ``retry:`` on shutdown: the base plus its own random share of the window."""
    return _retry_base + random.randint(0, max(_retry_window, 0))


def _close_iterator(items: Iterator[Any]) -> None:
    """Close a generator (running its ``finally``); plain iterators have nothing to close."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


class StreamWriter:
    """The WSGI iterable of a stream: runs the generator, encodes, coalesces, keeps alive.

    Three ways to run the generator (gevent streams move between the first two as they go):

    - *inline* (gunicorn + gevent): in the server's own greenlet, one event per write, while
      the generator waits between events (what most streams do). A libev timer writes the
      keep-alives straight to the socket while the generator is blocked, and a libev watcher
      sees the client leave; neither needs a greenlet, so an open stream costs one greenlet;
    - *producer* (gevent): once the generator yields ``_BURST`` events in a row without waiting,
      it moves to a producer greenlet of its own that fills a bounded buffer, and this side
      sends whatever is buffered in one write (the coalescing path of fast streams); after
      ``_SLOW_DRAINS`` writes of one event each that this side waited for, the producer gives
      the generator back (between two values) and ends;
    - *thread* (no gevent: Flask's development server, test clients): a producer thread.
    """

    # A worker holds thousands of these at once: no per-instance __dict__.
    __slots__ = (
        "_items",
        "_encode",
        "_dumps",
        "_frame_docs",
        "_encoder",
        "_heartbeat",
        "_max_chunk",
        "_sock",
        "_write_timeout",
        "_chunked",
        "_name",
        "_on_close",
        "_buf",
        "_pending",
        "_batch",
        "_size",
        "_tail",
        "_owed",
        "_events",
        "_bytes",
        "_lock",
        "_ready",
        "_space",
        "_mode",
        "_done",
        "_stopping",
        "_reason",
        "_closed",
        "_shutdown",
        "_last_write",
        "_opened",
        "_gevent",
        "_loop",
        "_handler",
        "_producer",
        "_watcher",
        "_timer",
        "_in_gen",
        "_switched",
        "_burst",
        "_interrupted",
        "_slow_drains",
        "_handback",
        "_drained",
        "_old_timeout",
        "__weakref__",
    )

    def __init__(
        self,
        items: Iterator[Any],
        encoder: Encoder,
        *,
        heartbeat: float,
        envelopes: bool = False,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        sock: socket.socket | None = None,
        write_timeout: float | None = None,
        chunked: bool | None = None,
        name: str = "stream",
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        """``chunked`` says how the server frames the body (gunicorn: chunked for HTTP/1.1,
        raw for HTTP/1.0); ``None`` when unknown, which rules out the inline mode (its
        keep-alives are written to ``sock`` directly, so they must be framed as the server
        frames its own writes)."""
        self._items = items
        self._encoder = encoder
        if envelopes:
            self._encode: Callable[[Any], bytes] = encoder.encode_envelope
            self._dumps: Callable[[Any], bytes] = encoder.encode_envelope
            self._frame_docs: Callable[[list[bytes]], bytes] = b"".join
        else:
            self._encode = encoder.encode_value
            self._dumps = orjson.dumps
            self._frame_docs = encoder.frame_values
        self._heartbeat = heartbeat
        self._max_chunk = max_chunk
        self._sock = sock
        self._write_timeout = write_timeout
        self._chunked = chunked
        self._name = name
        self._on_close = on_close
        self._buf: list[bytes] = []  # framed chunks, ready to send
        self._pending: list[bytes] = []  # the gevent producer's batch of bare documents
        self._batch = _BATCH_FIRST
        self._size = 0
        self._tail = b""  # sent after everything else when the stream ends (error, retry hint)
        self._owed = b""  # the rest of a keep-alive frame the socket took only part of
        self._events = 0
        self._bytes = 0
        self._gevent = _gevent_active()
        # Under gevent everything runs in one thread and only switches inside a wait: no lock,
        # and the "buffer drained" event exists only once a producer first filled the buffer.
        self._lock: contextlib.AbstractContextManager[Any] = (
            _NO_LOCK if self._gevent else threading.Lock()
        )
        self._ready = threading.Event()  # the buffer went from empty to not empty, or we must stop
        self._space: threading.Event | None = None if self._gevent else threading.Event()
        self._mode = _NOT_STARTED
        self._done = False  # the generator has finished (normally, with an error, or killed)
        self._stopping = False  # end the body after what is buffered
        self._reason = "end"
        self._closed = False
        self._shutdown = False
        self._last_write = 0.0
        self._opened = time.monotonic()
        self._loop: Any = None
        self._handler: Any = None
        self._producer: Any = None
        self._watcher: Any = None
        self._timer: Any = None
        self._in_gen = False  # inline: the server's greenlet is inside the generator
        self._switched = False  # inline: the generator waited while producing this event
        self._burst = 0  # inline: events in a row the generator yielded without waiting
        self._interrupted = False  # inline: we threw GreenletExit into the generator
        self._slow_drains = 0  # producer: drains in a row of one event the writer waited for
        self._handback = False  # producer: return the generator to the serving greenlet
        self._drained = 0  # producer: events counted at the last drain
        self._old_timeout: float | None = None
        _open_streams.add(self)
        metrics.OPEN_STREAMS.inc()
        if _shutting_down:
            self.shut_down()

    # -- producers (gevent greenlet, thread) --------------------------------------------------

    def _produce_gevent(self, first: Any = _NOTHING) -> None:
        # Cooperative: nothing else runs between two statements here unless the generator or
        # a wait switches, so the buffer needs no lock (the writer also runs in this thread).
        # Per event: one orjson call and one append. Every ``_batch`` events the bare documents
        # are framed in one join, counted, and the producer waits if the buffer is full.
        pending = self._pending
        append = pending.append
        dumps = self._dumps
        ready = self._ready
        batch = self._batch
        handed_back = False
        try:
            if first is not _NOTHING:
                append(dumps(first))
                ready.set()
            for item in self._items:
                append(dumps(item))
                n = len(pending)
                if n == 1:
                    ready.set()
                    if self._handback:
                        # Slow again: between two values, the generator goes back to the
                        # serving greenlet (inline), and this greenlet ends.
                        handed_back = True
                        self._hand_back()
                        return
                elif n >= batch:
                    self._seal()
                    batch = self._batch
                    if self._size >= self._max_chunk:
                        self._wait_for_space()
                    if self._stopping:
                        # The client left, was cut off, or the worker stops. A kill only lands
                        # where this greenlet switches, and a generator that never waits never
                        # switches: without this check it would run to its end into memory.
                        # Once per batch, so the per-event path pays nothing for it.
                        break
            self._finish(None)
        except BaseException as exc:  # noqa: B036 - GreenletExit is how a departed client stops us
            self._finish(exc)
        finally:
            if not handed_back:
                _close_iterator(self._items)

    def _hand_back(self) -> None:
        self._handback = False
        self._slow_drains = 0
        self._burst = 0
        self._producer = None
        self._mode = _INLINE
        self._arm_heartbeat(self._heartbeat)

    def _seal(self) -> None:
        """Frame the producer's batch of documents into one chunk of the buffer."""
        pending = self._pending
        n = len(pending)
        if not n:
            return
        chunk = self._frame_docs(pending)
        pending.clear()
        self._events += n
        self._buf.append(chunk)
        size = len(chunk)
        self._size += size
        # Next batch: about _BATCH_BYTES at this stream's event size, so big events are framed
        # (and the buffer's bound checked) nearly one by one.
        self._batch = max(2, min(_BATCH_MAX, _BATCH_BYTES * n // size))

    def _wait_for_space(self) -> None:
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
        items = self._items
        try:
            for item in items:
                data = encode(item)
                with lock:
                    buf.append(data)
                    self._size += len(data)
                    full = self._size >= limit
                    first = len(buf) == 1
                self._events += 1
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
            self._finish(None)
        except BaseException as exc:  # noqa: B036 - reported as the stream's error event
            self._finish(exc)
        finally:
            _close_iterator(items)

    def _finish(self, exc: BaseException | None) -> None:
        self._seal()
        if exc is not None:
            self._failed(exc)
        self._done = True
        self._ready.set()

    def _failed(self, exc: BaseException) -> None:
        """The generator (or encoding its value) raised: end with the contract's error event."""
        if self._stopping or isinstance(exc, _NOT_FAILURES) or _is_greenlet_exit(exc):
            return
        if isinstance(exc, Unfinished):
            self._tail += self._encoder.retry_hint(exc.retry_ms)
            self._reason = exc.reason
            return
        if isinstance(exc, RemoteError):
            code, message = exc.code, exc.message
        else:
            log.error("stream %s failed", self._name, exc_info=exc)
            code, message = "internal_error", "the stream failed on the server"
        self._tail += self._encoder.error(code, message)
        self._reason = "error"

    # -- starting -------------------------------------------------------------------------

    def __iter__(self) -> StreamWriter:
        return self

    def _start(self) -> None:
        self._last_write = time.monotonic()
        if self._gevent:
            import gevent

            self._loop = gevent.get_hub().loop
            if self._sock is not None:
                self._watch_peer(self._sock)
            if self._sock is not None and self._chunked is not None:
                self._mode = _INLINE
                self._handler = gevent.getcurrent()
                # The first keep-alive goes out FIRST_BYTES_WAIT after the headers, unless an
                # event does first.
                self._arm_heartbeat(FIRST_BYTES_WAIT)
            else:
                self._start_producer(_NOTHING)
        else:
            self._mode = _THREAD
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

    def _start_producer(self, first: Any) -> None:
        import gevent

        self._mode = _PRODUCER
        if self._stopping:
            self._done = True
            return
        producer = gevent.Greenlet(self._produce_gevent, first)
        if self._handler is not None:
            # The generator ran here first: Flask's contexts (context variables) were pushed in
            # this greenlet's context, so they must be popped in the same one.
            producer.gr_context = self._handler.gr_context
        self._producer = producer
        producer.start()

    def _watch_peer(self, sock: socket.socket) -> None:
        """Wait for the peer's FIN (HTTP/1.1 clients send nothing else while they read).

        A libev read watcher with a callback, not a greenlet: thousands of open streams would
        otherwise each hold one more greenlet (and its saved stack) just to wait.
        """
        watcher = self._loop.io(sock.fileno(), 1)
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

    # -- stopping -------------------------------------------------------------------------

    def _stop(self) -> None:
        """End the body after what is buffered, and stop the generator where it waits."""
        self._stopping = True
        self._wake_producer()
        self._ready.set()
        if self._mode == _PRODUCER:
            if self._producer is not None and not self._producer.dead:
                self._producer.kill(block=False)
        elif self._mode == _INLINE and self._in_gen:
            # From the hub's next turn, where the server's greenlet is certainly switched out.
            self._loop.run_callback(self._interrupt)

    def _interrupt(self) -> None:
        if self._in_gen and not self._interrupted and not self._closed:
            self._interrupted = True
            # Raised where the generator waits, as killing a producer greenlet would: its
            # ``finally`` runs, and __next__ ends the body.
            from greenlet import GreenletExit

            self._handler.throw(GreenletExit())

    def _wake_producer(self) -> None:
        """Wake a producer waiting for buffer space (under gevent only one that ever waited)."""
        space = self._space
        if space is not None:
            space.set()

    def shut_down(self, retry_ms: int | None = None) -> None:
        """Called on worker shutdown: end this stream cleanly, hinting SSE clients to come back
        after ``retry_ms`` (by default a spread delay, see SHUTDOWN_RETRY_MS)."""
        if self._shutdown:
            return
        self._shutdown = True
        if retry_ms is None:
            retry_ms = _shutdown_retry()
        self._tail += self._encoder.retry_hint(retry_ms)
        self._reason = "shutdown"
        self._stop()

    # -- writing (driven by the WSGI server) ----------------------------------------------

    def __next__(self) -> bytes:
        mode = self._mode
        if mode == _INLINE:
            return self._next_inline()
        if mode == _NOT_STARTED:
            self._start()
            if self._mode == _INLINE:
                return b""  # the server sends the headers now; the generator starts next call
            self._ready.wait(FIRST_BYTES_WAIT)
            if not self._buf and not self._pending and not self._done and not self._stopping:
                self._last_write = time.monotonic()
                return self._sent(self._encoder.keepalive)
        return self._next_buffered()

    def _next_buffered(self) -> bytes:
        """Producer modes: send whatever the producer buffered, in one write."""
        ready = self._ready
        waited = False
        while True:
            ready.clear()
            if self._buf or self._pending:
                with self._lock:
                    self._seal()
                    buf = self._buf
                    data = buf[0] if len(buf) == 1 else b"".join(buf)
                    buf.clear()
                    self._size = 0
                self._wake_producer()
                if self._handler is not None:
                    self._check_pace(waited)
                self._last_write = time.monotonic()
                return self._sent(data)
            if self._mode == _INLINE:
                return self._next_inline()  # handed back (its last value already went out)
            if self._done or self._stopping:
                return self._end()
            remaining = self._heartbeat - (time.monotonic() - self._last_write)
            if remaining <= 0:
                self._last_write = time.monotonic()
                return self._sent(self._encoder.keepalive)
            waited = True
            ready.wait(remaining)

    def _check_pace(self, waited: bool) -> None:
        """Ask the producer to hand the generator back once it is slow again (one event per
        drain, and the writer waited for each): an open stream then costs one greenlet again."""
        events = self._events
        if waited and events - self._drained == 1 and self._mode == _PRODUCER:
            self._slow_drains += 1
            if self._slow_drains >= _SLOW_DRAINS:
                self._handback = True
        else:
            self._slow_drains = 0
        self._drained = events

    def _next_inline(self) -> bytes:
        """Inline mode: run the generator to its next value here, and send that value."""
        if self._owed:
            self._pay_owed()
        if self._done or self._stopping:
            return self._end()
        self._switched = False
        self._in_gen = True
        # Runs if this greenlet switches out (the generator waits) before the value arrives.
        mark = self._loop.run_callback(self._mark_switched)
        try:
            item = next(self._items)
        except StopIteration:
            item = _NOTHING
        except BaseException as exc:  # noqa: B036 - see _inline_raised
            if not self._inline_raised(exc):
                raise
            item = _NOTHING
        finally:
            self._in_gen = False
            mark.stop()
        if item is _NOTHING:
            self._done = True
            return self._end()
        if self._stopping:
            return self._end()
        if self._switched:
            self._burst = 0
        else:
            self._burst += 1
            if self._burst >= _BURST:
                # The generator yields faster than it waits: a producer greenlet takes it over
                # (from the value just received), and this side coalesces what it buffers.
                self._stop_heartbeat()
                self._start_producer(item)
                return self._next_buffered()
        try:
            data = self._encode(item)
        except Exception as exc:  # noqa: BLE001 - a value orjson cannot encode
            self._failed(exc)
            self._done = True
            return self._end()
        self._events += 1
        self._last_write = time.monotonic()
        return self._sent(data)

    def _inline_raised(self, exc: BaseException) -> bool:
        """Whether an exception out of the generator ends the stream here (else: re-raise)."""
        if _is_greenlet_exit(exc):
            return self._interrupted  # ours: the client left or the worker stops
        if isinstance(exc, _NOT_FAILURES):
            return False
        self._failed(exc)  # an Exception, or a gevent Timeout the generator let escape
        return True

    def _mark_switched(self) -> None:
        self._switched = True

    def _end(self) -> bytes:
        tail = self._tail
        if tail:
            self._tail = b""
            return self._sent(tail)
        raise StopIteration

    def _sent(self, data: bytes) -> bytes:
        self._bytes += len(data)
        return data

    # -- inline keep-alives ---------------------------------------------------------------

    def _arm_heartbeat(self, delay: float) -> None:
        timer = self._loop.timer(max(delay, 0.001))
        self._timer = timer
        timer.start(self._on_heartbeat)

    def _stop_heartbeat(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.stop()
            timer.close()

    def _on_heartbeat(self) -> None:
        self._stop_heartbeat()
        if self._closed or self._mode != _INLINE:
            return
        if not self._in_gen:
            # The server's greenlet is writing (a slow client): no keep-alive is needed.
            self._arm_heartbeat(self._heartbeat)
            return
        silent = time.monotonic() - self._last_write
        if silent >= self._heartbeat or not self._bytes:
            self._write_keepalive()
            silent = 0.0
        self._arm_heartbeat(self._heartbeat - silent)

    def _write_keepalive(self) -> None:
        """Write a keep-alive (framed as the server frames its writes) without blocking."""
        frame = self._encoder.keepalive
        if self._chunked:
            frame = b"%X\r\n%s\r\n" % (len(frame), frame)
        # What an earlier keep-alive left unwritten goes first, or the framing would break.
        frame = self._owed + frame
        sock = self._sock
        assert sock is not None  # inline mode needs the socket
        try:
            sent = os.write(sock.fileno(), frame)  # gevent keeps the descriptor non-blocking
        except BlockingIOError:
            return  # the socket's buffer is full: the client has bytes to read
        except OSError:
            self._reason = "disconnect"
            self._stop()
            return
        self._bytes += sent
        self._last_write = time.monotonic()
        self._owed = frame[sent:]

    def _pay_owed(self) -> None:
        """Finish a keep-alive frame the socket took only part of, before anything else."""
        sock = self._sock
        assert sock is not None
        owed, self._owed = self._owed, b""
        sock.sendall(owed)
        self._bytes += len(owed)

    # -- the end ----------------------------------------------------------------------------

    def close(self) -> None:
        """Called by the WSGI server when the response ends or the client is gone."""
        if self._closed:
            return
        self._closed = True
        if not self._done and self._reason == "end":
            # The server closes us before the generator finished: the write failed.
            self._reason = "disconnect"
        self._stopping = True
        self._wake_producer()
        if self._gevent:
            self._stop_heartbeat()
            if self._producer is not None:
                self._producer.kill(block=True, timeout=5)
            else:
                # Inline (or never started, or stopped before a producer could take it over):
                # suspended at a yield, so its ``finally`` runs here.
                _close_iterator(self._items)
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher.close()
        elif self._producer is None:
            _close_iterator(self._items)
        started = self._mode != _NOT_STARTED
        if started and self._sock is not None and self._write_timeout is not None:
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
    all_headers = {**STREAM_HEADERS, **(headers or {})}
    environ = request.environ
    if environ.get("REQUEST_METHOD") == "HEAD":
        # Headers only: a HEAD stream would otherwise run its generator for nothing.
        _close_iterator(iter(iterable))
        if on_close is not None:
            on_close("end")
        # An empty iterator, not b"": no Content-Length (a stream never has one).
        return Response(iter(()), status=status, content_type=format, headers=all_headers)
    sock = environ.get("gunicorn.socket")
    chunked = None
    if (
        sock is not None
        and _http_framing
        and not any(k.lower() == "content-length" for k in all_headers)
    ):
        # gunicorn's framing of a body without Content-Length: chunked from HTTP/1.1 on.
        chunked = environ.get("SERVER_PROTOCOL", "HTTP/1.1") not in ("HTTP/1.0", "HTTP/0.9")
    writer = StreamWriter(
        stream_with_context(iter(iterable)),
        encoder,
        envelopes=envelopes,
        heartbeat=heartbeat,
        max_chunk=max_chunk,
        sock=sock,
        write_timeout=write_timeout,
        chunked=chunked,
        name=name or request.path,
        on_close=on_close,
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
    "Envelope",
    "StreamWriter",
    "Unfinished",
    "error_response",
    "inline_keepalives",
    "on_shutdown",
    "open_streams",
    "shutdown_streams",
    "stream_response",
]
