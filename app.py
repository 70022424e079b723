"""The reference service: ``create_app(config=None)`` builds the Flask app (``wsgi.py`` serves it).

Configuration comes from the environment here and nowhere else (``gunicorn.conf.py`` reads the
server's own settings); ``config`` overrides it, which is how the tests build apps.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import orjson
from flask import Flask, Response, request, send_from_directory
from werkzeug.exceptions import HTTPException

from stream import metrics
from stream.broker import Broker, BrokerUnavailable, SlowConsumer, Subscription, create_broker
from stream.encoders import dumps_compact
from stream.errors import RemoteError
from stream.event import Envelope
from stream.server import error_response, on_shutdown, open_streams, stream_response

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
        # retention of job and channel logs: entries and seconds
        "STREAM_HISTORY_LENGTH": int(_env_float("STREAM_HISTORY_LENGTH", 10_000)),
        "STREAM_HISTORY_AGE": _env_float("STREAM_HISTORY_AGE", 3600.0),
        # how long a finished job's events stay readable
        "STREAM_JOB_TTL": _env_float("STREAM_JOB_TTL", 3600.0),
        # entries a subscriber may fall behind before it is cut off (it resumes by id)
        "STREAM_QUEUE_SIZE": int(_env_float("STREAM_QUEUE_SIZE", 10_000)),
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


def _check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise BadRequest(
            "channel names are 1 to 128 characters of A-Z a-z 0-9 _ - . : (not . or ..)",
            code="bad_channel_name",
        )
    return name


def _is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# -- jobs -----------------------------------------------------------------------------------


class Jobs:
    """Runs "expensive requests" in the background; their events go to the broker's log."""

    def __init__(self, broker: Broker, ttl: float) -> None:
        self.broker = broker
        self.ttl = ttl
        self.running: dict[str, threading.Thread] = {}
        self.stopping = False

    def start(self, count: int, interval: float, size: int) -> str:
        """Start a job (a greenlet under gevent); returns its id."""
        job_id = secrets.token_hex(16)
        self.broker.set_meta(f"job:{job_id}", {"status": "running", "count": count})
        thread = threading.Thread(
            target=self._run,
            args=(job_id, count, interval, size),
            daemon=True,
            name=f"job-{job_id}",
        )
        self.running[job_id] = thread
        thread.start()
        return job_id

    def _run(self, job_id: str, count: int, interval: float, size: int) -> None:
        key = f"job:{job_id}"
        dumps = dumps_compact
        batch: list[tuple[str, bytes]] = []
        try:
            for event in generate_events(count, interval, size):
                if self.stopping:
                    return
                batch.append(("message", dumps(event)))
                # Without an interval the job is CPU-bound: publish in batches, not per event.
                if interval or len(batch) >= 1000:
                    self._publish(key, batch)
                    batch = []
            if batch:
                self._publish(key, batch)
            self._publish(key, [("end", b'{"status":"done"}')])
            self.broker.set_meta(key, {"status": "done", "count": count}, ttl=self.ttl)
            self.broker.expire(key, self.ttl)
        except Exception:
            log.exception("job %s failed", job_id)
        finally:
            self.running.pop(job_id, None)

    def _publish(self, key: str, batch: list[tuple[str, bytes]]) -> None:
        delay = 0.1
        while True:
            try:
                self.broker.publish(key, batch)
                return
            except BrokerUnavailable:
                # The job runs to its end whoever listens: wait for the broker to come back.
                if self.stopping:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def interrupt_all(self) -> None:
        """On shutdown: stop every running job and mark it interrupted in its log."""
        self.stopping = True
        for job_id in list(self.running):
            key = f"job:{job_id}"
            error = {"error": {"code": "interrupted", "message": "the server stopped this job"}}
            try:
                self.broker.publish(key, [("error", dumps_compact(error))])
                self.broker.set_meta(key, {"status": "interrupted"}, ttl=self.ttl)
                self.broker.expire(key, self.ttl)
            except BrokerUnavailable:
                log.warning("could not mark job %s interrupted: broker unavailable", job_id)


def follow(
    subscription: Subscription, key: str, *, until_end: bool, max_lifetime: float
) -> Iterator[Envelope]:
    """A subscription's envelopes as a generator; the caller closes the subscription."""
    deadline = time.monotonic() + max_lifetime if max_lifetime else math.inf
    while time.monotonic() < deadline:
        try:
            # A bounded wait: keep-alives are the writer's job, this only bounds how long a
            # thread-based producer takes to notice that the stream was closed.
            entries = subscription.get(1.0)
        except SlowConsumer:
            metrics.SLOW_CONSUMER_DROPS.inc()
            log.info("subscriber of %s fell behind and was cut off", key)
            # Ending the body without an end marker makes the client resume from its id.
            return
        for entry in entries:
            yield entry
            if until_end and entry.event in ("end", "error"):
                return


def stream_log(
    broker: Broker, key: str, last_id: str | None, *, until_end: bool, max_lifetime: float
) -> Response:
    """Subscribe now (so a broker outage is a 503, not a broken stream) and stream the log."""
    subscription = broker.subscribe(key, last_id, from_start=until_end and last_id is None)
    items = follow(subscription, key, until_end=until_end, max_lifetime=max_lifetime)
    return stream_response(
        items, envelopes=True, name=key, on_close=lambda reason: subscription.close()
    )


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
    )
    jobs = Jobs(broker, cfg["STREAM_JOB_TTL"])
    app.extensions["stream.broker"] = broker
    app.extensions["stream.jobs"] = jobs
    on_shutdown(jobs.interrupt_all)
    static_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

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
        body = request.get_data(cache=False)
        try:
            params = orjson.loads(body) if body.strip() else {}
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
        if not JOB_ID_RE.fullmatch(job_id) or broker.get_meta(f"job:{job_id}") is None:
            raise BadRequest("no such job (it may have expired)", code="not_found", status=404)
        last_id = _last_event_id(broker)
        check_capacity()
        return stream_log(
            broker,
            f"job:{job_id}",
            last_id,
            until_end=True,
            max_lifetime=cfg["STREAM_MAX_LIFETIME"],
        )

    @app.post("/channels/<name>")
    def publish(name: str) -> tuple[Response, int]:
        _check_name(name)
        token = cfg["STREAM_PUBLISH_TOKEN"]
        if token:
            given = request.headers.get("Authorization", "")
            scheme, _, credentials = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credentials.strip().encode(), token.encode()
            ):
                resp = error_response(401, "unauthorized", "publishing needs the bearer token")
                resp.headers["WWW-Authenticate"] = 'Bearer realm="stream"'
                return resp, 401
        elif not _is_loopback(request.remote_addr):
            raise BadRequest(
                "without STREAM_PUBLISH_TOKEN only loopback clients may publish",
                code="forbidden",
                status=403,
            )
        event = request.args.get("event", "message")
        if not EVENT_TYPE_RE.fullmatch(event) or event in RESERVED_EVENTS:
            raise BadRequest(
                "event must be 1 to 64 characters of A-Z a-z 0-9 _ - . : "
                "and not end, reset or error",
                code="bad_event",
            )
        mimetype = request.mimetype
        body = request.get_data(cache=False)
        values: list[bytes]
        if mimetype == "application/json":
            try:
                values = [dumps_compact(orjson.loads(body))]
            except orjson.JSONDecodeError as exc:
                raise BadRequest(f"the body is not JSON: {exc}", code="bad_json") from None
        elif mimetype in ("application/x-ndjson", "application/ndjson"):
            values = []
            for number, line in enumerate(body.split(b"\n"), 1):
                if not line.strip():
                    continue
                try:
                    values.append(dumps_compact(orjson.loads(line)))
                except orjson.JSONDecodeError as exc:
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
