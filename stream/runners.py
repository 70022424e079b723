"""The stream writer's I/O: runners that drive a ``pacing.Pacer`` under gevent and under threads.

A writer is the WSGI iterable of one stream (``StreamWriter(...)`` gives the runner that fits
the process: ``GeventWriter`` when gevent patched it, ``ThreadWriter`` otherwise). The pacer
decides (how the generator runs, when a keep-alive is due, how the stream ends); a runner runs
the generator, encodes, buffers, waits and writes, and tells the pacer what happened.

- ``GeventWriter``, INLINE: the generator runs in the server's greenlet, one value per write.
  While it is blocked a libev timer writes keep-alives to the descriptor itself, framed as the
  server frames the body: only where ``Transport.raw_writes`` allows it (plain TCP, HTTP/1.x,
  gunicorn's HTTP framing). An open stream that mostly waits costs one greenlet.
- ``GeventWriter``, PRODUCER: once the generator yields ``pacing.BURST`` values back to back
  (or from the start, on any other transport: TLS, uwsgi, HTTP/2) it runs in a producer
  greenlet that fills a bounded buffer (``max_chunk`` bytes); the server's greenlet sends what
  is buffered in one write, and keep-alives, through the server's own write path. The producer
  keeps the bare orjson documents of a few dozen values and frames them in one join; a value
  not followed at once by another still goes out at once. Once values come one at a time again
  (``pacing.SLOW_DRAINS``) an inline-capable stream goes back to INLINE.
- ``ThreadWriter``: a producer thread (Flask's development server, test clients). A thread
  blocked inside the generator cannot be interrupted: it is closed at its next ``yield``.

The peer's leaving (gevent, ``Transport.watch_peer``): a libev read watcher on the descriptor
and a non-blocking ``poll`` for the TCP hang-up (POLLRDHUP), which works under TLS too (the
descriptor is the TCP socket's). The generator gets ``GreenletExit`` where it waits and its
``finally`` runs. A generator that never waits never switches, so a kill would never land: its
producer checks at every batch it seals whether the stream stops.

``Registry`` holds a process's open streams and ends them all on the worker's stop.
"""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import orjson

from . import metrics
from .encoders import Encoder
from .errors import RemoteError
from .event import Envelope
from .pacing import FIRST_BYTES_WAIT, Pacer, State, Transport

log = logging.getLogger("stream.server")

#: bytes buffered before a producer waits for the writer; also the largest single write
DEFAULT_MAX_CHUNK = 256 * 1024
#: events a producer batch starts with, the most it holds, and the bytes it aims at
_BATCH_FIRST, _BATCH_MAX, _BATCH_BYTES = 8, 64, 16 * 1024
#: what ends a generator without being its failure (and greenlet's GreenletExit)
_NOT_FAILURES = (KeyboardInterrupt, SystemExit, GeneratorExit)


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


#: "no value" (None is a JSON value)
_NOTHING: Any = object()
#: how often a connection whose peer sent bytes (a pipelined request, a TLS alert ahead of its
#: FIN) is checked for the hang-up, instead of a read watcher that would fire at once again
PEER_RECHECK = 1.0
#: poll flags that say the peer is gone (POLLRDHUP: Linux; elsewhere a write failing says so)
_HANGUP = select.POLLHUP | select.POLLERR | select.POLLNVAL | getattr(select, "POLLRDHUP", 0)
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


class Registry:
    """A process's open streams, and what the worker's stop does to them."""

    def __init__(self) -> None:
        self.open: set[StreamWriter] = set()
        self.callbacks: list[Callable[[], None]] = []
        self.shutting_down = False
        self.retry_base = SHUTDOWN_RETRY_MS
        self.retry_window = SHUTDOWN_RETRY_WINDOW_MS
        #: whether the server is known to frame bodies as HTTP/1.x itself, so that inline
        #: keep-alives may be framed as it frames them: proven per worker by stream.gunicorn's
        #: post_worker_init from gunicorn's ``protocol`` setting ("http"; ``--protocol uwsgi``
        #: bodies are unframed). Off until then: without that proof every byte goes through
        #: the server's own writes.
        self.http_framing = False

    def shutdown(self, retry_ms: int | None = None, retry_window_ms: int | None = None) -> int:
        """Run the callbacks, then end every open stream cleanly; returns how many there were."""
        self.shutting_down = True
        if retry_ms is not None:
            self.retry_base = retry_ms
        if retry_window_ms is not None:
            self.retry_window = retry_window_ms
        try:
            for callback in self.callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("shutdown callback %r failed", callback)
        finally:
            # Even if a callback was interrupted (a gevent Timeout, GreenletExit) or one stream
            # fails to stop: every other stream still ends, or its client waits out the kill.
            streams = list(self.open)
            for s in streams:
                try:
                    s.shut_down()
                except Exception:
                    log.exception("shutting down stream %r failed", s)
        return len(streams)

    def retry_ms(self) -> int:
        """A stream's ``retry:`` on shutdown: the base plus its own random share of the window."""
        return self.retry_base + random.randint(0, max(self.retry_window, 0))


#: this process's streams (one per process: gunicorn's hooks and the app share it)
registry = Registry()


def gevent_active() -> bool:
    """Whether gevent has patched this process (then producers are greenlets that can be killed)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def _is_greenlet_exit(exc: BaseException) -> bool:
    greenlet = sys.modules.get("greenlet")
    return greenlet is not None and isinstance(exc, greenlet.GreenletExit)


def close_iterator(items: Iterator[Any]) -> None:
    """Close a generator (running its ``finally``); plain iterators have nothing to close."""
    close = getattr(items, "close", None)
    if close is not None:
        close()


class DirectSource(Protocol):
    """What a stream's generator follows, when the writer may write its entries itself.

    A broker subscription (``stream.broker.LocalSubscription``) whose generator yields each
    live entry unchanged and does nothing else with it: while the generator waits on the
    subscription, the fan-out hands a batch to the writer's sink, which writes it to the socket
    at once (no wake-up, switch and generator round per subscriber), or declines it (then the
    generator gets it as usual).
    """

    def deliver_to(self, sink: Callable[[list[Envelope]], bool] | None) -> None: ...


class StreamWriter:
    """The WSGI iterable of a stream; ``StreamWriter(...)`` builds the runner for this process.

    ``transport`` says what the server under it allows (see ``pacing.Transport``); without one
    the writer assumes nothing (no writes around the server). ``sock`` is the connection's socket
    (gunicorn's ``environ["gunicorn.socket"]``).
    """

    # A worker holds thousands of these at once: no per-instance __dict__.
    __slots__ = (
        "_items",
        "_encode",
        "_dumps",
        "_frame_docs",
        "_pacer",
        "_transport",
        "_max_chunk",
        "_sock",
        "_write_timeout",
        "_name",
        "_on_close",
        "_buf",
        "_size",
        "_events",
        "_bytes",
        "_ready",
        "_producer",
        "_opened",
        "_old_timeout",
        "_direct",
        "__weakref__",
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> StreamWriter:
        if cls is StreamWriter:
            cls = GeventWriter if gevent_active() else ThreadWriter
        return object.__new__(cls)

    def __init__(
        self,
        items: Iterator[Any],
        encoder: Encoder,
        *,
        heartbeat: float,
        envelopes: bool = False,
        max_chunk: int = DEFAULT_MAX_CHUNK,
        sock: socket.socket | None = None,
        transport: Transport | None = None,
        write_timeout: float | None = None,
        name: str = "stream",
        on_close: Callable[[str], None] | None = None,
        direct: DirectSource | None = None,
    ) -> None:
        self._items = items
        if envelopes:
            self._encode: Callable[[Any], bytes] = encoder.encode_envelope
            self._dumps: Callable[[Any], bytes] = encoder.encode_envelope
            self._frame_docs: Callable[[list[bytes]], bytes] = b"".join
        else:
            self._encode = encoder.encode_value
            self._dumps = orjson.dumps
            self._frame_docs = encoder.frame_values
        self._pacer = Pacer(encoder, heartbeat)
        self._transport = transport or Transport(has_socket=sock is not None)
        self._max_chunk = max_chunk
        self._sock = sock
        self._write_timeout = write_timeout
        self._name = name
        self._on_close = on_close
        self._buf: list[bytes] = []  # framed chunks, ready to send
        self._size = 0
        self._events = 0
        self._bytes = 0
        self._ready = threading.Event()  # the buffer went from empty to not empty, or we must stop
        self._producer: Any = None
        self._opened = time.monotonic()
        self._old_timeout: float | None = None
        self._direct = direct if envelopes else None
        registry.open.add(self)
        metrics.OPEN_STREAMS.inc()
        if registry.shutting_down:
            self.shut_down()

    def __iter__(self) -> StreamWriter:
        return self

    def __next__(self) -> bytes:
        raise NotImplementedError

    # -- stopping (both runners) --------------------------------------------------------------

    def _stop(self) -> None:
        """End the body after what is buffered, and stop the generator where it waits."""
        self._ready.set()

    def _failed(self, exc: BaseException) -> None:
        """The generator (or encoding its value) raised: end with the contract's error event."""
        if self._pacer.stopping or isinstance(exc, _NOT_FAILURES) or _is_greenlet_exit(exc):
            return
        if isinstance(exc, Unfinished):
            self._pacer.unfinished(exc.reason, exc.retry_ms)
            return
        if isinstance(exc, RemoteError):
            code, message = exc.code, exc.message
        else:
            log.error("stream %s failed", self._name, exc_info=exc)
            code, message = "internal_error", "the stream failed on the server"
        self._pacer.fail(code, message)

    def _peer_left(self) -> None:
        if self._pacer.peer_left():
            self._stop()

    def shut_down(self, retry_ms: int | None = None) -> None:
        """Called on worker shutdown: end this stream cleanly, hinting SSE clients to come back
        after ``retry_ms`` (by default a spread delay, see SHUTDOWN_RETRY_MS)."""
        if self._pacer.shut_down(registry.retry_ms() if retry_ms is None else retry_ms):
            self._stop()

    def _end(self) -> bytes:
        tail = self._pacer.tail()
        if tail:
            return self._sent(tail)
        raise StopIteration

    def _sent(self, data: bytes) -> bytes:
        self._bytes += len(data)
        return data

    def _bound_writes(self) -> None:
        """A client that stops reading would block the server's write forever: bound each one
        (not on a multiplexed connection, whose socket other streams share)."""
        sock = self._sock
        if sock is not None and self._write_timeout is not None and self._transport.watch_peer:
            try:
                self._old_timeout = sock.gettimeout()
                sock.settimeout(self._write_timeout)
            except OSError:
                pass

    def _release(self, reason: str) -> None:
        """The end of ``close``: the socket as it was, the registry, metrics, the log line."""
        sock = self._sock
        if sock is not None and self._old_timeout is not None:
            try:
                sock.settimeout(self._old_timeout)
            except OSError:
                pass
        if reason == "shutdown" and sock is not None and self._transport.watch_peer:
            # The body is complete (the server wrote its last chunk before calling close):
            # end the connection too, or a stopping worker would wait out the keep-alive.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        registry.open.discard(self)
        metrics.OPEN_STREAMS.dec()
        metrics.EVENTS_SENT.inc(self._events)
        metrics.BYTES_SENT.inc(self._bytes)
        metrics.STREAM_DURATION.observe(time.monotonic() - self._opened)
        if reason == "disconnect":
            metrics.DISCONNECTS.inc()
        log.info(
            "stream %s ended: %s after %d events, %d bytes, %.1f s",
            self._name,
            reason,
            self._events,
            self._bytes,
            time.monotonic() - self._opened,
        )
        if self._on_close is not None:
            self._on_close(reason)

    def close(self) -> None:
        raise NotImplementedError


class ThreadWriter(StreamWriter):
    """A producer thread fills the buffer; the server's thread sends it, with keep-alives."""

    __slots__ = ("_lock", "_space")

    def __init__(self, items: Iterator[Any], encoder: Encoder, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._space = threading.Event()
        super().__init__(items, encoder, **kwargs)

    def _stop(self) -> None:
        self._space.set()
        self._ready.set()

    def __next__(self) -> bytes:
        pacer = self._pacer
        if pacer.state is State.IDLE:
            if pacer.start(self._transport, gevent=False, now=time.monotonic()) is State.THREAD:
                self._producer = threading.Thread(
                    target=self._produce, name=f"stream-{self._name}", daemon=True
                )
                self._producer.start()
                self._bound_writes()
        ready = self._ready
        while True:
            ready.clear()
            if self._buf:
                with self._lock:
                    buf = self._buf
                    data = buf[0] if len(buf) == 1 else b"".join(buf)
                    buf.clear()
                    self._size = 0
                self._space.set()
                pacer.wrote(time.monotonic())
                return self._sent(data)
            if pacer.stopping:
                return self._end()
            remaining = pacer.keepalive_in(time.monotonic())
            if remaining <= 0:
                return self._sent(pacer.keepalive(time.monotonic()))
            ready.wait(remaining)

    def _produce(self) -> None:
        buf = self._buf
        encode = self._encode
        ready = self._ready
        space = self._space
        lock = self._lock
        limit = self._max_chunk
        items = self._items
        pacer = self._pacer
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
                while full and not pacer.stopping:
                    space.wait(0.5)
                    with lock:
                        space.clear()
                        full = self._size >= limit
                if pacer.stopping:
                    # A thread cannot be interrupted inside the generator: it is closed below,
                    # at its yield, so its ``finally`` still runs.
                    break
            pacer.finish()
        except BaseException as exc:  # noqa: B036 - reported as the stream's error event
            self._failed(exc)
            pacer.finish()
        finally:
            ready.set()
            close_iterator(items)

    def close(self) -> None:
        """Called by the WSGI server when the response ends or the client is gone."""
        if self._pacer.state is State.CLOSED:
            return
        reason = self._pacer.close()
        self._space.set()
        if self._producer is None:
            close_iterator(self._items)
        self._release(reason)


class GeventWriter(StreamWriter):
    """Inline in the server's greenlet while the generator waits; a producer greenlet while it
    yields back to back; libev watchers (no greenlets) for keep-alives and the peer's leaving."""

    __slots__ = (
        "_pending",
        "_batch",
        "_space",
        "_loop",
        "_handler",
        "_watcher",
        "_timer",
        "_in_gen",
        "_switched",
        "_interrupted",
        "_owed",
        "_owed_watcher",
        "_owed_since",
    )

    def __init__(self, items: Iterator[Any], encoder: Encoder, **kwargs: Any) -> None:
        self._pending: list[bytes] = []  # the producer's batch of bare documents
        self._batch = _BATCH_FIRST
        # The "buffer drained" event exists only once a producer first filled the buffer.
        self._space: threading.Event | None = None
        self._loop: Any = None
        self._handler: Any = None  # the server's greenlet, once the generator ran inline
        self._watcher: Any = None
        self._timer: Any = None
        self._in_gen = False  # inline: the server's greenlet is inside the generator
        self._switched = False  # inline: the generator waited while producing this value
        self._interrupted = False  # inline: we threw GreenletExit into the generator
        # the rest of a frame written around the server (a keep-alive, a direct delivery) that
        # the socket took only part of: it goes out before anything else
        # (a view: paying a big rest a socketful at a time must not copy what is left each time)
        self._owed: bytes | memoryview = b""
        self._owed_watcher: Any = None  # the libev write watcher that finishes ``_owed``
        self._owed_since = 0.0
        super().__init__(items, encoder, **kwargs)

    # -- starting -----------------------------------------------------------------------------

    def _start(self) -> State:
        import gevent

        self._loop = gevent.get_hub().loop
        pacer = self._pacer
        state = pacer.start(self._transport, gevent=True, now=time.monotonic())
        if state is State.ENDING:
            return state  # stopped before it started (the worker stops): only the tail goes out
        if self._sock is not None and self._transport.watch_peer:
            self._watch_peer()
        if state is State.INLINE:
            self._handler = gevent.getcurrent()
            if self._direct is not None:
                self._direct.deliver_to(self._deliver)
            # The first keep-alive goes out FIRST_BYTES_WAIT after the headers, unless a value
            # does first.
            self._arm_heartbeat(FIRST_BYTES_WAIT)
        else:
            self._start_producer(_NOTHING)
        self._bound_writes()
        return state

    def _start_producer(self, first: Any) -> None:
        import gevent

        producer = gevent.Greenlet(self._produce, first)
        if self._handler is not None:
            # The generator ran here first: Flask's contexts (context variables) were pushed in
            # this greenlet's context, so they must be popped in the same one.
            producer.gr_context = self._handler.gr_context
        self._producer = producer
        producer.start()

    # -- the producer greenlet ----------------------------------------------------------------

    def _produce(self, first: Any = _NOTHING) -> None:
        # Cooperative: nothing else runs between two statements here unless the generator or
        # a wait switches, so the buffer needs no lock (the writer also runs in this thread).
        # Per value: one orjson call and one append. Every ``_batch`` values the bare documents
        # are framed in one join, counted, and the producer waits if the buffer is full.
        pending = self._pending
        append = pending.append
        dumps = self._dumps
        ready = self._ready
        batch = self._batch
        pacer = self._pacer
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
                    if pacer.handback:
                        # Slow again: between two values, the generator goes back to the
                        # serving greenlet (inline), and this greenlet ends.
                        if pacer.hand_back():
                            handed_back = True
                            self._producer = None
                            self._arm_heartbeat(pacer.heartbeat)
                            return
                        break  # the stream stops meanwhile
                elif n >= batch:
                    self._seal()
                    batch = self._batch
                    if self._size >= self._max_chunk:
                        self._wait_for_space()
                    if pacer.stopping:
                        # The client left, was cut off, or the worker stops. A kill only lands
                        # where this greenlet switches, and a generator that never waits never
                        # switches: without this check it would run to its end into memory.
                        # Once per batch, so the per-value path pays nothing for it.
                        break
            self._seal()
            pacer.finish()
        except BaseException as exc:  # noqa: B036 - GreenletExit is how a departed client stops us
            self._seal()
            self._failed(exc)
            pacer.finish()
        finally:
            if not handed_back:
                ready.set()
                close_iterator(self._items)

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
        # Next batch: about _BATCH_BYTES at this stream's value size, so big values are framed
        # (and the buffer's bound checked) nearly one by one.
        self._batch = max(2, min(_BATCH_MAX, _BATCH_BYTES * n // size))

    def _wait_for_space(self) -> None:
        space = self._space
        if space is None:
            space = self._space = threading.Event()
        space.clear()
        while self._buf and not self._pacer.stopping:
            space.wait()

    def _wake_producer(self) -> None:
        """Wake a producer waiting for buffer space (only one that ever waited has the event)."""
        space = self._space
        if space is not None:
            space.set()

    # -- writing (driven by the WSGI server) --------------------------------------------------

    def __next__(self) -> bytes:
        state = self._pacer.state
        if state is State.INLINE:
            return self._next_inline()
        if state is State.IDLE:
            if self._start() is State.INLINE:
                return b""  # the server sends the headers now; the generator starts next call
        return self._next_buffered()

    def _next_buffered(self) -> bytes:
        """PRODUCER: send whatever the producer buffered, in one write."""
        ready = self._ready
        pacer = self._pacer
        waited = False
        while True:
            ready.clear()
            if self._buf or self._pending:
                self._seal()
                buf = self._buf
                data = buf[0] if len(buf) == 1 else b"".join(buf)
                buf.clear()
                self._size = 0
                self._wake_producer()
                if self._handler is not None:
                    # Only a stream that ran inline may go back to it (a stream started as a
                    # producer - TLS, uwsgi, HTTP/2 - never does): only it counts slow drains.
                    pacer.drained(self._events, waited, True)
                pacer.wrote(time.monotonic())
                return self._sent(data)
            if pacer.state is State.INLINE:
                return self._next_inline()  # handed back (its last value already went out)
            if pacer.stopping:
                return self._end()
            remaining = pacer.keepalive_in(time.monotonic())
            if remaining <= 0:
                return self._sent(pacer.keepalive(time.monotonic()))
            waited = True
            ready.wait(remaining)

    def _next_inline(self) -> bytes:
        """INLINE: run the generator to its next value here, and send that value."""
        pacer = self._pacer
        if pacer.stopping:
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
        if self._owed:
            # A rest left while the generator waited: the only time anything is written around
            # the server (a keep-alive, a direct delivery), so the only place one can be owed.
            self._pay_owed()
        if item is _NOTHING:
            pacer.finish()
            return self._end()
        if pacer.stopping:
            return self._end()
        if pacer.inline_value(self._switched):
            # The generator yields faster than it waits: a producer greenlet takes it over
            # (from the value just received), and this side coalesces what it buffers.
            self._stop_heartbeat()
            self._start_producer(item)
            return self._next_buffered()
        try:
            data = self._encode(item)
        except Exception as exc:  # noqa: BLE001 - a value orjson cannot encode
            self._failed(exc)
            pacer.finish()
            return self._end()
        self._events += 1
        pacer.wrote(time.monotonic())
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

    # -- stopping -----------------------------------------------------------------------------

    def _stop(self) -> None:
        self._wake_producer()
        self._ready.set()
        producer = self._producer
        if producer is not None:
            if not producer.dead:
                producer.kill(block=False)
        elif self._in_gen:
            # From the hub's next turn, where the server's greenlet is certainly switched out.
            self._loop.run_callback(self._interrupt)

    def _interrupt(self) -> None:
        if self._in_gen and not self._interrupted and self._pacer.state is not State.CLOSED:
            self._interrupted = True
            # Raised where the generator waits, as killing a producer greenlet would: its
            # ``finally`` runs, and __next__ ends the body.
            from greenlet import GreenletExit

            self._handler.throw(GreenletExit())

    # -- the peer leaving ---------------------------------------------------------------------

    def _watch_peer(self) -> None:
        """Wait for the peer's FIN (HTTP/1.x clients send nothing else while they read).

        A libev read watcher with a callback, not a greenlet: thousands of open streams would
        otherwise each hold one more greenlet (and its saved stack) just to wait.
        """
        assert self._sock is not None
        watcher = self._loop.io(self._sock.fileno(), 1)
        self._watcher = watcher
        # A bound method, not a closure: no function and cells held per stream.
        watcher.start(self._peer_readable)

    def _peer_readable(self) -> None:
        watcher = self._watcher
        watcher.stop()
        if self._pacer.state is State.CLOSED:
            return
        if _hung_up(self._sock):
            self._peer_left()
            return
        # Bytes, but no hang-up: a pipelined request, or a TLS alert just ahead of its FIN.
        # The read watcher would fire again at once: look again now and then instead.
        watcher.close()
        timer = self._loop.timer(PEER_RECHECK, PEER_RECHECK)
        self._watcher = timer
        timer.start(self._peer_recheck)

    def _peer_recheck(self) -> None:
        if self._pacer.state is not State.CLOSED and _hung_up(self._sock):
            self._watcher.stop()
            self._peer_left()

    # -- inline keep-alives -------------------------------------------------------------------

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
        pacer = self._pacer
        if pacer.state is not State.INLINE:
            return
        if not self._in_gen:
            # The server's greenlet is writing (a slow client): no keep-alive is needed.
            self._arm_heartbeat(pacer.heartbeat)
            return
        now = time.monotonic()
        timeout = self._write_timeout
        if self._owed and timeout is not None and now - self._owed_since > timeout:
            self._abandon_owed()  # the client stopped reading: as a timed-out write would
            return
        if pacer.keepalive_in(now) <= 0:
            self._write_keepalive(pacer.keepalive(now))
        self._arm_heartbeat(pacer.keepalive_in(time.monotonic()))

    def _write_keepalive(self, keepalive: bytes) -> None:
        """Write a keep-alive (framed as the server frames its writes) without blocking.

        Only in INLINE, which ``Pacer.start`` allows only where ``Transport.raw_writes``."""
        if self._owed:
            return  # the socket is full: the rest of an earlier frame goes out first, then values
        try:
            self._write_around(keepalive)
        except BlockingIOError:
            return  # the socket's buffer is full: the client has bytes to read
        except OSError:
            if self._pacer.write_failed():
                self._stop()

    def _write_around(self, data: bytes) -> None:
        """Write ``data`` to the descriptor around the server, framed as the server frames its
        writes, without blocking (gevent keeps the descriptor non-blocking). A socket that
        takes part owes the rest (``_owe``); ``BlockingIOError``: it took nothing."""
        if self._transport.framing == "chunked":
            data = b"%X\r\n%s\r\n" % (len(data), data)
        sock = self._sock
        assert sock is not None  # inline mode needs the socket
        sent = os.write(sock.fileno(), data)
        self._bytes += sent
        if sent < len(data):
            self._owe(memoryview(data)[sent:])

    def _pay_owed(self) -> None:
        """Finish a frame the socket took only part of, before anything else."""
        sock = self._sock
        assert sock is not None
        self._stop_owed_watch()
        owed, self._owed = self._owed, b""
        sock.sendall(owed)
        self._bytes += len(owed)

    # -- direct delivery (a broker's fan-out writes for the waiting generator) ------------------

    def _deliver(self, batch: list[Envelope]) -> bool:
        """The sink given to ``DirectSource.deliver_to``: write a fanned-out batch now, or decline.

        Called by the fan-out (another greenlet) with the subscription's lock held: only while
        the generator waits inside it (INLINE, in the generator) and nothing is owed, and it
        never blocks: a socket that takes nothing declines (the generator gets the batch and
        the server writes it, with the write timeout); one that takes part owes the rest, which
        a write watcher finishes before anything else goes out.
        """
        if not self._in_gen or self._owed or self._pacer.state is not State.INLINE:
            return False
        encode = self._encode
        data = encode(batch[0]) if len(batch) == 1 else b"".join([encode(e) for e in batch])
        try:
            self._write_around(data)
        except OSError:
            # Full (a slow reader), or gone: the generator takes it, and the server's own write
            # waits with the write timeout, or finds the error and ends the stream.
            return False
        self._events += len(batch)
        self._pacer.wrote(time.monotonic())
        return True

    def _owe(self, rest: memoryview) -> None:
        """The socket took part of a frame written around the server: a libev write watcher
        (no greenlet) writes the rest as the socket takes it, before anything else goes out."""
        assert self._sock is not None
        self._owed = rest
        self._owed_since = time.monotonic()
        watcher = self._loop.io(self._sock.fileno(), 2)  # 2: writable
        self._owed_watcher = watcher
        watcher.start(self._owed_writable)

    def _owed_writable(self) -> None:
        # Runs only while something is owed: paying, abandoning and closing stop it first.
        owed = self._owed
        assert self._sock is not None
        try:
            sent = os.write(self._sock.fileno(), owed)
        except BlockingIOError:
            return
        except OSError:
            self._stop_owed_watch()
            if self._pacer.write_failed():
                self._stop()
            return
        self._bytes += sent
        self._owed = owed[sent:]
        if not self._owed:
            self._stop_owed_watch()

    def _abandon_owed(self) -> None:
        """A rest still unwritten after the write timeout: the client stopped reading. End the
        stream as a failed write does, and the connection with it (its framing is cut)."""
        self._stop_owed_watch()
        self._owed = b""
        assert self._sock is not None
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._pacer.write_failed():
            self._stop()

    def _stop_owed_watch(self) -> None:
        watcher = self._owed_watcher
        if watcher is not None:
            self._owed_watcher = None
            watcher.stop()
            watcher.close()

    # -- the end ------------------------------------------------------------------------------

    def close(self) -> None:
        """Called by the WSGI server when the response ends or the client is gone."""
        if self._pacer.state is State.CLOSED:
            return
        reason = self._pacer.close()
        if self._direct is not None:
            self._direct.deliver_to(None)
        self._stop_owed_watch()
        self._wake_producer()
        self._stop_heartbeat()
        producer = self._producer
        if producer is not None:
            producer.kill(block=True, timeout=5)
        if producer is None or producer.dead:
            # Inline (or never started, or stopped before a producer could take it over):
            # suspended at a yield, so its ``finally`` runs here. A producer killed before it
            # first ran never runs at all (gevent unschedules it), so its ``finally`` cannot
            # close the generator: closing here again is a no-op once it did. A producer still
            # alive after the kill's timeout is inside the generator, which cannot be closed
            # from outside while it runs.
            close_iterator(self._items)
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
        self._release(reason)


def _hung_up(sock: Any) -> bool:
    """Whether the peer closed its side (FIN or RST), without reading: a TCP-level look at the
    descriptor, so it works under TLS too (whose records must not be read around the session)."""
    try:
        fd = sock.fileno()
    except OSError:
        return True
    if fd < 0:
        return True
    poller = _original_poll()()
    poller.register(fd, select.POLLIN | getattr(select, "POLLRDHUP", 0))
    return any(events & _HANGUP for _, events in poller.poll(0))


def _original_poll() -> Callable[[], Any]:
    """The standard library's ``select.poll`` (gevent replaces it with one that may switch)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None:
        return monkey.get_original("select", "poll")  # type: ignore[no-any-return]
    return select.poll
