"""gunicorn settings for the service, every one read from the environment (``gunicorn wsgi:app``).

Imports only the standard library at load time: the app (and gevent's patching) belong to the
workers, never to the master.
"""

import os

_redis_url = os.environ.get("REDIS_URL")

# Heroku-style platforms give the port in $PORT; 8000 on a laptop.
bind = f"0.0.0.0:{os.environ.get('PORT', '8000')}"

# One greenlet per connection: a process holds thousands of open streams.
worker_class = "gevent"

# The in-process broker lives in one process: several workers would each see a different set of
# channels and jobs. With Redis every worker sees every log, so the platform's value is used.
workers = int(os.environ.get("WEB_CONCURRENCY", "2")) if _redis_url else 1

# Streams a worker holds at once. The app answers 503 + Retry-After above STREAM_MAX_STREAMS
# (default 10,000); gunicorn's own limit (1,000 by default) must sit above that, or connections
# would wait in the accept queue without an answer. The margin serves /healthz and publishes.
worker_connections = int(os.environ.get("STREAM_MAX_STREAMS", "10000")) + 1000

# gevent records, for every greenlet, the frames that spawned it (for debugging): ~1 KiB of
# frame objects per open stream that nothing here reads. Workers inherit this environment.
os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "0")

# Importing the app before the fork would import it before gevent patches the worker.
preload_app = False

# The master kills a worker that has not notified it for this long; gevent workers notify from
# their own loop, so open streams never trip it.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))

# On SIGTERM/SIGHUP a worker has this long to finish; the hook below ends every stream at once,
# so this is a bound, not a wait. Heroku sends SIGKILL 30 s after SIGTERM: stay below that.
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "20"))

# The retry: hint (seconds) a stopping worker's SSE streams get: at least STREAM_SHUTDOWN_RETRY,
# plus a random share of STREAM_SHUTDOWN_RETRY_WINDOW per stream. The base outlasts a full
# restart behind a single-upstream proxy (whose 502 an EventSource never retries); the window
# keeps a worker's clients from all coming back in the same second. See stream/server.py.
_shutdown_retry_ms = round(float(os.environ.get("STREAM_SHUTDOWN_RETRY", "3")) * 1000)
_shutdown_retry_window_ms = round(float(os.environ.get("STREAM_SHUTDOWN_RETRY_WINDOW", "7")) * 1000)

# Idle keep-alive connections between requests (streams hold theirs while they last).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))

# Logs go to stdout/stderr, where platforms collect them.
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-")
loglevel = os.environ.get("LOG_LEVEL", "info")
# The stream library logs which stream ended and why: show it with gunicorn's handlers.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {"stream": {"level": loglevel.upper(), "handlers": ["console"], "propagate": False}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "generic",
            "stream": "ext://sys.stdout",
        }
    },
    "formatters": {
        "generic": {
            "format": "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s",
            "datefmt": "[%Y-%m-%d %H:%M:%S %z]",
        }
    },
}

# gunicorn's runtime control socket is not used here, and two services on one machine (tests,
# benchmarks) would fight over its single default path.
control_socket_disable = True


def on_starting(server):
    """Refuse to split the in-process broker across workers, and say which broker runs."""
    if _redis_url:
        server.log.info("broker: Redis Streams; %d workers", server.cfg.workers)
    else:
        if server.cfg.workers > 1:
            server.log.warning(
                "REDIS_URL is unset: the in-process broker works in one worker only; "
                "running 1 worker instead of %d",
                server.cfg.workers,
            )
            server.cfg.set("workers", 1)
        server.log.info("broker: in-process (one worker); set REDIS_URL for more")


def pre_exec(server):
    """Re-execute a master started as ``python -m gunicorn`` the same way on USR2.

    gunicorn re-executes ``sys.executable`` with ``sys.argv``, whose first item is then the path
    of gunicorn/__main__.py: run as a script, it would put gunicorn's own directory first on
    sys.path, where its ``http`` package hides the standard library's, and the new master would
    fail to load the app (the old one keeps serving, but the upgrade never happens).
    """
    args = server.START_CTX["args"]
    script = os.path.normpath(args[1]) if len(args) > 1 else ""
    if script.endswith(os.path.join("gunicorn", "__main__.py")):
        args[1:2] = ["-m", "gunicorn"]


def post_fork(server, worker):
    """Let glibc return large freed blocks (big events, coalesced writes) to the system.

    glibc raises its mmap threshold as large blocks are freed, after which big event payloads
    come from the heap and fragment it: a worker that streamed 20 MB of 10 KB events kept
    growing even after the data was gone. A fixed threshold maps such blocks and unmaps them on
    free. Skipped where the C library is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3  # glibc's malloc.h
        libc.mallopt(m_mmap_threshold, 32 * 1024)
    except (OSError, AttributeError):
        server.log.debug("mallopt unavailable; keeping the C library's defaults")


def post_worker_init(worker):
    """Watch for the worker's stop (SIGTERM, SIGHUP reload) and end every open stream then.

    gunicorn would otherwise wait graceful_timeout and kill the streams mid-body, without running
    their ``finally``. gevent's workers only flip ``worker.alive`` on SIGTERM, so poll it.
    """
    import gevent

    from stream.server import inline_keepalives, shutdown_streams

    if getattr(worker.cfg, "protocol", "http") != "http":
        # uwsgi: bodies are not HTTP-chunked, so streams must not frame keep-alives themselves.
        inline_keepalives(False)

    def watch():
        while worker.alive:
            gevent.sleep(0.1)
        ended = shutdown_streams(_shutdown_retry_ms, _shutdown_retry_window_ms)
        worker.log.info("worker %s stopping: ended %d open streams", worker.pid, ended)

    gevent.spawn(watch)


def worker_exit(server, worker):
    """Close the app's broker as the worker exits: the Redis reader stops, connections close.

    Runs in the worker after its loop ended (streams already ended by the hook above). The
    worker imported ``wsgi`` itself (no preload_app), so reaching it here imports nothing new.
    """
    import sys

    wsgi = sys.modules.get("wsgi")
    broker = getattr(getattr(wsgi, "app", None), "extensions", {}).get("stream.broker")
    if broker is None:
        return
    try:
        broker.close()
    except Exception:  # noqa: BLE001 - exiting anyway: say so, never hang or crash the exit
        worker.log.exception("worker %s exiting: closing the broker failed", worker.pid)
    else:
        worker.log.info("worker %s exiting: closed the broker", worker.pid)
