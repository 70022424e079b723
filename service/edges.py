"""Where a request meets the service before any stream starts: errors, authorization,
request bodies, CORS."""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any

from flask import request
from werkzeug.datastructures import Headers
from werkzeug.wsgi import get_input_stream

from stream.runners import gevent_active


class BadRequest(Exception):
    """A request value the service refuses: answered as a 4xx JSON error."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "bad_request",
        status: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.headers = headers or {}


# -- authorization ----------------------------------------------------------------------------

#: RFC 7239 ``for=`` parameter of a ``Forwarded`` element (quoted or not)
_FORWARDED_FOR_RE = re.compile(r'(?:^|;)\s*for\s*=\s*("[^"]*"|[^;,\s]*)', re.IGNORECASE)


def _is_loopback(address: str | None) -> bool:
    if address is None:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    # A dual-stack socket ([::]) reports IPv4 clients as ::ffff:a.b.c.d.
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _node_is_loopback(node: str) -> bool:
    """Whether one address a proxy header names is a loopback address (fail closed).

    Proxies write ``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:80`` or ``::1``; RFC 7239 also allows
    ``unknown`` and obfuscated names (``_hidden``): anything that is not a loopback address,
    including what cannot be parsed, counts as another address.
    """
    node = node.strip().strip('"').strip()
    if node.startswith("["):
        node = node[1:].partition("]")[0]
    elif node.count(":") == 1:
        node = node.partition(":")[0]  # IPv4 with a port
    return _is_loopback(node)


def relayed_from_elsewhere(headers: Headers) -> bool:
    """Whether a proxy says this request came from an address other than loopback.

    A proxy on the same host (nginx, as the README sets it up) connects from 127.0.0.1: without
    this, every client behind it would count as local. ``X-Forwarded-For`` and ``X-Real-IP``
    (any element) and ``Forwarded`` (any ``for=``) that name a non-loopback address make the
    request a relayed one. Headers a client sent itself through such a proxy are still seen:
    proxies append the real address to ``X-Forwarded-For`` (``$proxy_add_x_forwarded_for``).
    """
    for name in ("X-Forwarded-For", "X-Real-IP"):
        for value in headers.getlist(name):
            if any(part.strip() and not _node_is_loopback(part) for part in value.split(",")):
                return True
    for value in headers.getlist("Forwarded"):
        for element in value.split(","):
            for match in _FORWARDED_FOR_RE.finditer(element):
                if not _node_is_loopback(match[1]):
                    return True
    return False


def authorize(token: str | None, action: str) -> None:
    """Let a publish or a job start through, or raise the 401/403 it gets.

    With ``token`` the request needs ``Authorization: Bearer <token>`` (compared in constant
    time); without, only a loopback client that no proxy relayed from elsewhere may.
    """
    if token:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credentials.strip().encode(), token.encode()
        ):
            raise BadRequest(
                f"{action} needs the bearer token",
                code="unauthorized",
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="stream"'},
            )
    elif not _is_loopback(request.remote_addr) or relayed_from_elsewhere(request.headers):
        raise BadRequest(
            f"without STREAM_PUBLISH_TOKEN only loopback clients may {action}",
            code="forbidden",
            status=403,
        )


# -- request bodies ---------------------------------------------------------------------------

#: environ keys: the body was read to its end / the connection must close after the response
_BODY_DONE = "stream.body_done"
_CLOSE = "stream.close_connection"
#: bytes read from the input per call
_READ_SIZE = 64 * 1024


def _has_body() -> bool:
    return bool(request.content_length) or "Transfer-Encoding" in request.headers


def _read_input(keep: int, discard: int, timeout: float) -> tuple[bytes, int, bool]:
    """Read the request body within ``timeout`` s: the first ``keep`` bytes kept, then up to
    ``discard`` more thrown away. Returns (kept, bytes read, whether the body ended).

    Raises ``TimeoutError`` when the body did not end in time. Under gevent (gunicorn's worker)
    a ``gevent.Timeout`` bounds the whole read, however the bytes trickle in. Without gevent
    (Flask's development server, test clients, whose bodies are in memory) there is no bound
    here: the development server is not for the internet, and a bound per ``recv`` would not
    stop a trickle anyway.
    """
    # Chunked bodies too: gunicorn terminates its input (wsgi.input_terminated), Content-Length
    # bodies are bounded by their length; a server that does neither gives an empty stream.
    stream = get_input_stream(request.environ, safe_fallback=True, max_content_length=None)
    chunks: list[bytes] = []
    total = 0
    timer = None
    if gevent_active() and timeout > 0:
        import gevent  # only once gevent patched the process: never imported by the dev server

        timer = gevent.Timeout(timeout)
        timer.start()
    try:
        while total < keep + discard + 1:
            chunk = stream.read(min(_READ_SIZE, keep + discard + 1 - total))
            if not chunk:
                request.environ[_BODY_DONE] = True
                return b"".join(chunks), total, True
            if total < keep:
                chunks.append(chunk[: keep - total])
            total += len(chunk)
        return b"".join(chunks), total, False
    except BaseException as exc:
        if timer is not None and exc is timer:
            raise TimeoutError("the request body did not arrive in time") from None
        raise
    finally:
        if timer is not None:
            timer.close()


def read_body(limit: int, timeout: float) -> bytes:
    """The request body: 413 above ``limit`` bytes (nothing of it used), 408 after ``timeout`` s.

    Werkzeug's ``get_data()`` is not used: with a chunked body over ``MAX_CONTENT_LENGTH`` it
    returned the first ``limit`` bytes as if they were the whole body (a half publish).
    """
    too_large = BadRequest(
        f"the request body is larger than {limit:,} bytes",
        code="request_entity_too_large",
        status=413,
    )
    drain = 4 * limit + _READ_SIZE
    length = request.content_length
    if length is not None and length > limit + drain:
        # Too big to even read and throw away: answer at once and close the connection.
        request.environ[_CLOSE] = True
        raise too_large
    incomplete = BadRequest(
        "the request body ended before it was complete (the connection was cut)",
        code="incomplete_body",
    )
    try:
        body, total, ended = _read_input(limit, drain, timeout)
    except TimeoutError:
        request.environ[_CLOSE] = True
        raise BadRequest(
            f"the request body did not arrive within {timeout:g} s",
            code="request_timeout",
            status=408,
        ) from None
    except OSError:
        # gunicorn's chunked reader raises at a premature end (NoMoreData is an IOError).
        request.environ[_CLOSE] = True
        raise incomplete from None
    if length is not None and ended and total < length:
        # gunicorn's Content-Length reader returns a body cut short as if it were whole:
        # publishing it would publish part of a batch.
        request.environ[_CLOSE] = True
        raise incomplete
    if total > limit:
        # Read to its end (the client is then not reset while it still sends) and refused.
        if not ended:
            request.environ[_CLOSE] = True
        raise too_large
    return body


def discard_body(limit: int, timeout: float) -> None:
    """Read and throw away a body nobody read (a refusal), or mark the connection to close.

    A server that closes a connection with unread bytes in it sends a reset, and the client may
    never see the answer; a server that keeps it must read the rest first, unbounded. So: read
    what is left within the body's bounds, and close the connection when that was not enough.
    """
    environ = request.environ
    if environ.get(_BODY_DONE) or environ.get(_CLOSE) or not _has_body():
        return
    length = request.content_length
    if length is not None and length > 4 * limit + _READ_SIZE:
        environ[_CLOSE] = True
        return
    try:
        _, _, ended = _read_input(0, 4 * limit + _READ_SIZE, timeout)
    except OSError:  # the client went away meanwhile, or the rest was too slow (TimeoutError)
        ended = False
    if not ended:
        environ[_CLOSE] = True


def close_connection_when_asked(
    app: Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]],
) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """WSGI middleware: close the connection after a response whose request asked for it.

    An application may not set ``Connection`` (a hop-by-hop header, PEP 3333) and gunicorn
    drops it; gunicorn's ``start_response`` is a method of its response object, whose
    ``force_close()`` makes it send ``Connection: close`` and close. Werkzeug's development
    server closes every connection anyway; elsewhere this is a no-op.
    """

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if environ.get(_CLOSE):
                owner = getattr(start_response, "__self__", None)
                force_close = getattr(owner, "force_close", None)
                if callable(force_close):
                    force_close()
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wsgi


# -- CORS -------------------------------------------------------------------------------------

CORS_METHODS = "GET, POST, HEAD, OPTIONS"
CORS_REQUEST_HEADERS = "Last-Event-ID, Authorization, Content-Type, Accept"
#: response headers a page needs beyond the CORS-safelisted ones (Content-Type is one of those)
CORS_EXPOSED = "Location, Retry-After, WWW-Authenticate"
#: how long a browser may cache a preflight's answer (Chromium caps it at 2 hours)
CORS_MAX_AGE = "600"


def parse_origins(value: str | None) -> frozenset[str] | None:
    """``STREAM_CORS_ORIGINS``: ``None`` (no CORS), or the allowed origins (``*``: any)."""
    if not value or not value.strip():
        return None
    # Browsers send an origin as scheme://host[:port], lowercase, no trailing slash.
    return frozenset(o.strip().rstrip("/").lower() for o in value.split(",") if o.strip())


def cors_allows(origins: frozenset[str] | None, origin: str | None) -> bool:
    """Whether a page of ``origin`` may read this service's answers."""
    if origins is None or not origin or origin == "null":
        return False
    return "*" in origins or origin.lower() in origins
