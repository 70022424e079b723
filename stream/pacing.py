"""A stream's pacing as a state machine, in the style of h11: inputs in, decisions and bytes out.

No I/O, no clock, no threads, no gevent: the runners in ``stream.runners`` (a gevent one and a
thread one) do the reading, writing and waiting, and tell a ``Pacer`` what happened; the pacer
says what to do next. Tests drive it in-process (tests/test_pacing.py).

States (``State``), and every transition in ``_TRANSITIONS`` below::

    IDLE --start--> INLINE | PRODUCER | THREAD
    INLINE --burst--> PRODUCER --slow--> INLINE          (gevent streams move between the two)
    INLINE | PRODUCER | THREAD --finished | failed | peer_left | write_failed | shutdown--> ENDING
    IDLE --peer_left | write_failed | shutdown--> ENDING  (stopped before it started)
    any --close--> CLOSED

- IDLE: the headers are not out yet; nothing ran.
- INLINE (gevent): the generator runs in the greenlet that serves the request, one value per
  write; keep-alives and the peer's leaving are watched around the server (a libev timer and
  watcher). Only where ``Transport.raw_writes`` proves that safe.
- PRODUCER (gevent): the generator runs in a greenlet of its own that fills a bounded buffer;
  the serving greenlet sends whatever is buffered in one write (coalescing), and keep-alives
  through the server's own write path.
- THREAD: the same with a thread (no gevent: Flask's development server, test clients).
- ENDING: send what is buffered, then the tail (an error event, a ``retry:`` hint), then end
  the body.
- CLOSED: the server closed the response; the reason is final.

An input that does not apply in the current state changes nothing and says so (returns
False): a client that leaves while its stream already ends, a hand-back that lost the race with
a shutdown. The first input that stops a stream names its reason ("end", "error",
"disconnect", "shutdown"); later ones do not overwrite it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .encoders import Encoder

#: how long the first write waits for a value before it sends a keep-alive instead: the headers
#: and first bytes go out at once (routers cut responses that send nothing for 30 s)
FIRST_BYTES_WAIT = 0.005
#: values in a row the generator yields without waiting after which an inline stream moves to
#: a producer (a fast stream: coalesce its writes)
BURST = 2
#: drains in a row of one value that the writer had to wait for, after which a producer hands an
#: inline-capable generator back (a slow stream again: one greenlet per open stream)
SLOW_DRAINS = 3


class State(enum.Enum):
    IDLE = "idle"
    INLINE = "inline"
    PRODUCER = "producer"
    THREAD = "thread"
    ENDING = "ending"
    CLOSED = "closed"


class Input(enum.Enum):
    START_INLINE = "start_inline"
    START_PRODUCER = "start_producer"
    START_THREAD = "start_thread"
    BURST = "burst"  # inline: values come back to back
    SLOW = "slow"  # producer: values come one at a time again
    FINISHED = "finished"  # the generator returned
    FAILED = "failed"  # the generator raised (or a value could not be encoded)
    PEER_LEFT = "peer_left"  # the client closed its side
    WRITE_FAILED = "write_failed"  # a write raised or timed out (the server closes us)
    SHUTDOWN = "shutdown"  # the worker stops
    UNFINISHED = "unfinished"  # the generator ended its stream before its end (clients resume)
    CLOSE = "close"  # the server closed the response


_RUNNING = (State.INLINE, State.PRODUCER, State.THREAD)
_STOPS = (Input.PEER_LEFT, Input.WRITE_FAILED, Input.SHUTDOWN)

#: (state, input) -> next state: every transition there is. Anything else is ignored.
_TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.IDLE, Input.START_INLINE): State.INLINE,
    (State.IDLE, Input.START_PRODUCER): State.PRODUCER,
    (State.IDLE, Input.START_THREAD): State.THREAD,
    (State.INLINE, Input.BURST): State.PRODUCER,
    (State.PRODUCER, Input.SLOW): State.INLINE,
    **{
        (s, i): State.ENDING
        for s in _RUNNING
        for i in (Input.FINISHED, Input.FAILED, Input.UNFINISHED, *_STOPS)
    },
    **{(State.IDLE, i): State.ENDING for i in _STOPS},
    **{(s, Input.CLOSE): State.CLOSED for s in State if s is not State.CLOSED},
}

#: the reason an input gives a stream that stops
_REASONS = {
    Input.FINISHED: "end",
    Input.FAILED: "error",
    Input.PEER_LEFT: "disconnect",
    Input.WRITE_FAILED: "disconnect",
    Input.SHUTDOWN: "shutdown",
    Input.UNFINISHED: "unfinished",
}


@dataclass(frozen=True, slots=True)
class Transport:
    """What the server under a stream allows, detected once per request (``detect_transport``).

    ``framing``: how the server frames the body on the wire, where it is known and plain:
    ``"chunked"`` (HTTP/1.1), ``"close"`` (HTTP/1.0: the body ends with the connection), or None
    (unknown or not ours to repeat: uwsgi, HTTP/2, a body with a Content-Length).
    ``tls``: the socket is a TLS session (bytes written to its descriptor would bypass it).
    ``multiplexed``: the connection carries other requests' streams too (HTTP/2).
    """

    framing: str | None = None
    tls: bool = False
    multiplexed: bool = False
    has_socket: bool = False

    @property
    def raw_writes(self) -> bool:
        """Whether keep-alives may be written to the descriptor around the server: only on plain
        TCP, one request per connection at a time, with the server's framing known."""
        plain = not self.tls and not self.multiplexed
        return plain and self.has_socket and self.framing is not None

    @property
    def watch_peer(self) -> bool:
        """Whether the connection closing means this stream's client left (not under HTTP/2,
        where the connection outlives its streams and a stream's end is a frame)."""
        return self.has_socket and not self.multiplexed


class Pacer:
    """One stream's pacing: which way the generator runs, when a keep-alive is due, when to move
    between inline and producer, and how the stream ends. Times are the runner's clock."""

    __slots__ = (
        "state",
        "reason",
        "_encoder",
        "heartbeat",
        "_tail",
        "_last_write",
        "_wrote_any",
        "_burst",
        "_slow_drains",
        "_drained",
        "handback",
    )

    def __init__(self, encoder: Encoder, heartbeat: float) -> None:
        self.state = State.IDLE
        self.reason = "end"
        self._encoder = encoder
        self.heartbeat = heartbeat
        self._tail = b""
        self._last_write = 0.0
        self._wrote_any = False
        self._burst = 0
        self._slow_drains = 0
        self._drained = 0
        self.handback = False  # a producer should give the generator back (between two values)

    # -- the one place transitions happen ----------------------------------------------------

    def _go(self, event: Input) -> bool:
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            return False
        if new is State.ENDING and self.state is not State.ENDING:
            self.reason = _REASONS[event]
        self.state = new
        return True

    # -- starting ---------------------------------------------------------------------------

    def start(self, transport: Transport, gevent: bool, now: float) -> State:
        """The headers go out now: choose how the generator runs (the one place that decides
        whether writing around the server is allowed)."""
        self._last_write = now
        if not gevent:
            self._go(Input.START_THREAD)
        elif transport.raw_writes:
            self._go(Input.START_INLINE)
        else:
            self._go(Input.START_PRODUCER)
        return self.state

    @property
    def stopping(self) -> bool:
        """End the body after what is buffered (the generator must not be asked for more)."""
        return self.state is State.ENDING or self.state is State.CLOSED

    # -- inline <-> producer ----------------------------------------------------------------

    def inline_value(self, waited: bool) -> bool:
        """An inline value arrived (``waited``: the generator waited for it). True: values come
        back to back, so the stream moves to a producer from this value on."""
        if waited:
            self._burst = 0
            return False
        self._burst += 1
        if self._burst >= BURST and self._go(Input.BURST):
            self._burst = 0
            return True
        return False

    def drained(self, events: int, waited: bool, inline_capable: bool) -> None:
        """The writer sent a producer's buffer (``events``: the count so far; ``waited``: it
        waited for them). After SLOW_DRAINS drains of one value each it asks for a hand-back."""
        one_waited_for = waited and events - self._drained == 1
        if inline_capable and one_waited_for and self.state is State.PRODUCER:
            self._slow_drains += 1
            if self._slow_drains >= SLOW_DRAINS:
                self.handback = True
        else:
            self._slow_drains = 0
        self._drained = events

    def hand_back(self) -> bool:
        """The producer gives the generator back; False if the stream stops meanwhile."""
        self.handback = False
        self._slow_drains = 0
        self._burst = 0
        return self._go(Input.SLOW)

    # -- keep-alives --------------------------------------------------------------------------

    def wrote(self, now: float) -> None:
        """Bytes went out (a value, a keep-alive)."""
        self._last_write = now
        self._wrote_any = True

    def keepalive_in(self, now: float) -> float:
        """Seconds until a keep-alive is due (<= 0: due now). The first bytes follow the headers
        within FIRST_BYTES_WAIT; after that, ``heartbeat`` seconds of silence."""
        wait = self.heartbeat if self._wrote_any else FIRST_BYTES_WAIT
        return wait - (now - self._last_write)

    def keepalive(self, now: float) -> bytes:
        """The keep-alive's bytes (counted as written now)."""
        self.wrote(now)
        return self._encoder.keepalive

    # -- stopping -----------------------------------------------------------------------------

    def finish(self) -> bool:
        """The generator returned."""
        return self._go(Input.FINISHED)

    def fail(self, code: str, message: str) -> bool:
        """The generator raised: the body ends with the contract's error event (once)."""
        if not self._go(Input.FAILED):
            return False
        self._tail += self._encoder.error(code, message)
        return True

    def unfinished(self, reason: str, retry_ms: int) -> bool:
        """The generator ended its stream before its end: a clean end that clients resume
        from (SSE first gets a ``retry:`` hint, the mark of an unfinished end)."""
        if not self._go(Input.UNFINISHED):
            return False
        self.reason = reason
        self._tail += self._encoder.retry_hint(retry_ms)
        return True

    def peer_left(self) -> bool:
        return self._go(Input.PEER_LEFT)

    def write_failed(self) -> bool:
        return self._go(Input.WRITE_FAILED)

    def shut_down(self, retry_ms: int) -> bool:
        """The worker stops: end cleanly, telling SSE clients when to come back."""
        if not self._go(Input.SHUTDOWN):
            return False
        self._tail += self._encoder.retry_hint(retry_ms)
        return True

    def tail(self) -> bytes:
        """What goes out after the buffered values, once (b"": end the body now)."""
        tail, self._tail = self._tail, b""
        return tail

    def close(self) -> str:
        """The server closed the response; returns the stream's final reason."""
        if self.state is not State.ENDING and self.state is not State.CLOSED:
            # Closed while it ran (a generator's end, error or unfinished end would have moved it
            # to ENDING): the server's write failed, or the client left unseen.
            self.reason = "disconnect"
        self._go(Input.CLOSE)
        return self.reason
