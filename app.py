"""The reference service: ``create_app(config=None)`` builds the Flask app (``wsgi.py`` serves it).

Configuration comes from the environment here and nowhere else (``gunicorn.conf.py`` reads the
server's own settings); ``config`` overrides it, which is how the tests build apps.

The edges, where a request meets the service before any stream starts:

- Request bodies are read here, not by Werkzeug: at most ``MAX_CONTENT_LENGTH`` bytes are kept
  (413 above, with or without a ``Content-Length``; a chunked body over the limit is refused
  whole, never cut), and the whole body must arrive within ``STREAM_BODY_TIMEOUT`` seconds (408,
  and the connection is closed). A body the service does not want (a refusal before reading it)
  is read and thrown away within the same bounds, so the answer reaches the client instead of a
  reset; past those bounds the connection is closed instead.
- Publishing and starting jobs need the same authorization (``authorize``): the bearer token
  when ``STREAM_PUBLISH_TOKEN`` is set, else a loopback client that no proxy relayed.
- Jobs hold a lease on their status (``Jobs``): a job that dies without an end (its worker
  killed, its broker failing) leaves a status that expires, and its readers end with an error
  event instead of waiting forever.
- ``STREAM_CORS_ORIGINS`` lets pages of other origins read streams and publish.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import orjson
from flask import Flask, Response, request, send_from_directory
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import get_input_stream

from stream import metrics
from stream.broker import (
    Broker,
    BrokerUnavailable,
    IdTuple,
    SlowConsumer,
    Subscription,
    create_broker,
    parse_id,
)
from stream.encoders import dumps_compact
from stream.errors import RemoteError
from stream.event import Envelope
from stream.server import (
    Unfinished,
    error_response,
    on_shutdown,
    open_streams,
    stream_response,
)

log = logging.getLogger("stream.app")

#: The seed's four messages: ``GET /events`` sends them by default.
SEED_MESSAGES = ("some data", "some more data", "and more", "finally the end")

NAME_RE = re.compile(r"[A-Za-z0-9_\-.:]{1,128}")
EVENT_TYPE_RE = re.compile(r"[A-Za-z0-9_\-.:]{1,64}")
JOB_ID_RE = re.compile(r"[0-9a-f]{32}")
INT_RE = re.compile(r"[0-9]{1,10}")
DECIMAL_RE = re.compile(r"[0-9]{1,6}(\.[0-9]{1,9})?|\.[0-9]{1,9}")
#: event types the protocol itself uses; publishers may not send them
RESERVED_EVENTS = frozenset({"end", "reset", "error"})

MAX_COUNT, MAX_INTERVAL, MAX_SIZE = 10_000_000, 60.0, 1_000_000


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


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def default_config() -> dict[str, Any]:
    """The service's settings, read from the environment, with defaults that work on a laptop."""
    return {
        "REDIS_URL": os.environ.get("REDIS_URL") or None,
        "STREAM_PUBLISH_TOKEN": os.environ.get("STREAM_PUBLISH_TOKEN") or None,
        "STREAM_HEARTBEAT": _env_float("STREAM_HEARTBEAT", 15.0),
        # a client that stops reading is cut off after this long without progress
        "STREAM_WRITE_TIMEOUT": _env_float("STREAM_WRITE_TIMEOUT", 30.0),
        # request bodies above this get 413
        "MAX_CONTENT_LENGTH": int(_env_float("STREAM_MAX_BODY", 1024 * 1024)),
        # a request body that has not fully arrived after this many seconds gets 408: a client
        # trickling its body would otherwise hold a connection (and a greenlet) for ever
        "STREAM_BODY_TIMEOUT": _env_float("STREAM_BODY_TIMEOUT", 10.0),
        # jobs running at once in a worker before POST /jobs gets 503 + Retry-After. A job
        # without an interval is CPU-bound and shares the worker's one core with every stream:
        # past a few dozen, more jobs finish no sooner and only add memory (each holds a batch
        # of up to 1,000 events being published); 64 leaves room for paced jobs, which mostly
        # sleep
        "STREAM_MAX_JOBS": int(_env_float("STREAM_MAX_JOBS", 64)),
        # a job whose broker keeps failing gives up after this many seconds (error event,
        # status "failed"); Redis failovers and restarts take less
        "STREAM_JOB_BROKER_TIMEOUT": _env_float("STREAM_JOB_BROKER_TIMEOUT", 20.0),
        # origins (comma-separated, or *) whose pages may read streams and publish; unset: none
        "STREAM_CORS_ORIGINS": os.environ.get("STREAM_CORS_ORIGINS") or None,
        # retention of job and channel logs: entries and seconds
        "STREAM_HISTORY_LENGTH": int(_env_float("STREAM_HISTORY_LENGTH", 10_000)),
        "STREAM_HISTORY_AGE": _env_float("STREAM_HISTORY_AGE", 3600.0),
        # how long a finished job's events stay readable
        "STREAM_JOB_TTL": _env_float("STREAM_JOB_TTL", 3600.0),
        # entries a subscriber may fall behind before it is cut off (it resumes by id)
        "STREAM_QUEUE_SIZE": int(_env_float("STREAM_QUEUE_SIZE", 10_000)),
        # bytes the in-process broker retains across all logs (oldest entries go first); Redis
        # is bounded by its own maxmemory
        "STREAM_HISTORY_BYTES": int(_env_float("STREAM_HISTORY_BYTES", 256 * 1024 * 1024)),
        # open streams per worker before new ones get 503 + Retry-After
        "STREAM_MAX_STREAMS": int(_env_float("STREAM_MAX_STREAMS", 10_000)),
        # 0: unlimited; otherwise streams end after this many seconds (clients resume)
        "STREAM_MAX_LIFETIME": _env_float("STREAM_MAX_LIFETIME", 0.0),
    }


# -- parameters -----------------------------------------------------------------------------


def _int_param(args: Mapping[str, Any], name: str, default: int, maximum: int) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    if isinstance(raw, bool) or not (
        (isinstance(raw, int) and 0 <= raw <= maximum)
        or (isinstance(raw, str) and INT_RE.fullmatch(raw) and int(raw) <= maximum)
    ):
        raise BadRequest(f"{name} must be an integer from 0 to {maximum:,}", code=f"bad_{name}")
    return int(raw)


def _decimal_param(args: Mapping[str, Any], name: str, default: float, maximum: float) -> float:
    raw = args.get(name)
    if raw is None:
        return default
    value: float | None = None
    if isinstance(raw, str) and DECIMAL_RE.fullmatch(raw):
        value = float(raw)
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool) and math.isfinite(raw):
        value = float(raw)
    if value is None or not 0.0 <= value <= maximum:
        raise BadRequest(f"{name} must be a decimal from 0 to {maximum:g}", code=f"bad_{name}")
    return value


def stream_params(args: Mapping[str, Any]) -> tuple[int, float, int]:
    """``count``, ``interval`` and ``size`` from a query string or a JSON body, validated."""
    count = _int_param(args, "count", len(SEED_MESSAGES), MAX_COUNT)
    interval = _decimal_param(args, "interval", 0.5, MAX_INTERVAL)
    size = _int_param(args, "size", 0, MAX_SIZE)
    return count, interval, size


def _messages(size: int) -> tuple[str, ...]:
    """The seed's messages, each padded (or cut) to exactly ``size`` characters when given."""
    if not size:
        return SEED_MESSAGES
    return tuple((m + " " + "." * size)[:size] for m in SEED_MESSAGES)


def generate_events(
    count: int, interval: float, size: int, fail_after: int | None = None
) -> Iterator[dict[str, Any]]:
    """The seed's stream: ``count`` events ``interval`` s apart; fails after ``fail_after``."""
    messages = _messages(size)
    n = len(messages)
    stop = count if fail_after is None else fail_after
    last = count - 1
    if interval:
        for i in range(stop):
            if i:
                time.sleep(interval)
            yield {"event_id": i, "data": messages[i % n], "is_last_event": i == last}
    else:
        for i in range(stop):
            yield {"event_id": i, "data": messages[i % n], "is_last_event": i == last}
    if fail_after is not None:
        raise RemoteError("failed_on_purpose", f"the stream failed after {fail_after} events")


def _last_event_id(broker: Broker) -> str | None:
    value = request.args.get("last_event_id")
    if value is None:
        value = request.headers.get("Last-Event-ID")
    if value is None or value == "":
        return None
    if not broker.valid_id(value):
        raise BadRequest(
            "Last-Event-ID is not an id this service gave out", code="bad_last_event_id"
        )
    return value


#: an integer literal orjson would turn into a float (beyond 64 bits) may start here
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def compact_json(text: bytes) -> bytes:
    """One published JSON text, compact on one line, exactly what ``json.loads`` reads in it.

    orjson re-encodes the common case. Where orjson refuses what ``json.loads`` accepts (a
    number beyond a double's range, a lone surrogate escape) or would change it (an integer
    beyond 64 bits becomes a float), the text itself is kept, validated by ``json.loads``, with
    its line breaks turned into spaces (JSON strings cannot hold a raw line break, so that only
    touches whitespace between tokens). NaN and Infinity, which are not JSON, are refused.
    Raises ``ValueError`` for anything that is not one JSON text.
    """
    if not _LONG_DIGITS.search(text):
        try:
            return dumps_compact(orjson.loads(text))
        except orjson.JSONDecodeError:
            pass  # decided below, by the reference parser
    json.loads(text, parse_constant=_no_constants)
    return text.strip().replace(b"\r", b" ").replace(b"\n", b" ")


def _check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise BadRequest(
            "channel names are 1 to 128 characters of A-Z a-z 0-9 _ - . : (not . or ..)",
            code="bad_channel_name",
        )
    return name


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


def _gevent_active() -> bool:
    """Whether gevent has patched this process (gunicorn's gevent worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


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
    if _gevent_active() and timeout > 0:
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
    except TimeoutError:
        ended = False
    except OSError:  # the client went away meanwhile
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


# -- jobs -----------------------------------------------------------------------------------

#: a job's statuses after which nothing more is published
FINAL_STATUSES = frozenset({"done", "failed", "interrupted"})
#: seconds of silence after which a job's reader looks at the job's status
JOB_CHECK_INTERVAL = 3.0
#: events a job without an interval publishes at once
JOB_BATCH = 1000


class JobStopped(Exception):
    """The service is shutting down: ``Jobs.interrupt_all`` marks the job."""


class BrokerGaveUp(Exception):
    """The job's broker kept failing for longer than the job waits for it."""


class Job:
    """One running job: publishes its events, renews its lease, always ends in a final status.

    While it runs, its status (``{"status": "running", ...}``) and its log expire after
    ``Jobs.lease`` seconds unless renewed; the job renews them every quarter lease, also while it
    sleeps between events. A job that stops without an end (its worker killed, its broker failing
    for good) therefore leaves a status that disappears, never one stuck at "running". At its end
    the status becomes final (``done``, ``failed``, ``interrupted``) with ``last_id``, the id of
    the last entry of its log, and expires with the job's TTL.
    """

    __slots__ = ("jobs", "id", "key", "count", "last_id", "ended", "_failing_since", "_renew_at")

    def __init__(self, jobs: Jobs, job_id: str, count: int) -> None:
        self.jobs = jobs
        self.id = job_id
        self.key = f"job:{job_id}"
        self.count = count
        #: id of the last entry this job got into its log
        self.last_id: str | None = None
        #: whether a final status was written (or attempted): nothing may renew "running" then
        self.ended = False
        #: since when every broker call failed (monotonic), None while it works
        self._failing_since: float | None = None
        self._renew_at = time.monotonic() + jobs.lease / 4

    def meta(self, status: str, **extra: Any) -> dict[str, Any]:
        """The job's status record."""
        return {"status": status, "count": self.count, "last_id": self.last_id, **extra}

    def run(self, interval: float, size: int) -> None:
        """Produce the events, then the end; every way out leaves a final or expiring status."""
        try:
            self._produce(interval, size)
        except JobStopped:
            pass  # interrupt_all marked it
        except BrokerGaveUp as exc:
            log.error(
                "job %s gave up: its broker failed for %g s (%s)",
                self.id,
                self.jobs.broker_timeout,
                exc,
            )
            self.fail(
                "broker_unavailable",
                f"the job stopped: its broker failed for {self.jobs.broker_timeout:g} s",
            )
        except Exception:
            log.exception("job %s failed", self.id)
            self.fail("internal_error", "the job failed on the server")
        finally:
            self.jobs.running.pop(self.id, None)

    def _produce(self, interval: float, size: int) -> None:
        batch: list[tuple[str, bytes]] = []
        # Without sleeps: the pace is kept here, where the lease can be renewed meanwhile.
        for i, event in enumerate(generate_events(self.count, 0.0, size)):
            if i and interval:
                self._sleep(interval)
            if self.jobs.stopping:
                raise JobStopped
            batch.append(("message", dumps_compact(event)))
            # Without an interval the job is CPU-bound: publish in batches, not per event.
            if interval or len(batch) >= JOB_BATCH:
                self._publish(batch)
                batch = []
                if not interval:
                    # Let the worker's other greenlets (streams, /healthz) run between batches.
                    time.sleep(0)
        if batch:
            self._publish(batch)
        self._publish([("end", b'{"status":"done"}')])
        self.ended = True
        # Even while the service stops: the job is done, its status must say so.
        self._call(
            self.jobs.broker.set_meta, self.key, self.meta("done"), self.jobs.ttl, stop=False
        )

    def _sleep(self, seconds: float) -> None:
        """Wait between events, renewing the lease (intervals may be longer than the lease)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.jobs.stopping:
                raise JobStopped
            time.sleep(min(left, self.jobs.lease / 4))
            self._renew()

    def _publish(self, batch: list[tuple[str, bytes]]) -> None:
        ids: list[str] = self._call(self.jobs.broker.publish, self.key, batch)
        if self.last_id is None:
            # The log exists only now: put it on the lease too (a log without an expiry would
            # outlive a worker killed before the next renewal).
            self._renew_at = 0.0
        self.last_id = ids[-1]
        self._renew()

    def _renew(self) -> None:
        now = time.monotonic()
        if now < self._renew_at or self.ended or self.jobs.stopping:
            return
        self._renew_at = now + self.jobs.lease / 4
        try:
            self.jobs.broker.set_meta(self.key, self.meta("running"), ttl=self.jobs.lease)
        except BrokerUnavailable as exc:
            # Tried again at the next renewal; the lease outlasts broker_timeout, so the job
            # gives up (below) before its status can expire under it.
            self._broker_failed(exc)
        else:
            self._failing_since = None

    def _broker_failed(self, exc: BrokerUnavailable) -> float:
        """Count a failed broker call; the seconds left before giving up (raises at 0)."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            log.warning("job %s: broker unavailable (%s); waiting for it", self.id, exc)
        left = self._failing_since + self.jobs.broker_timeout - now
        if left <= 0:
            raise BrokerGaveUp(str(exc)) from exc
        return left

    def _call(self, fn: Callable[..., Any], *args: Any, stop: bool = True) -> Any:
        """``fn(*args)``, retried while the broker is unavailable, for at most broker_timeout.

        ``stop``: raise ``JobStopped`` instead of calling once the service is stopping.
        """
        delay = 0.05
        while True:
            if stop and self.jobs.stopping:
                raise JobStopped
            try:
                result = fn(*args)
            except BrokerUnavailable as exc:
                time.sleep(min(delay, self._broker_failed(exc)))
                delay = min(delay * 2, 2.0)
            else:
                self._failing_since = None
                return result

    def fail(self, code: str, message: str, status: str = "failed") -> None:
        """End the job with an error event and a final status, as far as the broker lets us.

        One attempt each: when the broker fails, the running status keeps its lease and
        expires, and the job's readers end with ``job_lost`` instead.
        """
        if self.ended:
            return
        self.ended = True
        error = {"code": code, "message": message}
        broker = self.jobs.broker
        try:
            ids = broker.publish(self.key, [("error", dumps_compact({"error": error}))])
            self.last_id = ids[-1]
        except Exception as exc:  # noqa: BLE001 - best effort, whatever the broker raises
            log.warning("job %s: could not publish its error event (%s)", self.id, exc)
        try:
            broker.set_meta(self.key, self.meta(status, error=error), ttl=self.jobs.ttl)
        except Exception as exc:  # noqa: BLE001 - best effort, whatever the broker raises
            log.warning("job %s: could not record status %s (%s); it expires", self.id, status, exc)
            try:
                # Writes may fail where expiries still work (Redis out of memory refuses SET,
                # not PEXPIRE): make sure the log expires with the running status.
                broker.expire(self.key, self.jobs.lease)
            except Exception as exc2:  # noqa: BLE001 - the lease set earlier still holds
                log.warning("job %s: could not set its expiry either (%s)", self.id, exc2)


class Jobs:
    """Runs "expensive requests" in the background, at most ``max_running`` at once.

    ``broker_timeout``: how long a job waits for a failing broker before it gives up; the lease
    on a running job's status is twice that, so a job always gives up before its status could
    expire under it, and a dead job's readers learn it within a lease and a check.
    """

    def __init__(
        self, broker: Broker, ttl: float, *, max_running: int = 64, broker_timeout: float = 20.0
    ) -> None:
        self.broker = broker
        self.ttl = ttl
        self.max_running = max_running
        self.broker_timeout = broker_timeout
        self.lease = 2 * broker_timeout
        self.running: dict[str, Job] = {}
        self.stopping = False

    def start(self, count: int, interval: float, size: int) -> str:
        """Start a job (a greenlet under gevent); returns its id, or raises a 503."""
        if self.stopping:
            raise BadRequest(
                "the server is shutting down; start the job again shortly",
                code="shutting_down",
                status=503,
                headers={"Retry-After": "5"},
            )
        if len(self.running) >= self.max_running:
            raise BadRequest(
                f"this worker runs all the jobs it may ({self.max_running}); retry shortly",
                code="too_many_jobs",
                status=503,
                headers={"Retry-After": "5"},
            )
        job = Job(self, secrets.token_hex(16), count)
        # The slot is taken before the broker call, which may switch greenlets.
        self.running[job.id] = job
        try:
            self.broker.set_meta(job.key, job.meta("running"), ttl=self.lease)
        except BaseException:
            self.running.pop(job.id, None)
            raise
        thread = threading.Thread(
            target=job.run, args=(interval, size), daemon=True, name=f"job-{job.id}"
        )
        thread.start()
        return job.id

    def interrupt_all(self) -> None:
        """On shutdown: stop every running job and mark it interrupted in its log."""
        self.stopping = True
        for job in list(self.running.values()):
            job.fail("interrupted", "the server stopped this job", status="interrupted")


class JobWatch:
    """What a job's reader checks after a silence: whether the job can still end.

    A reader follows the log until the job's ``end`` or ``error``. If the job died without one
    (its status expired: the worker was killed, or the broker failed), or ended with a final
    status whose last entries never came, the reader ends with an error event of its own
    (``job_lost``, or the job's recorded error) instead of waiting forever.
    """

    __slots__ = ("broker", "key", "lease", "_failing_since", "_waited")

    def __init__(self, broker: Broker, key: str, lease: float) -> None:
        self.broker = broker
        self.key = key
        self.lease = lease
        self._failing_since: float | None = None
        self._waited = False

    def check(self, seen: str | None) -> bool:
        """``seen``: the last id this reader has. True: end quietly (it has everything);
        False: keep waiting; raises ``RemoteError`` when the job can no longer end."""
        try:
            meta = self.broker.get_meta(self.key)
        except BrokerUnavailable:
            now = time.monotonic()
            if self._failing_since is None:
                self._failing_since = now
            if now - self._failing_since >= self.lease:
                raise RemoteError(
                    "broker_unavailable",
                    f"the job's broker has been unreachable for {self.lease:g} s",
                ) from None
            return False
        self._failing_since = None
        if meta is None:
            raise RemoteError(
                "job_lost",
                "the job stopped without an end (its worker or its broker failed)",
            )
        status = meta.get("status")
        if status not in FINAL_STATUSES:
            return False
        last = _id_of(meta.get("last_id"))
        behind = last is not None and (seen is None or (_id_of(seen) or (0, 0)) < last)
        if behind and not self._waited:
            # Its last entries may still be on their way (a Redis reader catching up).
            self._waited = True
            return False
        if status == "done" and not behind:
            return True  # resumed at the end: nothing more to send
        error = meta.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            raise RemoteError(error["code"], str(error.get("message", "")))
        raise RemoteError("job_lost", "the job ended but its last events did not reach this stream")


def _id_of(value: Any) -> IdTuple | None:
    return parse_id(value) if isinstance(value, str) else None


def follow(
    subscription: Subscription,
    key: str,
    *,
    until_end: bool,
    max_lifetime: float,
    after: str | None = None,
    watch: JobWatch | None = None,
) -> Iterator[Envelope]:
    """A subscription's envelopes as a generator; the caller closes the subscription.

    With ``watch`` (a job's reader), ``JOB_CHECK_INTERVAL`` s without an entry make it look at
    the job's status: a job that can no longer end ends this stream with an error event.
    """
    deadline = time.monotonic() + max_lifetime if max_lifetime else math.inf
    seen = after
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            # A bounded wait: keep-alives are the writer's job, this only bounds how long a
            # thread-based producer takes to notice that the stream was closed.
            entries = subscription.get(1.0)
        except SlowConsumer:
            # Counted once, when the stream closes (stream_log): a stream stopped by its write
            # timeout while its queue overflowed never gets here.
            log.info("subscriber of %s fell behind and was cut off", key)
            # An unfinished end (no end marker; SSE gets a retry: hint): the client resumes.
            raise Unfinished("slow consumer") from None
        if entries:
            for entry in entries:
                yield entry
                if until_end and entry.event in ("end", "error"):
                    return
            if watch is not None:
                seen = entries[-1].id
                quiet_since = time.monotonic()
        elif watch is not None and time.monotonic() - quiet_since >= JOB_CHECK_INTERVAL:
            quiet_since = time.monotonic()
            if watch.check(seen):
                return
    # STREAM_MAX_LIFETIME reached: an unfinished end, which clients resume from their id.
    raise Unfinished("lifetime")


def stream_log(
    broker: Broker,
    key: str,
    last_id: str | None,
    *,
    until_end: bool,
    max_lifetime: float,
    watch: JobWatch | None = None,
) -> Response:
    """Subscribe now (so a broker outage is a 503, not a broken stream) and stream the log."""
    subscription = broker.subscribe(key, last_id, from_start=until_end and last_id is None)
    items = follow(
        subscription,
        key,
        until_end=until_end,
        max_lifetime=max_lifetime,
        after=last_id,
        watch=watch,
    )

    def closed(reason: str) -> None:
        subscription.close()
        if subscription.overflowed:
            metrics.SLOW_CONSUMER_DROPS.inc()

    return stream_response(items, envelopes=True, name=key, on_close=closed)


def resumes_after_the_end(meta: dict[str, Any], last_id: str | None) -> bool:
    """Whether a resume from ``last_id`` comes after the job's last entry (answered 204)."""
    if last_id is None or meta.get("status") not in FINAL_STATUSES or "last_id" not in meta:
        return False
    last = _id_of(meta["last_id"])
    resume = _id_of(last_id)
    # No entry at all: nothing a resume could be waiting for.
    return last is None or (resume is not None and resume >= last)


# -- the app --------------------------------------------------------------------------------


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the service: settings from the environment, overridden by ``config``."""
    app = Flask(__name__, static_folder=None)
    app.config.update(default_config())
    if config:
        app.config.update(config)
    cfg = app.config

    broker = create_broker(
        cfg["REDIS_URL"],
        max_len=cfg["STREAM_HISTORY_LENGTH"],
        max_age=cfg["STREAM_HISTORY_AGE"],
        queue_size=cfg["STREAM_QUEUE_SIZE"],
        max_bytes=cfg["STREAM_HISTORY_BYTES"],
    )
    jobs = Jobs(
        broker,
        cfg["STREAM_JOB_TTL"],
        max_running=cfg["STREAM_MAX_JOBS"],
        broker_timeout=cfg["STREAM_JOB_BROKER_TIMEOUT"],
    )
    app.extensions["stream.broker"] = broker
    app.extensions["stream.jobs"] = jobs
    on_shutdown(jobs.interrupt_all)
    static_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
    origins = parse_origins(cfg["STREAM_CORS_ORIGINS"])
    app.wsgi_app = close_connection_when_asked(app.wsgi_app)  # type: ignore[method-assign,assignment]

    def body() -> bytes:
        return read_body(cfg["MAX_CONTENT_LENGTH"], cfg["STREAM_BODY_TIMEOUT"])

    @app.before_request
    def preflight() -> Response | None:
        """Answer a CORS preflight (OPTIONS with Access-Control-Request-Method) with 204."""
        if (
            origins is None
            or request.method != "OPTIONS"
            or "Access-Control-Request-Method" not in request.headers
        ):
            return None
        resp = Response(status=204)
        del resp.headers["Content-Type"]
        if cors_allows(origins, request.headers.get("Origin")):
            resp.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            resp.headers["Access-Control-Allow-Headers"] = CORS_REQUEST_HEADERS
            resp.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
        return resp

    @app.after_request
    def edges(resp: Response) -> Response:
        """Bodies nobody read are read (or the connection closed); CORS headers on everything.

        Streams too: their headers are sent when the WSGI server starts the response, after this.
        """
        discard_body(cfg["MAX_CONTENT_LENGTH"], cfg["STREAM_BODY_TIMEOUT"])
        if origins is not None:
            # Caches must keep answers per Origin: the allow header depends on it.
            resp.vary.add("Origin")
            origin = request.headers.get("Origin")
            if cors_allows(origins, origin):
                assert origin is not None
                resp.headers["Access-Control-Allow-Origin"] = origin
                if request.method != "OPTIONS":
                    resp.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        return resp

    @app.errorhandler(BadRequest)
    def bad_request(exc: BadRequest) -> Response:
        return error_response(exc.status, exc.code, exc.message, **exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        headers = {}
        if exc.code == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return error_response(exc.code or 500, code, exc.description or code, **headers)

    @app.errorhandler(BrokerUnavailable)
    def broker_down(exc: BrokerUnavailable) -> Response:
        return error_response(
            503,
            "broker_unavailable",
            "the broker cannot be reached; try again",
            **{"Retry-After": "1"},
        )

    def check_capacity() -> None:
        if open_streams() >= cfg["STREAM_MAX_STREAMS"]:
            raise BadRequest(
                "this worker holds all the streams it can; retry shortly",
                code="too_many_streams",
                status=503,
                headers={"Retry-After": "1"},
            )

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return http_error(exc)
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "internal server error")

    @app.get("/")
    def index() -> Response:
        return send_from_directory(static_dir, "index.html", max_age=0)

    @app.get("/healthz")
    def healthz() -> Response:
        reachable = broker.healthy()
        body = {
            "status": "ok" if reachable else "degraded",
            "broker": broker.kind,
            "broker_reachable": reachable,
            "open_streams": open_streams(),
            "pid": os.getpid(),
        }
        return Response(
            orjson.dumps(body), status=200 if reachable else 503, mimetype="application/json"
        )

    @app.get("/metrics")
    def metrics_view() -> Response:
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    @app.get("/events")
    def events() -> Response:
        count, interval, size = stream_params(request.args)
        fail_after = None
        if request.args.get("fail_after") is not None:
            fail_after = _int_param(request.args, "fail_after", 0, count)
        check_capacity()
        return stream_response(generate_events(count, interval, size, fail_after), name="events")

    @app.post("/jobs")
    def start_job() -> tuple[Response, int]:
        authorize(cfg["STREAM_PUBLISH_TOKEN"], "start jobs")
        data = body()
        try:
            params = orjson.loads(data) if data.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the body is not JSON: {exc}", code="bad_json") from None
        if not isinstance(params, dict):
            raise BadRequest("the body must be a JSON object", code="bad_json")
        unknown = set(params) - {"count", "interval", "size"}
        if unknown:
            raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}", code="bad_field")
        count, interval, size = stream_params(params)
        job_id = jobs.start(count, interval, size)
        url = f"/jobs/{job_id}/events"
        resp = Response(
            orjson.dumps({"id": job_id, "events_url": url}), mimetype="application/json"
        )
        resp.headers["Location"] = url
        return resp, 202

    @app.get("/jobs/<job_id>/events")
    def job_events(job_id: str) -> Response:
        key = f"job:{job_id}"
        meta = broker.get_meta(key) if JOB_ID_RE.fullmatch(job_id) else None
        if meta is None:
            raise BadRequest("no such job (it may have expired)", code="not_found", status=404)
        last_id = _last_event_id(broker)
        if resumes_after_the_end(meta, last_id):
            # Nothing will follow the job's last entry: 204 makes EventSource stop reconnecting
            # (https://html.spec.whatwg.org/multipage/server-sent-events.html#sse-processing-model).
            resp = Response(status=204)
            del resp.headers["Content-Type"]  # no content, no type
            return resp
        check_capacity()
        return stream_log(
            broker,
            key,
            last_id,
            until_end=True,
            max_lifetime=cfg["STREAM_MAX_LIFETIME"],
            watch=JobWatch(broker, key, jobs.lease),
        )

    @app.post("/channels/<name>")
    def publish(name: str) -> tuple[Response, int]:
        _check_name(name)
        authorize(cfg["STREAM_PUBLISH_TOKEN"], "publish")
        event = request.args.get("event", "message")
        if not EVENT_TYPE_RE.fullmatch(event) or event in RESERVED_EVENTS:
            raise BadRequest(
                "event must be 1 to 64 characters of A-Z a-z 0-9 _ - . : "
                "and not end, reset or error",
                code="bad_event",
            )
        mimetype = request.mimetype
        values: list[bytes]
        if mimetype == "application/json":
            data = body()
            try:
                values = [compact_json(data)]
            except ValueError as exc:
                raise BadRequest(f"the body is not JSON: {exc}", code="bad_json") from None
        elif mimetype in ("application/x-ndjson", "application/ndjson"):
            values = []
            for number, line in enumerate(body().split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    values.append(compact_json(line))
                except ValueError as exc:
                    raise BadRequest(f"line {number} is not JSON: {exc}", code="bad_json") from None
            if not values:
                raise BadRequest("the body holds no JSON value", code="bad_json")
        else:
            raise BadRequest(
                "Content-Type must be application/json or application/x-ndjson",
                code="unsupported_media_type",
                status=415,
            )
        ids = broker.publish(f"channel:{name}", [(event, v) for v in values])
        metrics.PUBLISHED.inc(len(ids))
        return Response(orjson.dumps({"ids": ids}), mimetype="application/json"), 201

    @app.get("/channels/<name>")
    def subscribe(name: str) -> Response:
        _check_name(name)
        last_id = _last_event_id(broker)
        check_capacity()
        return stream_log(
            broker,
            f"channel:{name}",
            last_id,
            until_end=False,
            max_lifetime=cfg["STREAM_MAX_LIFETIME"],
        )

    return app
