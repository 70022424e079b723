"""The asynchronous client on ``httpx``: the only module of this package that imports it.

The same API, keywords and semantics as ``stream.client.Client``, with ``async for``/``async
with``. Everything that is not I/O lives in ``protocol.py``, the connect/read/resume loop
included (``StreamState.drive``, a generator of I/O commands that the requests client runs
too), so the two clients cannot drift apart; this module performs the commands: it sends the
requests, reads the body, closes responses, translates transport errors and sleeps.

Bytes come from ``response.aiter_bytes()`` with no chunk size: httpcore hands over whatever one
socket read returned (a chunk of a chunked body, or the bytes of a close-delimited one), decoded
per ``Content-Encoding``, so each event reaches the decoder as soon as its bytes arrive. Never
``aiter_lines``/``aiter_text``: they split text, not the protocols' byte-level lines.

Transport errors are translated in one place (``_translate``) and chained with ``raise ... from``.

Deliberate differences from ``httpx`` defaults (to match the requests client):

* The client this module creates follows redirects (requests does) and puts no cap on open
  connections (each open stream holds one; httpx's default of 100 would make the 101st stream
  wait for the pool). An ``httpx.AsyncClient`` passed in is used as it is configured.
* ``timeout=(connect, read)`` becomes ``httpx.Timeout(connect=connect, read=read)``, with
  writes and the wait for a pooled connection bounded by ``connect`` (requests sends the request
  under the connect timeout too); an ``httpx.Timeout`` is taken as it is.
* The read timeout bounds more than each read, exactly as in ``stream.client`` (whose module
  docstring states the rule): receiving the complete response headers (from when the request
  was sent), and the time from one decoded item (an event or a keep-alive) to the next.
* Redirects are followed here, one hop at a time (``response.next_request``, built by httpx's
  own rules, which drop ``Authorization`` on another host), when the httpx client follows them;
  on a redirect to another origin the caller's headers are dropped too, as in
  ``stream.client``.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any, Generic, TypeVar

try:
    import httpx
except ModuleNotFoundError as exc:
    from ._extras import missing

    raise missing("aio", exc) from exc

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

__all__ = ["AsyncClient", "AsyncStream"]

T = TypeVar("T")

Timeout = float | tuple[float, float] | tuple[float, None] | httpx.Timeout | None

#: a cut connection while reading the body: a reset, or a body that ended before its framing did
_CUT_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError)

_MISSING: Any = object()


def _timeout(timeout: Timeout) -> httpx.Timeout:
    """The ``httpx.Timeout`` for the requests client's ``timeout`` argument."""
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if isinstance(timeout, tuple):
        connect, read = timeout
        return httpx.Timeout(connect=connect, read=read, write=connect, pool=connect)
    return httpx.Timeout(timeout)


def _translate(exc: BaseException, attempts: int = 0) -> StreamError:
    """The library error for an httpx error (the caller chains it)."""
    if isinstance(exc, StreamError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        return StreamTimeout(f"timed out: {exc}")
    if isinstance(exc, _CUT_ERRORS):
        return ConnectionLost(f"connection failed: {exc}", attempts=attempts)
    return StreamError(f"request failed: {exc}")


async def _close(response: httpx.Response) -> None:
    """Close a response and its connection: a half-read connection never goes back to the pool."""
    try:
        await response.aclose()
    except (httpx.HTTPError, OSError):
        pass


async def _status_error(response: httpx.Response) -> HTTPStatusError:
    """Read a bounded part of a non-2xx body, close the response, and build the error."""
    body = b""
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) >= ERROR_BODY_LIMIT:
                body = body[:ERROR_BODY_LIMIT]
                break
    except (httpx.HTTPError, OSError):
        pass  # the status is the error; a body cut short only loses detail
    finally:
        await _close(response)
    return http_status_error(response.status_code, response.reason_phrase, body, response)


async def _send(
    client: httpx.AsyncClient,
    request: httpx.Request,
    *,
    read: float | None,
    strip: Collection[str],
    stream: bool = True,
) -> httpx.Response:
    """Send ``request``, following redirects; the read timeout bounds each hop's headers."""
    hops = 0
    while True:
        try:
            async with asyncio.timeout(None) as deadline:
                if read is not None:

                    async def trace(name: str, info: Mapping[str, Any]) -> None:
                        # httpx bounds each read; the headers as a whole are bounded from here.
                        if name.endswith(".receive_response_headers.started"):
                            deadline.reschedule(asyncio.get_running_loop().time() + read)

                    request.extensions["trace"] = trace
                response = await client.send(request, stream=stream, follow_redirects=False)
        except TimeoutError as exc:
            raise httpx.ReadTimeout(
                f"no complete response headers within {read} s", request=request
            ) from exc
        following = response.next_request
        if following is None or not client.follow_redirects:
            return response
        await _close(response)
        hops += 1
        if hops > client.max_redirects:
            raise httpx.TooManyRedirects(
                f"more than {client.max_redirects} redirects", request=request
            )
        drop_on_redirect(following.headers, strip, str(request.url), str(following.url))
        request = following


class _Reader:
    """The I/O of one stream: the commands of ``StreamState.drive`` performed with httpx (kept
    apart from ``AsyncStream``, so the running generator holds no reference to its stream: a
    loop left with ``break`` drops the last reference, and asyncio's async-generator finalizer
    closes the connection)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        params: Any,
        method: str = "GET",
        json: Any = None,
        headers: Mapping[str, str],
        timeout: httpx.Timeout,
        state: StreamState,
        hooks: Hooks = NO_HOOKS,
        strip: Collection[str] = (),
    ) -> None:
        self._client = client
        self._url = url
        self._params = params
        self._method = method
        self._json = json
        # As bytes, so that a Last-Event-ID of any text can join them (httpx sends str as ASCII).
        self._headers = [(name.encode("ascii"), value.encode()) for name, value in headers.items()]
        self._timeout = timeout
        self._state = state
        self._hooks = hooks
        self._strip = strip
        self.closed = False
        self.response: httpx.Response | None = None

    async def _connect(self) -> tuple[int, str | None, httpx.Response]:
        """Send the request; a non-2xx answer raises HTTPStatusError (StreamError subclasses)."""
        headers = self._headers
        extra = self._state.request_headers()
        if extra:
            # The state's Last-Event-ID replaces one the caller put in ``headers`` (as in requests).
            names = {name.lower().encode("ascii") for name in extra}
            headers = [item for item in headers if item[0].lower() not in names]
            headers += [(name.encode("ascii"), value) for name, value in extra.items()]
        try:
            request = self._client.build_request(
                self._method,
                self._url,
                params=self._params,
                json=self._json,
                headers=headers,
                timeout=self._timeout,
            )
            response = await _send(
                self._client, request, read=self._timeout.read, strip=self._strip
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _translate(exc, self._state.policy.attempts) from exc
        self.response = response
        if self._hooks.on_response is not None:
            self._hooks.on_response(response)
        if not 200 <= response.status_code < 300:
            raise await _status_error(response)
        return response.status_code, response.headers.get("Content-Type"), response

    async def open(self) -> None:
        """The first request: send it and start the body (or raise, the response closed)."""
        status, content_type, response = await self._connect()
        try:
            body = self._state.opened(status, content_type, response)
        except StreamError:
            await _close(response)
            raise
        if not body:
            await _close(response)

    async def run(self) -> AsyncGenerator[Iterable[Any], None]:
        """The batches of values (or Events) of the whole stream, across reconnections."""
        read_timeout = self._timeout.read
        try:
            if self.response is None:
                if self.closed:
                    return
                await self.open()
            loop = asyncio.get_running_loop()
            driver = self._state.drive(
                read_timeout=read_timeout, clock=loop.time, hooks=self._hooks
            )
            answer: Any = None
            error: StreamError | None = None
            chunks: AsyncIterator[bytes] | None = None
            reading: httpx.Response | None = None
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
                        chunks = response.aiter_bytes()
                    assert chunks is not None
                    try:
                        if command.limit is None:
                            answer = await anext(chunks, b"")
                        else:
                            async with asyncio.timeout(command.limit):
                                answer = await anext(chunks, b"")
                    except (httpx.TimeoutException, TimeoutError) as exc:
                        if self.closed:
                            return
                        raise StreamTimeout(
                            f"no complete event or keep-alive within {read_timeout} s: {exc}"
                        ) from exc
                    except _CUT_ERRORS as exc:
                        if self.closed:
                            return
                        answer = Cut(exc)
                        continue
                    except httpx.StreamClosed:
                        # ``aclose()`` from another task closed the response under the read.
                        if self.closed:
                            return
                        raise
                    except httpx.HTTPError as exc:
                        # A broken Content-Encoding, say: not a cut, and resuming would not help.
                        raise _translate(exc) from exc
                    if not answer and self.closed:
                        return
                elif isinstance(command, Deliver):
                    yield command.batch
                    answer = None
                elif isinstance(command, Release):
                    if self.response is not None:
                        await _close(self.response)
                    answer = None
                elif isinstance(command, Pause):
                    await asyncio.sleep(command.seconds)
                    if self.closed:
                        return
                    answer = None
                else:  # Connect
                    try:
                        answer = await self._connect()
                    except StreamError as exc:
                        error = exc
        finally:
            if self.response is not None:
                await _close(self.response)


class AsyncStream(Generic[T]):
    """One streaming request: ``async for`` it for values (or Events); an async context manager
    that closes it.

    The request is sent on ``__aenter__`` or at the first iteration, whichever comes first; a
    dropped connection is resumed per the state's policy. Iterating twice continues where the
    first loop stopped. ``aclose()`` closes the connection; cancelling the task that iterates
    closes it too.
    """

    def __init__(self, reader: _Reader, state: StreamState) -> None:
        self._reader = reader
        self._state = state
        self._batches = reader.run()
        self._items: Iterator[T] = iter(())

    @property
    def response(self) -> httpx.Response | None:
        """The current response (the latest one after a reconnection), None before the request."""
        return self._reader.response

    @property
    def last_event_id(self) -> str:
        """The id of the latest event delivered (what a resume sends as ``Last-Event-ID``)."""
        return self._state.last_event_id

    def __aiter__(self) -> AsyncStream[T]:
        return self

    async def __anext__(self) -> T:
        # The common case, a value left in the current batch, costs one ``next`` and no await.
        item = next(self._items, _MISSING)
        if item is not _MISSING:
            return item
        batches = self._batches
        while True:
            # Ends with StopAsyncIteration, or raises the stream's error, once the batches do.
            items: Iterator[T] = iter(await batches.__anext__())
            item = next(items, _MISSING)
            if item is not _MISSING:
                self._items = items
                return item

    async def __aenter__(self) -> AsyncStream[T]:
        reader = self._reader
        if reader.response is None and not reader.closed:
            try:
                await reader.open()
            except BaseException:
                await self.aclose()
                raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; iterating afterwards ends at once."""
        reader = self._reader
        reader.closed = True
        self._items = iter(())
        try:
            await self._batches.aclose()
        except RuntimeError:
            # Iterated by another task right now: closing its response wakes its read, and its
            # own ``finally`` ends the generator.
            pass
        if reader.response is not None:
            await _close(reader.response)


class AsyncClient(ClientSettings):
    """A streaming client for one service (``base_url``), on one ``httpx.AsyncClient``.

    Keywords: ``session``/``client`` (created and closed by this client when not given),
    ``timeout``, ``reconnect`` (None: resume once the server sent an id), ``headers`` (sent with
    every request, dropped on a redirect to another origin), ``max_attempts`` (resuming
    attempts in a row that deliver nothing before ``ConnectionLost``; None: never give up),
    ``backoff_initial`` and ``backoff_max`` (the wait before a resume: full jitter up to
    ``backoff_max``; a server's ``retry:`` is honoured up to ``backoff_max`` too, 30 s by
    default).

    ``timeout=(connect, read)`` (a number is both; None: no bound):

    * ``connect`` bounds connecting and sending the request;
    * ``read`` bounds receiving the complete response headers, and the time from one decoded
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
        client: httpx.AsyncClient | None = None,
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
        self._owns_client = client is None
        self.client = (
            client
            if client is not None
            else httpx.AsyncClient(
                follow_redirects=True,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
            )
        )
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the httpx client if this client created it."""
        if self._owns_client:
            await self.client.aclose()

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
    ) -> AsyncStream[Any]:
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
    ) -> AsyncStream[Event]:
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
    ) -> AsyncStream[Any]:
        merged = request_headers(self.headers, headers, format)
        state = self._new_state(
            mode, last_event_id=last_event_id, reconnect=reconnect, on_reset=on_reset
        )
        reader = _Reader(
            self.client,
            self.url(path),
            params=params,
            method=method,
            json=json,
            headers=merged,
            timeout=_timeout(timeout if timeout is not None else self.timeout),
            state=state,
            hooks=hooks,
            strip=stripped_on_redirect(self.headers, headers),
        )
        return AsyncStream(reader, state)

    async def publish(
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
        timeout = _timeout(self.timeout)
        try:
            request = self.client.build_request(
                "POST",
                self.url(path),
                params=params,
                content=body,
                headers=headers,
                timeout=timeout,
            )
            response = await _send(
                self.client,
                request,
                read=timeout.read,
                strip=stripped_on_redirect(headers),
                stream=False,
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise _translate(exc) from exc
        return publish_ids(response.status_code, response.reason_phrase, response.content, response)
