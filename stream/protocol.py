"""The clients' protocol layer: everything between the body's bytes and the caller that is not I/O.

Pure (standard library, orjson and the decoders), so the requests client (``client.py``) and the
httpx client (``aio.py``) share it and differ only in how they move bytes. One ``StreamState``
lives for one ``stream()``/``events()`` call, across reconnections, and ``StreamState.drive``
is the whole connect/read/resume loop as a generator of I/O commands (the sans-I/O pattern of
h11 and httpcore): each client is a thin shell that performs them and sends back the result::

    if not state.opened(*connect()):             # the first request (also from __enter__);
        close(response)                          # a 204: no body, the stream already ended
    driver = state.drive(read_timeout=read, clock=time.monotonic, hooks=hooks)
    answer = None
    while True:
        command = driver.send(answer)            # StopIteration: the stream ended normally
        if type(command) is Read:                # the next bytes (within command.limit s),
            answer = read() or b""               # b"" at a clean end, Cut(cause) for a cut
        elif type(command) is Deliver:
            yield command.batch                  # values (or Events), in order
        elif type(command) is Release:
            close(response)
        elif type(command) is Pause:
            sleep(command.seconds)               # before resuming
        elif type(command) is Connect:           # a resume; a failure goes back with
            answer = connect()                   # driver.throw(error)

Errors that end the stream (a server error, a reset, bad data, attempts spent) are raised
by the driver after the values before them were delivered; the shell's own errors (a read
timeout, a transport error that is not a cut) end it from the shell.

``feed`` returns the decoder's own list when a batch holds nothing but plain values (the common
case for plain streams: one ``type(v) is dict and v.keys() <= {...}`` test per value and no other
per-value work), so a client can hand whole batches to ``itertools.chain.from_iterable`` and pay
nothing per value in Python. Batches with envelopes or markers come back as small generators that
keep ``last_event_id`` equal to the id of the value being delivered and stop at a marker; the
state records the marker in ``stop``/``ended``/``error`` for the client to act on after the batch.

Deliberate rules (the wire formats leave them open; keep them unless the server changes):

* **Envelopes.** An NDJSON or JSON-seq value that is a JSON object whose keys are *exactly*
  ``id``, ``event`` and ``data`` is an envelope: ``stream()`` yields its ``data``, ``events()`` an
  ``Event`` with its fields, and a string ``id`` becomes the last event ID. The formats carry no
  other mark, so a plain stream whose values happen to have exactly these three keys is read as
  envelopes too. Values with other keys (``{"event_id", "data", "is_last_event"}``) are plain.
* **Error objects.** A JSON object with the single key ``"error"`` holding an object with
  ``"code"`` and ``"message"`` is the server's error event: ``RemoteError``, after every value
  before it was delivered. On SSE the same object is the data of an ``event: error``; an
  ``error`` event with any other data is an ordinary event (a channel may publish that type).
* **Markers.** Event type ``end`` stops the stream normally and is never yielded (no reconnect);
  ``reset`` (the server no longer has the events after our Last-Event-ID) raises ``StreamReset``
  from ``stream()`` unless ``on_reset`` was given, in which case ``on_reset(event)`` is called
  and the stream goes on; ``events()`` always yields it (after calling ``on_reset``, if given).
* **Resuming.** ``reconnect=None`` resumes only once the server sent an id (or the caller gave
  ``last_event_id``): a plain stream has no position to resume from, and replaying it from the
  start would repeat events. An SSE ``retry:`` alone does not make a stream resumable.
  ``reconnect=False`` never resumes. A resumable stream resumes:

  - when the connection is *cut* (a reset, a chunked body without its last chunk, a body shorter
    than its ``Content-Length``, a resuming request refused or answered 429/5xx);
  - when the body *ends normally* but the server said the stream is unfinished. This service
    ends a stream it has not finished in two ways (shutdown, ``STREAM_MAX_LIFETIME``, a slow
    consumer cut off): over SSE, after a block with a ``retry:`` field and no data (its
    reconnection hint, ``hinted``); over NDJSON and JSON-seq, with no end marker on a stream of
    envelopes (jobs end with an ``end``/``error`` marker, channels never end by themselves, so a
    clean end of either is the service cutting it short).

  Any other normal end is the end of the iteration, never a resume: an end marker, a ``204 No
  Content`` (what this service answers to a resume after a stream's final event), SSE
  ``data: [DONE]``, and a finite stream of another server, ids or not (sse-starlette, FastAPI):
  such a server would answer a resume by replaying its stream from the start, forever. So an
  SSE stream of this service that ends without the hint (an end this rule cannot tell from a
  finite stream) ends the iteration; the server sends the hint before every end that is not
  the stream's final event.
* **Giving up.** Attempts that deliver no event are counted (an event resets the count): after
  ``max_attempts`` of them ``ConnectionLost`` is raised, so a resume that cannot succeed (the
  server down, a resume that keeps ending at once) ends in an error within ``max_attempts``
  waits of at most ``backoff_max`` each (plus each attempt's own timeouts). A status other than
  429/5xx on a resume is raised at once (``HTTPStatusError``), a ``reset`` as above.
* **The server's ``retry:``** sets the wait before the first attempt, up to ``backoff_max``
  (30 s by default): a server cannot park a client for years with ``retry: 1000000000000``.
* **``Last-Event-ID``** is sent without the id's leading and trailing spaces and tabs, the bytes
  a browser sends (``request_headers``): an id of ``" 5"`` (``id:  5``) resumes with ``5``.
* **Decoding** is exact (``stream.ndjson``): values before a malformed line in the same read
  are delivered, then ``DecodeError``. SSE ``data: [DONE]`` (OpenAI-style APIs) ends
  ``stream()`` like an end marker; ``events()`` yields that event, then ends.
"""

from __future__ import annotations

import random as _random
from collections.abc import (
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final, Literal, Protocol
from urllib.parse import SplitResult, quote, urlsplit

import orjson

from .errors import (
    ConnectionLost,
    ContentTypeError,
    DecodeError,
    HTTPStatusError,
    RemoteError,
    StreamError,
    StreamReset,
    StreamTimeout,
)
from .event import Event
from .formats import FORMAT_NAMES
from .jsonseq import JSONSeqDecoder
from .ndjson import NDJSONDecoder, decode_exact, loads_exact, long_digits
from .sse import SSEDecoder
from .wire import (
    DONE,
    END,
    ERROR,
    JSON,
    JSON_SEQ,
    MESSAGE,
    NDJSON,
    NDJSON_ALIASES,
    RESERVED_EVENTS,
    RESET,
    SSE,
    error_fields,
)

__all__ = [
    "ACCEPT_ANY",
    "EVENTS",
    "NO_HOOKS",
    "ClientSettings",
    "Command",
    "Connect",
    "Cut",
    "Deliver",
    "Hooks",
    "Pause",
    "Read",
    "Release",
    "RETRYABLE_STATUSES",
    "VALUES",
    "Decoder",
    "Mode",
    "ReconnectPolicy",
    "StreamState",
    "accept_header",
    "cross_origin",
    "drop_on_redirect",
    "http_status_error",
    "join_url",
    "new_state",
    "publish_ids",
    "publish_request",
    "media_type",
    "remote_error",
    "request_headers",
    "stripped_on_redirect",
]

Mode = Literal["values", "events"]
VALUES: Final = "values"
EVENTS: Final = "events"

#: what a client asks for when the caller names no format: all three, NDJSON first
ACCEPT_ANY: Final = f"{NDJSON}, {SSE};q=0.9, {JSON_SEQ};q=0.8"

#: the media types a body of NDJSON arrives with
_NDJSON_TYPES: Final = NDJSON_ALIASES | {NDJSON}

_ENVELOPE_KEYS: Final = frozenset({"id", "event", "data"})
# A value can only be special (an envelope or an error object) if its keys are a subset of
# these: one C-level subset test rejects ordinary objects at their first foreign key.
_SPECIAL_KEYS: Final = frozenset({"id", "event", "data", "error"})

#: how much of a non-2xx body a client reads to find the JSON error in it
ERROR_BODY_LIMIT: Final = 64 * 1024


class Decoder(Protocol):
    """The shape shared by ``NDJSONDecoder``, ``JSONSeqDecoder`` and ``SSEDecoder``."""

    def feed(self, data: bytes) -> list[Any]:
        """Decode the complete items in ``data`` (plus what earlier calls left over)."""
        ...  # pragma: no cover

    def flush(self) -> list[Any]:
        """Decode what is left at the end of the body."""
        ...  # pragma: no cover

    def pending(self) -> bool:
        """Whether part of an item (a value, an event) has arrived and is not complete yet."""
        ...  # pragma: no cover


def media_type(content_type: str | None, response: Any = None) -> str:
    """The media type a ``Content-Type`` names (parameters ignored), or ContentTypeError."""
    raw = content_type or ""
    media = raw.partition(";")[0].strip().lower()
    if media in _NDJSON_TYPES:
        return NDJSON
    if media == SSE or media == JSON_SEQ:
        return media
    shown = repr(raw) if raw else "no Content-Type"
    raise ContentTypeError(
        f"cannot decode {shown}: expected {NDJSON}, {SSE} or {JSON_SEQ}",
        content_type=raw,
        response=response,
    )


def accept_header(format: str | None) -> str:
    """The ``Accept`` header for ``format`` (``ndjson``, ``sse``, ``json-seq`` or None for any)."""
    if format is None:
        return ACCEPT_ANY
    try:
        return FORMAT_NAMES[format]
    except KeyError:
        names = ", ".join(FORMAT_NAMES)
        raise ValueError(f"format must be one of {names}, not {format!r}") from None


def remote_error(value: Any) -> RemoteError | None:
    """The ``RemoteError`` a decoded value stands for, if it is the server's error object."""
    fields = error_fields(value)
    return None if fields is None else RemoteError(*fields)


def _sse_remote_error(data: str) -> RemoteError | None:
    try:
        return remote_error(orjson.loads(data))
    except orjson.JSONDecodeError:
        return None


def http_status_error(
    status_code: int, reason: str, body: bytes, response: Any = None
) -> HTTPStatusError:
    """The ``HTTPStatusError`` for a non-2xx answer, its body decoded as JSON when it is."""
    decoded: Any
    try:
        decoded = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        decoded = body.decode("utf-8", "replace")
    message = f"HTTP {status_code}" + (f" {reason}" if reason else "")
    error = decoded.get("error") if type(decoded) is dict else None
    if type(error) is dict and "message" in error:
        code = error.get("code")
        message += f": {code}: {error['message']}" if code else f": {error['message']}"
    return HTTPStatusError(message, status_code=status_code, body=decoded, response=response)


def _text(value: Any) -> str:
    """The compact JSON text of a decoded value (an ``Event``'s ``data`` for NDJSON/JSON-seq)."""
    return orjson.dumps(value).decode()


#: statuses a resume retries (the server restarting, overloaded, or its broker briefly down)
RETRYABLE_STATUSES: Final = frozenset({429, 500, 502, 503, 504})


def request_headers(
    client_headers: Mapping[str, str], headers: Mapping[str, str] | None, format: str | None
) -> dict[str, str]:
    """The headers of a stream request: the client's, the call's, and an ``Accept``."""
    merged: dict[str, str] = {"Cache-Control": "no-cache"}
    merged.update(client_headers)
    if headers:
        merged.update(headers)
    if format is not None or not any(name.lower() == "accept" for name in merged):
        merged["Accept"] = accept_header(format)
    return merged


#: caller headers a redirect to another origin keeps: they say what is asked and sent, not who asks
_KEPT_ON_REDIRECT: Final = frozenset({"accept", "content-type", "cache-control", "last-event-id"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def stripped_on_redirect(*headers: Mapping[str, Any] | None) -> frozenset[str]:
    """The names of the caller's headers that a redirect to another origin drops."""
    return frozenset(
        name
        for given in headers
        if given
        for name in given
        if name.lower() not in _KEPT_ON_REDIRECT
    )


def _origin(url: SplitResult) -> tuple[str, str, int | None]:
    scheme = url.scheme.lower()
    return scheme, (url.hostname or "").lower(), url.port or _DEFAULT_PORTS.get(scheme)


def cross_origin(url: str, target: str) -> bool:
    """Whether ``target`` is on another origin (scheme, host, port) than ``url``."""
    try:
        return _origin(urlsplit(url)) != _origin(urlsplit(target))
    except ValueError:  # a port that is no number: not the same origin
        return True


def drop_on_redirect(
    headers: MutableMapping[str, Any], names: Collection[str], url: str, target: str
) -> None:
    """Remove ``names`` (``stripped_on_redirect``) from ``headers``, those of the request that
    follows a redirect from ``url`` to ``target``, when ``target`` is on another origin."""
    if names and cross_origin(url, target):
        for name in names:
            headers.pop(name, None)


def join_url(base_url: str, path: str) -> str:
    """The absolute URL of ``path`` (a full ``http(s)://`` URL is taken as it is)."""
    if path.startswith(("http://", "https://")):
        return path
    if not base_url:
        raise ValueError(f"{path!r} is not a full URL and the client has no base_url")
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def publish_request(
    channel: str,
    values: tuple[Any, ...],
    *,
    event: str | None,
    token: str | None,
    headers: Mapping[str, str],
) -> tuple[str, bytes, dict[str, str], dict[str, str] | None]:
    """A publish as (path, body, headers, params): one value as JSON, several as NDJSON."""
    if not values:
        raise ValueError("publish() needs at least one value")
    merged = dict(headers)
    if len(values) == 1:
        body = orjson.dumps(values[0])
        merged["Content-Type"] = JSON
    else:
        body = b"".join(orjson.dumps(value, option=orjson.OPT_APPEND_NEWLINE) for value in values)
        merged["Content-Type"] = NDJSON
    if token is not None:
        merged["Authorization"] = f"Bearer {token}"
    params = {"event": event} if event is not None else None
    return "/channels/" + quote(channel, safe=""), body, merged, params


def publish_ids(status_code: int, reason: str, content: bytes, response: Any = None) -> list[str]:
    """The ids of a publish's answer, or its HTTPStatusError (StreamError if it makes no sense)."""
    if not 200 <= status_code < 300:
        raise http_status_error(status_code, reason, content, response)
    try:
        ids = orjson.loads(content)["ids"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise StreamError(f"unexpected publish answer: {content[:200]!r}") from exc
    return [str(ident) for ident in ids]


def new_state(
    mode: Mode,
    *,
    last_event_id: str | None,
    reconnect: bool | None,
    on_reset: Callable[[Event], object] | None,
    max_attempts: int | None,
    backoff_initial: float,
    backoff_max: float,
) -> StreamState:
    """The state of one ``stream()``/``events()`` call, with the client's backoff settings."""
    policy = ReconnectPolicy(
        initial=backoff_initial, maximum=backoff_max, max_attempts=max_attempts
    )
    return StreamState(
        mode, last_event_id=last_event_id, reconnect=reconnect, on_reset=on_reset, policy=policy
    )


class ClientSettings:
    """The settings both clients keep between calls (their keywords, no I/O): the base URL,
    the headers sent with every request, resuming and its backoff. ``timeout`` is each
    client's own (the transports spell it differently)."""

    def __init__(
        self,
        base_url: str,
        *,
        reconnect: bool | None,
        headers: Mapping[str, str] | None,
        max_attempts: int | None,
        backoff_initial: float,
        backoff_max: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.reconnect = reconnect
        self.headers: dict[str, str] = dict(headers or {})
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (a full ``http(s)://`` URL is taken as it is)."""
        return join_url(self.base_url, path)

    def _new_state(
        self,
        mode: Mode,
        *,
        last_event_id: str | None,
        reconnect: bool | None,
        on_reset: Callable[[Event], object] | None,
    ) -> StreamState:
        """The state of one call: its own ``reconnect`` if given, else the client's."""
        return new_state(
            mode,
            last_event_id=last_event_id,
            reconnect=reconnect if reconnect is not None else self.reconnect,
            on_reset=on_reset,
            max_attempts=self.max_attempts,
            backoff_initial=self.backoff_initial,
            backoff_max=self.backoff_max,
        )


@dataclass(slots=True)
class ReconnectPolicy:
    """When to resume a dropped stream: the server's ``retry:``, then exponential full jitter.

    Attempt ``n`` (0 for the first reconnection after a drop) waits
    ``floor + random() * (ceiling - floor)`` seconds, where ``floor`` is the server's ``retry``
    (0 when it sent none) and ``ceiling = min(maximum, (retry or initial) * multiplier ** n)``
    (never below ``floor``). So the first attempt after a server's ``retry:`` hint waits exactly
    that long, and without one it waits a uniform fraction of ``initial`` ("full jitter":
    https://aws.amazon.com/blogs/architecture/exponential-backoff-and-jitter/). ``attempts``
    counts consecutive attempts that delivered no event; an event resets it (``succeeded``).
    """

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    #: consecutive attempts without an event before giving up; None never gives up
    max_attempts: int | None = 10
    random: Callable[[], float] = field(default=_random.random, repr=False)
    #: the server's reconnection time in seconds (SSE ``retry:``), if it sent one
    retry: float | None = None
    attempts: int = 0

    def next_delay(self) -> float | None:
        """Count one more attempt and return how long to wait before it, or None when spent."""
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return None
        exponent = min(self.attempts, 64)  # beyond this the cap has long been reached
        self.attempts += 1
        floor = min(self.retry or 0.0, self.maximum)  # the server's retry, up to the cap
        base = self.retry if self.retry is not None else self.initial
        ceiling = max(floor, min(self.maximum, base * self.multiplier**exponent))
        return floor + self.random() * (ceiling - floor)

    def succeeded(self) -> None:
        """An event arrived: the next drop starts the backoff afresh."""
        self.attempts = 0


class Connect:
    """Send the request again (with ``request_headers()``); answer ``(status, content type,
    response)``, or throw the library error (StreamTimeout, ConnectionLost, HTTPStatusError)."""

    __slots__ = ()


class Read:
    """Read the next bytes of the body: answer them, ``b""`` at a clean end, ``Cut`` for a cut.

    ``limit``: seconds the read may wait (part of an item is held and must be complete by
    then); None: the transport's own read timeout. Running out is the shell's StreamTimeout.
    """

    __slots__ = ("limit",)

    def __init__(self, limit: float | None = None) -> None:
        self.limit = limit


class Deliver:
    """Hand ``batch`` (values or Events, in order) to the caller."""

    __slots__ = ("batch",)

    def __init__(self, batch: Iterable[Any]) -> None:
        self.batch = batch


class Release:
    """Close the current response and its connection (it is done, or unusable)."""

    __slots__ = ()


class Pause:
    """Wait ``seconds`` before attempt ``attempt`` to resume (``cause``: why the last one ended)."""

    __slots__ = ("seconds", "attempt", "cause")

    def __init__(self, seconds: float, attempt: int, cause: BaseException | None) -> None:
        self.seconds = seconds
        self.attempt = attempt
        self.cause = cause


class Cut:
    """The answer to ``Read`` when the connection was cut (``cause``: the transport's error)."""

    __slots__ = ("cause",)

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause


Command = Connect | Read | Deliver | Release | Pause
_CONNECT: Final = Connect()
_READ: Final = Read()
_RELEASE: Final = Release()


class Hooks:
    """Observers (the command line's): raw bytes, each response, each reconnection."""

    __slots__ = ("on_bytes", "on_response", "on_reconnect")

    def __init__(
        self,
        *,
        on_bytes: Callable[[bytes], object] | None = None,
        on_response: Callable[[Any], object] | None = None,
        on_reconnect: Callable[[int, float, BaseException | None], object] | None = None,
    ) -> None:
        self.on_bytes = on_bytes
        self.on_response = on_response
        self.on_reconnect = on_reconnect


NO_HOOKS: Final = Hooks()


class StreamState:
    """One stream's protocol state across reconnections: decoder, last event ID, markers, policy."""

    def __init__(
        self,
        mode: Mode = VALUES,
        *,
        last_event_id: str | None = None,
        reconnect: bool | None = None,
        on_reset: Callable[[Event], object] | None = None,
        policy: ReconnectPolicy | None = None,
    ) -> None:
        if mode != VALUES and mode != EVENTS:
            raise ValueError(f"mode must be {VALUES!r} or {EVENTS!r}, not {mode!r}")
        self.mode: Mode = mode
        self.reconnect = reconnect
        self.on_reset = on_reset
        self.policy = policy if policy is not None else ReconnectPolicy()
        #: the media type of the current response (set by ``start``)
        self.media_type: str | None = None
        #: true once the caller must stop reading: see ``ended`` and ``error``
        self.stop = False
        #: the server sent its end marker: the stream is complete, do not resume
        self.ended = False
        #: the error to raise once the values before it were delivered
        self.error: StreamError | None = None
        self._last_id = last_event_id or ""
        self._requested_id = ""
        self._decoder: Decoder | None = None
        self._sse: SSEDecoder | None = None
        #: the stream carried this service's envelopes (NDJSON/JSON-seq ids): see "Resuming"
        self._envelopes = False
        self._handle: Callable[[list[Any]], Iterable[Any]] = self._json_values

    # -- what the client asks for --------------------------------------------------------------

    @property
    def last_event_id(self) -> str:
        """The id of the latest event delivered (or the one given), ``""`` when none."""
        return self._last_id

    @property
    def resumable(self) -> bool:
        """Whether a dropped connection is resumed: ``reconnect``, or None and an id is known."""
        if self.reconnect is not None:
            return self.reconnect
        return bool(self._last_id)

    def request_headers(self) -> dict[str, bytes]:
        """Headers the next request needs: ``Last-Event-ID`` (UTF-8 bytes) once an id is known.

        The value is the id without leading and trailing spaces and tabs, the bytes a browser
        sends (fetch normalizes header values so; HTTP strips them on arrival anyway, RFC 9110
        section 5.5): requests and h11 refuse a value that starts with whitespace.
        """
        self._requested_id = self._last_id
        value = self._last_id.strip(" \t")
        if value:
            return {"Last-Event-ID": value.encode()}
        return {}

    # -- one response ----------------------------------------------------------------------------

    def start(self, content_type: str | None, response: Any = None) -> None:
        """Begin a body: pick the decoder from its ``Content-Type`` (or ContentTypeError)."""
        media = media_type(content_type, response)
        self.media_type = media
        decoder: Decoder
        if media == SSE:
            # The decoder carries the last event ID so ``Event.id`` continues across reconnects.
            self._sse = SSEDecoder(last_event_id=self._last_id)
            decoder = self._sse
            self._handle = self._sse_values if self.mode == VALUES else self._sse_events
        else:
            self._sse = None
            decoder = NDJSONDecoder() if media == NDJSON else JSONSeqDecoder()
            self._handle = self._json_values if self.mode == VALUES else self._json_events
        self._decoder = decoder

    def feed(self, data: bytes) -> Iterable[Any]:
        """Decode a piece of the body: the values (or Events) in it, to be delivered in order."""
        assert self._decoder is not None, "start() first"
        try:
            batch = self._decoder.feed(data)
        except DecodeError as exc:
            return self._before_error(exc)
        if not batch:
            return batch
        self.policy.attempts = 0  # an event arrived: the connection is healthy (``succeeded``)
        return self._handle(batch)

    def pending(self) -> bool:
        """Whether part of an item (value, event) has arrived and is not complete yet."""
        return self._decoder is not None and self._decoder.pending()

    def no_content(self) -> None:
        """The server answered ``204 No Content``: nothing (more) to read, the stream ended."""
        self._end()

    def opened(self, status: int, content_type: str | None, response: Any = None) -> bool:
        """A 2xx answer arrived: ``204`` ends the stream, else pick the decoder (or raise).

        Returns whether a body follows: False (a 204) tells the shell to close the response.
        """
        if status == 204:
            # No Content: the answer to a resume after the stream's final event.
            self.no_content()
            return False
        self.start(content_type, response)
        return True

    def drive(
        self,
        *,
        read_timeout: float | None,
        clock: Callable[[], float],
        hooks: Hooks = NO_HOOKS,
    ) -> Generator[Command, Any, None]:
        """The connect/read/resume loop, as I/O commands (module docstring); starts after
        ``opened``. ``read_timeout`` also bounds the time from one item to the next (an
        event or a keep-alive): ``clock`` is the shell's monotonic clock in seconds.
        ``hooks.on_bytes`` sees each read's bytes before they are decoded and
        ``hooks.on_reconnect`` each ``Pause`` before the shell waits it out."""
        feed = self.feed
        on_bytes = hooks.on_bytes
        on_reconnect = hooks.on_reconnect
        while not self.ended:
            # Bound once per response (``opened`` picked its decoder): asked after every read.
            assert self._decoder is not None, "opened() first"
            pending = self._decoder.pending
            cause: BaseException | None = None
            deadline = 0.0  # while part of an item is held: when it must be complete
            while True:
                if deadline:
                    left = deadline - clock()
                    if left <= 0:
                        raise StreamTimeout(
                            f"no complete event or keep-alive within {read_timeout} s"
                        )
                    got = yield Read(left)
                else:
                    got = yield _READ
                if type(got) is Cut:
                    cause = got.cause
                    break
                if not got:
                    break
                if on_bytes is not None:
                    on_bytes(got)
                out = feed(got)
                if out:
                    yield Deliver(out)
                    if self.stop:
                        self.raise_error()
                        return
                if read_timeout is None:
                    continue
                if pending():
                    if out or not deadline:
                        deadline = clock() + read_timeout  # after the caller had the batch
                elif deadline:
                    deadline = 0.0
            if cause is None:
                out = self.finish()
                if out:
                    yield Deliver(out)
                    if self.stop:
                        self.raise_error()
                        return
            yield _RELEASE
            delay = self.disconnected(clean=cause is None, cause=cause)
            if delay is None:
                return
            while True:
                if on_reconnect is not None:
                    on_reconnect(self.policy.attempts, delay, cause)
                yield Pause(delay, self.policy.attempts, cause)
                try:
                    status, content_type, response = yield _CONNECT
                except (StreamTimeout, ConnectionLost) as exc:
                    cause = exc
                except HTTPStatusError as exc:
                    if exc.status_code not in RETRYABLE_STATUSES:
                        raise
                    cause = exc
                else:
                    try:
                        # A 204 (no body) ended the stream: the driver returns and the shell
                        # closes the response it was left holding, as at any return.
                        self.opened(status, content_type, response)
                    except StreamError:
                        yield _RELEASE
                        raise
                    break
                delay = self.connect_failed(cause)

    def _before_error(self, error: DecodeError) -> Iterator[Any]:
        """The values a read decoded before its bad line, then the error (CONTRACT.md)."""
        values, error.values = error.values, []
        if values:
            self.policy.attempts = 0
            yield from self._handle(values)
            if self.stop:
                return  # an end marker or a server error came first
        self._fail(error)

    def finish(self) -> Iterable[Any]:
        """At a clean end of the body: what the decoder still held (an unterminated last line)."""
        if self._decoder is None:
            return ()
        try:
            batch = self._decoder.flush()
        except DecodeError as exc:
            return self._before_error(exc)
        return self._handle(batch) if batch else batch

    def raise_error(self) -> None:
        """Raise the error recorded by a batch, if any (call after delivering the batch)."""
        if self.error is not None:
            raise self.error

    def disconnected(self, *, clean: bool, cause: BaseException | None = None) -> float | None:
        """The body ended (``clean``) or was cut: None for the normal end, else seconds to wait.

        Raises ``ConnectionLost`` (chained to ``cause``) for a cut that cannot be resumed, or
        when the policy's attempts are spent.
        """
        sse = self._sse
        hinted = False
        if sse is not None:
            # Every dispatched event was delivered by now, and an ``id:`` in a block without
            # data still moves the last event ID (WHATWG HTML, "dispatch the event", step 1).
            self._last_id = sse.last_event_id
            if sse.retry is not None:
                # Capped in milliseconds first: a retry of 10**400 ms is no float.
                cap = int(self.policy.maximum * 1000)
                self.policy.retry = min(sse.retry, cap) / 1000
            hinted = sse.hinted
        if self.ended:
            return None
        if not self.resumable:
            if clean:
                return None
            raise ConnectionLost(
                f"the connection was cut mid-stream and cannot be resumed: {cause}",
                attempts=self.policy.attempts,
            ) from cause
        if clean and not (hinted or self._envelopes):
            # A normal end with nothing that says the stream is unfinished: the end (never a
            # replay of another server's finite stream). See "Resuming" above.
            return None
        return self._next_delay(cause)

    def connect_failed(self, cause: BaseException) -> float:
        """A resuming request failed (refused, timeout, 5xx): seconds to wait, or ConnectionLost."""
        return self._next_delay(cause)

    def _next_delay(self, cause: BaseException | None) -> float:
        delay = self.policy.next_delay()
        if delay is None:
            attempts = self.policy.attempts
            raise ConnectionLost(
                f"gave up resuming after {attempts} attempts: {cause}", attempts=attempts
            ) from cause
        return delay

    # -- the per-batch handlers ------------------------------------------------------------------

    def _fail(self, error: StreamError) -> None:
        self.error = error
        self.stop = True

    def _end(self) -> None:
        self.ended = True
        self.stop = True

    def _reset(self, event: Event) -> bool:
        """Report a reset; False when ``stream()`` must stop with StreamReset (no ``on_reset``)."""
        if self.on_reset is not None:
            self.on_reset(event)
            return True
        if self.mode == EVENTS:
            return True
        after = f" after {self._requested_id!r}" if self._requested_id else ""
        self._fail(
            StreamReset(f"the server no longer has the events{after}; it reset", event=event)
        )
        return False

    def _json_values(self, batch: list[Any]) -> Iterable[Any]:
        # The hot path. ``issuperset`` iterates each value (an object's keys) in C and stops at
        # the first key that no envelope or error object has, so an ordinary batch costs one
        # C-level pass and the decoder's list goes back untouched. It is only a filter: "", [],
        # {} and lists of those key names pass it too, and the slow path sorts them out.
        try:
            if not any(map(_SPECIAL_KEYS.issuperset, batch)):
                return batch
        except TypeError:
            pass  # numbers, booleans or null (not iterable), or unhashable list items
        special = _SPECIAL_KEYS
        for index, value in enumerate(batch):
            if type(value) is dict and value.keys() <= special:
                return self._json_values_slow(batch, index)
        return batch

    def _json_values_slow(self, batch: list[Any], start: int) -> Iterator[Any]:
        yield from islice(batch, start)
        for value in islice(batch, start, None):
            if type(value) is dict:
                if value.keys() == _ENVELOPE_KEYS:
                    self._envelopes = True
                    ident = value["id"]
                    if type(ident) is str:
                        self._last_id = ident
                    kind = value["event"]
                    if kind == END or kind == RESET:  # (``in`` a set fails on a list)
                        if kind == END:
                            self._end()
                            return
                        if not self._reset(Event(self._last_id, RESET, _text(value["data"]))):
                            return
                        continue
                    if kind == ERROR and (error := remote_error(value["data"])) is not None:
                        # A logged error (a job interrupted by a shutdown) in its envelope.
                        self._fail(error)
                        return
                    yield value["data"]
                    continue
                error = remote_error(value)
                if error is not None:
                    self._fail(error)
                    return
            yield value

    def _json_events(self, batch: list[Any]) -> Iterator[Event]:
        for value in batch:
            if type(value) is dict:
                if value.keys() == _ENVELOPE_KEYS:
                    self._envelopes = True
                    ident = value["id"]
                    if type(ident) is str:
                        self._last_id = ident
                    kind = value["event"]
                    if type(kind) is not str:
                        kind = MESSAGE
                    if kind == END:
                        self._end()
                        return
                    if kind == ERROR and (error := remote_error(value["data"])) is not None:
                        self._fail(error)
                        return
                    event = Event(self._last_id, kind, _text(value["data"]))
                    if kind == RESET:
                        self._reset(event)
                    yield event
                    continue
                error = remote_error(value)
                if error is not None:
                    self._fail(error)
                    return
            yield Event(self._last_id, MESSAGE, _text(value))

    def _sse_values(self, batch: list[Event]) -> Iterator[Any]:
        # orjson unless the read held a run of digits that may be an integer it would round
        sse = self._sse
        loads = decode_exact if sse is not None and long_digits(sse.block) else orjson.loads
        for event in batch:
            kind = event.event
            if kind != MESSAGE and kind in RESERVED_EVENTS:
                self._last_id = event.id
                if kind == END:
                    self._end()
                    return
                if kind == RESET:
                    if not self._reset(event):
                        return
                    continue
                error = _sse_remote_error(event.data)
                if error is not None:
                    self._fail(error)
                    return
            try:
                value = loads(event.data)
            except ValueError as exc:
                if event.data == DONE:
                    self._last_id = event.id
                    self._end()
                    return
                try:
                    value = loads_exact(event.data)
                except (ValueError, RecursionError):
                    self._fail(self._data_error(event, exc))
                    return
            self._last_id = event.id
            yield value

    def _data_error(self, event: Event, exc: Exception) -> DecodeError:
        # The SSE decoder counts lines when it has a counter; the event is done by now, so its
        # last line is the blank line that dispatched it.
        line = getattr(self._decoder, "line_number", 0)
        error = DecodeError(
            f"event data is not JSON ({exc}): {event.data[:80]!r}",
            line_number=line,
            line=event.data.encode(),
        )
        error.__cause__ = exc
        return error

    def _sse_events(self, batch: list[Event]) -> Iterator[Event]:
        for event in batch:
            kind = event.event
            self._last_id = event.id
            if event.data == DONE:
                yield event  # the caller asked for every event; the stream ends after it
                self._end()
                return
            if kind != MESSAGE and kind in RESERVED_EVENTS:
                if kind == END:
                    self._end()
                    return
                if kind == RESET:
                    self._reset(event)
                else:
                    error = _sse_remote_error(event.data)
                    if error is not None:
                        self._fail(error)
                        return
            yield event
