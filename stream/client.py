"""The synchronous client on ``requests``: the only module of this package that imports it.

Everything that is not I/O lives in ``protocol.py``, the connect/read/resume loop included
(``StreamState.drive``, a generator of I/O commands that the httpx client runs too); this module
performs the commands: it sends the requests, reads the body, closes responses, translates
transport errors and sleeps between attempts.

Bytes come only from ``response.raw.read1(256 KiB, decode_content=True)``: urllib3's ``read1``
returns as soon as *some* bytes are there (chunked or close-delimited), so each event reaches
the caller as soon as its bytes arrive, and a busy stream is read in large slices. Never
``iter_lines``/``iter_content``: they wait for a full chunk of their size on non-chunked bodies.

Transport errors are translated in one place (``_translate``) and chained with ``raise ... from``.

Timeouts, ``timeout=(connect, read)`` as in requests (a number is both):

* ``connect`` bounds connecting (and sending the request);
* ``read`` bounds receiving the complete response headers, counted from when the request was
  sent (requests alone bounds each ``recv``, so a server that trickles its headers a byte at a
  time holds it forever; the bound needs the client's own session, or a ``DeadlineAdapter``
  mounted on the session passed in), and the time from one decoded item of the body to the
  next, an item being an event or a keep-alive: a server that stays silent, or that trickles
  bytes without ever completing one, gets ``StreamTimeout`` ``read`` seconds after the last
  item. Time the caller spends between two items is not counted.

Redirects are followed as requests does (``Authorization`` dropped on another host), and on a
redirect to another origin (scheme, host, port) every header the caller gave (``headers=`` of
the ``Client`` or of the call) is dropped too, except ``Accept`` and ``Content-Type``, which say
what is asked and sent, not who asks: an ``X-Api-Key`` never reaches another host.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from itertools import chain
from typing import Any, Generic, TypeVar
from urllib.parse import urljoin

try:
    import requests
    import requests.adapters
    import urllib3.connection
    import urllib3.connectionpool
    import urllib3.exceptions
    import urllib3.response
except ModuleNotFoundError as exc:
    from ._extras import missing

    raise missing("client", exc) from exc

from .errors import ConnectionLost, HTTPStatusError, StreamError, StreamTimeout
from .event import Event
from .protocol import (
    ERROR_BODY_LIMIT,
    EVENTS,
    NO_HOOKS,
    VALUES,
    ClientSettings,
    Cut,
    Deliver,
    Hooks,
    Mode,
    Pause,
    Read,
    Release,
    StreamState,
    drop_on_redirect,
    http_status_error,
    publish_ids,
    publish_request,
    request_headers,
    stripped_on_redirect,
)

__all__ = ["Client", "DeadlineAdapter", "Stream"]

T = TypeVar("T")

#: bytes asked of each ``read1``: large, so a busy stream costs few calls; ``read1`` returns early
READ_SIZE = 256 * 1024

Timeout = float | tuple[float, float] | tuple[float, None] | None

#: a cut connection while reading the body (urllib3 wraps socket errors in ProtocolError)
_CUT_ERRORS = (
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.SSLError,
    http.client.HTTPException,
    OSError,
)
_TIMEOUT_ERRORS = (
    requests.Timeout,
    urllib3.exceptions.TimeoutError,
    socket.timeout,
)


def _reason(exc: BaseException) -> str:
    """The useful part of a requests error: urllib3's innermost reason, not the retry wrapper."""
    inner = exc.args[0] if exc.args else None
    if isinstance(inner, urllib3.exceptions.MaxRetryError) and inner.reason is not None:
        return _without_connection(inner.reason)
    return str(exc)


def _without_connection(exc: BaseException) -> str:
    """urllib3's message with ``host:port`` where it names its connection object.

    urllib3 writes the connection's class into connect errors (ours: ``_HeadersDeadline``,
    or a whole repr in a tuple for a connect timeout); a user wants to read where it failed.
    """
    args = exc.args
    if len(args) == 2 and isinstance(args[0], urllib3.connection.HTTPConnection):
        return f"{args[0].host}:{args[0].port}: {args[1]}"  # ConnectTimeoutError(conn, message)
    text = str(exc)
    conn = getattr(exc, "conn", None)  # NewConnectionError: "<conn>: <message>"
    if isinstance(conn, urllib3.connection.HTTPConnection):
        text = text.replace(str(conn), f"{conn.host}:{conn.port}", 1)
    return text


def _translate(exc: BaseException, attempts: int = 0) -> StreamError:
    """The library error for a requests/urllib3/socket error (the caller chains it)."""
    if isinstance(exc, StreamError):
        return exc
    if isinstance(exc, _TIMEOUT_ERRORS):
        # requests.ConnectTimeout is also a ConnectionError: a timeout first.
        return StreamTimeout(f"timed out: {_reason(exc)}")
    if isinstance(exc, (requests.ConnectionError, *_CUT_ERRORS)):
        return ConnectionLost(f"connection failed: {_reason(exc)}", attempts=attempts)
    return StreamError(f"request failed: {_reason(exc)}")


def _read_timeout(timeout: Timeout) -> float | None:
    """The read part of a requests ``timeout``."""
    if isinstance(timeout, tuple):
        return timeout[1]
    return timeout


class _HeadersDeadline(urllib3.connection.HTTPConnection):
    """A connection whose response headers must all arrive within the read timeout."""

    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        # urllib3 sets ``timeout`` to the read timeout just before this call; http.client uses
        # it per recv, so a server that trickles its headers would never time out.
        timeout = self.timeout
        sock = self.sock
        if not isinstance(timeout, int | float) or sock is None:
            return super().getresponse()
        lock = threading.Lock()
        state = {"done": False, "fired": False}

        def expire() -> None:
            with lock:
                if state["done"]:
                    return
                state["fired"] = True
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recv
            except OSError:
                pass

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            response = super().getresponse()
        except (OSError, http.client.HTTPException) as exc:
            if state["fired"]:
                # urllib3 turns a socket timeout into its ReadTimeoutError (requests.ReadTimeout).
                raise TimeoutError(f"no complete response headers within {timeout} s") from exc
            raise
        finally:
            with lock:
                state["done"] = True
            timer.cancel()
        return response


class _HeadersDeadlineTLS(_HeadersDeadline, urllib3.connection.HTTPSConnection):
    """The HTTPS twin of ``_HeadersDeadline``."""


class _Pool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _HeadersDeadline


class _TLSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _HeadersDeadlineTLS


_POOLS: dict[str, type[urllib3.connectionpool.HTTPConnectionPool]] = {
    "http": _Pool,
    "https": _TLSPool,
}


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose read timeout also bounds receiving the whole response headers.

    ``Client`` mounts it on the session it creates; mount it on a session you pass in
    (``session.mount("http://", DeadlineAdapter())``, likewise ``https://``) for the same bound.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


def _redirect_hook(names: Collection[str]) -> Callable[..., requests.Response]:
    """A response hook that drops the caller's headers before a redirect to another origin.

    requests builds each redirected request from the previous one after the response hooks
    ran, so removing the names from the request that was just answered removes them from the
    next (Session.resolve_redirects).
    """

    def hook(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        location = response.headers.get("Location") if response.is_redirect else None
        request = response.request
        if location and request is not None and request.url:
            target = urljoin(response.url or request.url, location)
            drop_on_redirect(request.headers, names, request.url, target)
        return response

    return hook


def _socket(response: requests.Response) -> socket.socket | None:
    """The response's socket (to bound a read by the time left), None if urllib3 hides it."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _shutdown(response: requests.Response) -> None:
    """Shut the response's socket down, so that a read blocked in another thread returns."""
    try:
        response.raw.shutdown()  # urllib3 >= 2.3
    except (AttributeError, ValueError, RuntimeError, OSError):
        pass  # older urllib3, or already closed or released: nothing is blocked on it


def _close(response: requests.Response) -> None:
    """Close a response and its connection: a half-read connection never goes back to the pool."""
    try:
        response.close()
    except (OSError, urllib3.exceptions.HTTPError):
        pass


class _Reader:
    """The I/O of one stream: the commands of ``StreamState.drive`` performed with requests
    (kept apart from ``Stream``, so the running generator holds no reference to its
    ``Stream``: a loop left with ``break`` drops the last reference to the generator, whose
    ``finally`` closes the connection at once)."""

    def __init__(
        self,
        session: requests.Session,
        url: str,
        *,
        params: Any,
        method: str = "GET",
        json: Any = None,
        headers: dict[str, str | bytes],
        timeout: Timeout,
        state: StreamState,
        hooks: Hooks,
        strip: Collection[str] = (),
    ) -> None:
        self._session = session
        self._url = url
        self._params = params
        self._method = method
        self._json = json
        self._headers = headers
        self._timeout = timeout
        self._state = state
        self._hooks = hooks
        self._redirect_hooks = {"response": [_redirect_hook(strip)]} if strip else None
        self._closed = False
        self.response: requests.Response | None = None

    def _connect(self) -> tuple[int, str | None, requests.Response]:
        """Send the request; a non-2xx answer raises HTTPStatusError (StreamError subclasses)."""
        headers = dict(self._headers)
        headers.update(self._state.request_headers())
        try:
            response = self._session.request(
                self._method,
                self._url,
                params=self._params,
                json=self._json,
                headers=headers,
                stream=True,
                timeout=self._timeout,
                hooks=self._redirect_hooks,
            )
        except requests.RequestException as exc:
            raise _translate(exc, self._state.policy.attempts) from exc
        self.response = response
        if self._hooks.on_response is not None:
            self._hooks.on_response(response)
        if not 200 <= response.status_code < 300:
            raise _status_error(response)
        return response.status_code, response.headers.get("Content-Type"), response

    def open(self) -> None:
        """The first request: send it and start the body (or raise, the response closed)."""
        status, content_type, response = self._connect()
        try:
            body = self._state.opened(status, content_type, response)
        except StreamError:
            _close(response)
            raise
        if not body:
            _close(response)

    def run(self) -> Generator[Iterable[Any], None, None]:
        """The batches of values (or Events) of the whole stream, across reconnections."""
        read_timeout = _read_timeout(self._timeout)
        try:
            if self.response is None:
                if self._closed:
                    return
                self.open()
            driver = self._state.drive(
                read_timeout=read_timeout, clock=time.monotonic, hooks=self._hooks
            )
            answer: Any = None
            error: StreamError | None = None
            read1: Callable[..., bytes] | None = None
            reading: requests.Response | None = None
            sock: socket.socket | None = None
            limited = False  # the socket's timeout is a deadline's remainder, not read_timeout
            while True:
                try:
                    if error is not None:
                        command = driver.throw(error)
                        error = None
                    else:
                        command = driver.send(answer)
                except StopIteration:
                    return
                if isinstance(command, Read):
                    response = self.response
                    assert response is not None
                    if response is not reading:
                        reading = response
                        read1 = response.raw.read1
                        sock = _socket(response) if read_timeout is not None else None
                        limited = False
                    assert read1 is not None
                    limit = command.limit
                    if sock is not None and (limit is not None or limited):
                        sock.settimeout(limit if limit is not None else read_timeout)
                        limited = limit is not None
                    try:
                        answer = read1(READ_SIZE, decode_content=True)
                    except _TIMEOUT_ERRORS as exc:
                        if self._closed:
                            return
                        raise StreamTimeout(
                            f"no complete event or keep-alive within {read_timeout} s: {exc}"
                        ) from exc
                    except _CUT_ERRORS as exc:
                        if self._closed:
                            return
                        answer = Cut(exc)
                        continue
                    except (AttributeError, ValueError):
                        # http.client's file vanished under the read: close() from a thread.
                        if self._closed:
                            return
                        raise
                    if not answer and self._closed:
                        return
                elif isinstance(command, Deliver):
                    yield command.batch
                    answer = None
                elif isinstance(command, Release):
                    if self.response is not None:
                        _close(self.response)
                    answer = None
                elif isinstance(command, Pause):
                    time.sleep(command.seconds)
                    if self._closed:
                        return
                    answer = None
                else:  # Connect
                    try:
                        answer = self._connect()
                    except StreamError as exc:
                        error = exc
        finally:
            if self.response is not None:
                _close(self.response)


class Stream(Generic[T]):
    """One streaming request: iterate it for values (or Events); a context manager that closes it.

    The request is sent on ``__enter__`` or at the first iteration, whichever comes first; a
    dropped connection is resumed per the state's policy. Iterating twice continues where the
    first loop stopped. ``close()`` closes the connection (from any thread too).
    """

    def __init__(self, reader: _Reader, state: StreamState) -> None:
        self._reader = reader
        self._state = state
        self._batches = reader.run()
        # Batches are lists (or small generators); chain hands their items out at C speed.
        self._items: Iterator[T] = chain.from_iterable(self._batches)

    @property
    def response(self) -> requests.Response | None:
        """The current response (the latest one after a reconnection), None before the request."""
        return self._reader.response

    @property
    def last_event_id(self) -> str:
        """The id of the latest event delivered (what a resume sends as ``Last-Event-ID``)."""
        return self._state.last_event_id

    def __iter__(self) -> Iterator[T]:
        return self._items

    def __enter__(self) -> Stream[T]:
        reader = self._reader
        if reader.response is None and not reader._closed:
            try:
                reader.open()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; iterating afterwards ends at once."""
        reader = self._reader
        reader._closed = True
        response = reader.response
        try:
            self._batches.close()
        except ValueError:
            # Reading in another thread: wake its blocked read (its own ``finally`` closes the
            # response; closing http.client's file under a running read breaks it midway).
            if response is not None:
                _shutdown(response)
            return
        if response is not None:
            _close(response)


def _status_error(response: requests.Response) -> HTTPStatusError:
    """Read a bounded part of a non-2xx body, close the response, and build the error."""
    try:
        body = response.raw.read(ERROR_BODY_LIMIT, decode_content=True) or b""
    except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException):
        body = b""
    finally:
        _close(response)
    return http_status_error(response.status_code, response.reason or "", body, response)


class Client(ClientSettings):
    """A streaming client for one service (``base_url``), on one ``requests.Session``.

    Keywords: ``session``/``client`` (created and closed by this client when not given),
    ``timeout``, ``reconnect`` (None: resume once the server sent an id), ``headers`` (sent with
    every request, dropped on a redirect to another origin), ``max_attempts`` (resuming
    attempts in a row that deliver nothing before ``ConnectionLost``; None: never give up),
    ``backoff_initial`` and ``backoff_max`` (the wait before a resume: full jitter up to
    ``backoff_max``; a server's ``retry:`` is honoured up to ``backoff_max`` too, 30 s by
    default).

    ``timeout=(connect, read)`` (a number is both; None: no bound):

    * ``connect`` bounds connecting and sending the request;
    * ``read`` bounds receiving the complete response headers (on
      a session passed in, with ``DeadlineAdapter`` mounted), and the time from one decoded
      item of the body to the next, an item being an event (a value) or a keep-alive. Bytes
      that arrive without completing an item do not count: a server that trickles a byte a
      second without ever finishing an event gets ``StreamTimeout`` ``read`` seconds after
      the last item, like a silent one. The time the caller spends between two items is not
      counted.
    """

    def __init__(
        self,
        base_url: str = "",
        *,
        session: requests.Session | None = None,
        timeout: Timeout = (10.0, 60.0),
        reconnect: bool | None = None,
        headers: Mapping[str, str] | None = None,
        max_attempts: int | None = 10,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        super().__init__(
            base_url,
            reconnect=reconnect,
            headers=headers,
            max_attempts=max_attempts,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
        )
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            session.mount("http://", DeadlineAdapter())
            session.mount("https://", DeadlineAdapter())
        self.session = session
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session if this client created it."""
        if self._owns_session:
            self.session.close()

    def stream(
        self,
        path: str,
        *,
        params: Any = None,
        method: str = "GET",
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        format: str | None = None,
        last_event_id: str | None = None,
        reconnect: bool | None = None,
        timeout: Timeout = None,
        on_reset: Callable[[Event], object] | None = None,
    ) -> Stream[Any]:
        """Stream the decoded JSON values at ``path`` (for jobs and channels: each ``data``).

        ``method`` and ``json`` send another request than a GET (an OpenAI-style POST with a
        JSON body); a resume sends the same request again, with ``Last-Event-ID``.
        """
        return self._stream(
            VALUES,
            path,
            params=params,
            method=method,
            json=json,
            headers=headers,
            format=format,
            last_event_id=last_event_id,
            reconnect=reconnect,
            timeout=timeout,
            on_reset=on_reset,
        )

    def events(
        self,
        path: str,
        *,
        params: Any = None,
        method: str = "GET",
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        format: str | None = None,
        last_event_id: str | None = None,
        reconnect: bool | None = None,
        timeout: Timeout = None,
        on_reset: Callable[[Event], object] | None = None,
    ) -> Stream[Event]:
        """Stream the ``Event``s at ``path`` (id, type, raw data text, retry), resets included."""
        return self._stream(
            EVENTS,
            path,
            params=params,
            method=method,
            json=json,
            headers=headers,
            format=format,
            last_event_id=last_event_id,
            reconnect=reconnect,
            timeout=timeout,
            on_reset=on_reset,
        )

    def _stream(
        self,
        mode: Mode,
        path: str,
        *,
        params: Any = None,
        method: str = "GET",
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        format: str | None = None,
        last_event_id: str | None = None,
        reconnect: bool | None = None,
        timeout: Timeout = None,
        on_reset: Callable[[Event], object] | None = None,
        hooks: Hooks = NO_HOOKS,
    ) -> Stream[Any]:
        merged: dict[str, str | bytes] = {**request_headers(self.headers, headers, format)}
        state = self._new_state(
            mode, last_event_id=last_event_id, reconnect=reconnect, on_reset=on_reset
        )
        reader = _Reader(
            self.session,
            self.url(path),
            params=params,
            method=method,
            json=json,
            headers=merged,
            timeout=timeout if timeout is not None else self.timeout,
            state=state,
            hooks=hooks,
            strip=stripped_on_redirect(self.headers, headers),
        )
        return Stream(reader, state)

    def publish(
        self,
        channel: str,
        *values: Any,
        event: str | None = None,
        token: str | None = None,
    ) -> list[str]:
        """Publish values to a channel (``POST /channels/<name>``) and return their ids."""
        path, body, headers, params = publish_request(
            channel, values, event=event, token=token, headers=self.headers
        )
        strip = stripped_on_redirect(headers)
        try:
            response = self.session.post(
                self.url(path),
                params=params,
                data=body,
                headers=headers,
                timeout=self.timeout,
                hooks={"response": [_redirect_hook(strip)]} if strip else None,
            )
        except requests.RequestException as exc:
            raise _translate(exc) from exc
        with response:
            return publish_ids(
                response.status_code, response.reason or "", response.content, response
            )
