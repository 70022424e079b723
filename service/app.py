"""The routes."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import orjson
from flask import Flask, Response, request, send_from_directory
from werkzeug.exceptions import HTTPException

from service.demo import generate_events
from service.edges import (
    CORS_EXPOSED,
    CORS_MAX_AGE,
    CORS_METHODS,
    CORS_REQUEST_HEADERS,
    BadRequest,
    authorize,
    close_connection_when_asked,
    cors_allows,
    discard_body,
    parse_origins,
    read_body,
)
from service.jobs import Jobs, JobWatch
from service.logs import resumes_after_the_end, stream_log
from service.params import (
    EVENT_TYPE_RE,
    JOB_ID_RE,
    check_name,
    compact_json,
    int_param,
    last_event_id,
    stream_params,
)
from service.settings import create_service_broker, default_config
from stream import metrics
from stream.broker import BrokerUnavailable
from stream.server import error_response, on_shutdown, open_streams, stream_response
from stream.wire import RESERVED_EVENTS

if TYPE_CHECKING:
    from service.queue import QueuedJobs

log = logging.getLogger("stream.app")

# -- the app --------------------------------------------------------------------------------


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the service: settings from the environment, overridden by ``config``."""
    app = Flask(__name__, static_folder=None)
    app.config.update(default_config())
    if config:
        app.config.update(config)
    cfg = app.config

    broker = create_service_broker(cfg)
    jobs: Jobs | QueuedJobs
    if cfg["REDIS_URL"]:
        # Jobs run in worker processes (service.worker); this process only enqueues them.
        from service.queue import JobQueue, QueuedJobs

        queue = JobQueue(
            cfg["REDIS_URL"],
            name=cfg["STREAM_JOB_QUEUE"],
            requeue_timeout=cfg["STREAM_JOB_REQUEUE_TIMEOUT"],
        )
        jobs = QueuedJobs(
            broker,
            queue,
            cfg["STREAM_JOB_TTL"],
            max_pending=cfg["STREAM_MAX_JOBS"],
            broker_timeout=cfg["STREAM_JOB_BROKER_TIMEOUT"],
        )
        # Without a worker, jobs wait on the queue: say where they go, once per process.
        log.info("jobs go to queue %r; `dramatiq service.worker` runs them", queue.name)
    else:
        jobs = Jobs(
            broker,
            cfg["STREAM_JOB_TTL"],
            max_running=cfg["STREAM_MAX_JOBS"],
            broker_timeout=cfg["STREAM_JOB_BROKER_TIMEOUT"],
        )
    app.extensions["stream.broker"] = broker
    app.extensions["stream.jobs"] = jobs
    on_shutdown(jobs.interrupt_all)
    # static/ lives beside this package, at the repository root
    static_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "static")
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
        # HTTPExceptions never get here: Flask picks the handler of the closest class.
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
            fail_after = int_param(request.args, "fail_after", 0, count)
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
        last_id = last_event_id(broker)
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
        check_name(name)
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
        check_name(name)
        last_id = last_event_id(broker)
        check_capacity()
        return stream_log(
            broker,
            f"channel:{name}",
            last_id,
            until_end=False,
            max_lifetime=cfg["STREAM_MAX_LIFETIME"],
        )

    return app
