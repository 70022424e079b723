"""gunicorn settings for the service, every one read from the environment (``gunicorn wsgi:app``).

The clean shutdown, the memory settings and the metrics shared by the workers come from
``stream.gunicorn``, as they would in any app's config; what is here is the service's own. Every
value is read and checked once, here: a bad one stops the start with one line naming the
variable. Imports only the standard library, ``stream.gunicorn`` (standard library and
orjson) and ``service.settings`` (standard library): the app, gevent's patching and redis-py
belong to the workers, never to the master.
"""

import os
import socket
import ssl
import sys
from urllib.parse import parse_qs, unquote, urlsplit

from service import settings as service_settings
from stream import gunicorn as stream_gunicorn
from stream.gunicorn import *  # noqa: F403 - worker_class and the hooks chained below


def _shutdown_retry_ms(name):
    # Unset: None, which stream.gunicorn leaves to the library's own default.
    if not os.environ.get(name, "").strip():
        return None
    return round(service_settings.number(name, 0.0, above=False, maximum=3600) * 1000)


# Every setting, the service's own (STREAM_*, REDIS_URL) with gunicorn's, checked here once,
# before any worker starts, so a bad one is one line naming it (exit status 1: gunicorn lets
# SystemExit out of its config loading) rather than a worker that fails to boot.
try:
    _config = service_settings.default_config()
    _port = service_settings.whole("PORT", 8000, maximum=65535, what="a TCP port number")
    _web_concurrency = service_settings.whole(
        "WEB_CONCURRENCY", 2, what="a whole number of workers"
    )
    _timeout = service_settings.whole(
        "GUNICORN_TIMEOUT", 30, minimum=0, what="a whole number of seconds"
    )
    _graceful_timeout = service_settings.whole(
        "GRACEFUL_TIMEOUT", 20, minimum=0, what="a whole number of seconds"
    )
    _keepalive = service_settings.whole(
        "GUNICORN_KEEPALIVE", 5, minimum=0, what="a whole number of seconds"
    )
    _retry_ms = _shutdown_retry_ms("STREAM_SHUTDOWN_RETRY")
    _retry_window_ms = _shutdown_retry_ms("STREAM_SHUTDOWN_RETRY_WINDOW")
    loglevel = os.environ.get("LOG_LEVEL", "info").strip().lower()
    if loglevel not in ("debug", "info", "warning", "error", "critical"):
        raise service_settings.SettingError(
            "LOG_LEVEL", os.environ["LOG_LEVEL"], "debug, info, warning, error or critical"
        )
except service_settings.SettingError as exc:
    sys.exit(f"gunicorn.conf.py: {exc}")

_redis = _config["REDIS_URL"]

# Heroku-style platforms give the port in $PORT; 8000 on a laptop.
bind = f"0.0.0.0:{_port}"

# The in-process broker lives in one process: several workers would each see a different set of
# channels and jobs. With Redis every worker sees every log, so the platform's value is used.
# (gunicorn itself reads WEB_CONCURRENCY too, before this file: a value that is not a number
# stops it with its own traceback.)
workers = _web_concurrency if _redis else 1

# Streams a worker holds at once. The app answers 503 + Retry-After above STREAM_MAX_STREAMS;
# gunicorn's own limit (1,000 by default) must sit above that, or connections would wait in the
# accept queue without an answer. The margin serves /healthz and publishes.
worker_connections = _config["STREAM_MAX_STREAMS"] + 1000

# Importing the app before the fork would import it before gevent patches the worker.
preload_app = False

# The master kills a worker that has not notified it for this long (0: never); gevent workers
# notify from their own loop, so open streams never trip it.
timeout = _timeout

# On SIGTERM/SIGHUP a worker has this long to finish; stream.gunicorn's hook ends every stream at
# once, so this is a bound, not a wait. Heroku sends SIGKILL 30 s after SIGTERM: stay below that.
graceful_timeout = _graceful_timeout

# The retry: hint a stopping worker's SSE streams get: at least STREAM_SHUTDOWN_RETRY seconds,
# plus a random share of STREAM_SHUTDOWN_RETRY_WINDOW per stream (unset: the library's
# defaults, see stream/server.py). The base outlasts a full restart behind a single-upstream
# proxy (whose 502 an EventSource never retries); the window keeps a worker's clients from all
# coming back in the same second.
stream_gunicorn.shutdown_retry_ms = _retry_ms
stream_gunicorn.shutdown_retry_window_ms = _retry_window_ms

# Idle keep-alive connections between requests (streams hold theirs while they last).
keepalive = _keepalive

# Logs go to stdout/stderr, where platforms collect them.
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-")
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


def nworkers_changed(server, new_value, old_value):
    """Without Redis, hold the worker count at one, whatever -w, WEB_CONCURRENCY or TTIN ask.

    gunicorn calls this each time it sets its worker count: when it reads the configuration
    (the command line's -w included), on a reload, on SIGTTIN. Setting it back here comes
    before any worker forks; on_starting would be too late (the arbiter has the count by then).
    """
    if _redis or new_value is None or new_value <= 1:
        return
    server.log.warning(
        "REDIS_URL is unset: the in-process broker works in one worker only; "
        "running 1 worker instead of %d",
        new_value,
    )
    server.cfg.set("workers", 1)  # a reload spawns cfg.workers new workers
    server._num_workers = 1  # the property's setter would call this hook again


def on_starting(server):
    """Say which broker runs, and whether Redis answers, before any worker forks."""
    stream_gunicorn.on_starting(server)
    if not _redis:
        server.log.info("broker: in-process (one worker); set REDIS_URL for more")
        return
    server.log.info("broker: Redis Streams; %d workers", server.num_workers)
    problem = _ping_redis(_redis)
    if problem is None:
        server.log.info("broker: Redis at %s is reachable", _redacted(_redis))
    else:
        # Not fatal: workers answer 503 + Retry-After until it is back, and /healthz says so.
        server.log.warning("broker: Redis at %s is unreachable: %s", _redacted(_redis), problem)


def _redacted(url):
    """The URL without its password, for the log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{netloc}").geturl()


def _ping_redis(url, timeout=2.0):
    """PING Redis over a plain socket; None if it answered PONG, else what went wrong.

    redis-py stays out of the master: its retry module binds time.sleep at import, and workers
    forked from a master that imported it would sleep through gevent's loop.
    """
    parts = urlsplit(url)
    try:
        if parts.scheme == "unix":
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(timeout)
            conn.connect(parts.path)
        else:
            host = parts.hostname or "localhost"
            conn = socket.create_connection((host, parts.port or 6379), timeout=timeout)
            if parts.scheme == "rediss":
                context = ssl.create_default_context()
                reqs = parse_qs(parts.query).get("ssl_cert_reqs", [""])[0].lower()
                if reqs in ("none", "cert_none"):
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                conn = context.wrap_socket(conn, server_hostname=host)
        with conn:
            reader = conn.makefile("rb")
            if parts.password is not None:
                auth = [unquote(parts.password)]
                if parts.username:
                    auth.insert(0, unquote(parts.username))
                conn.sendall(_command("AUTH", *auth))
                reply = reader.readline()
                if not reply.startswith(b"+OK"):
                    return "AUTH refused: " + reply.decode(errors="replace").strip()
            conn.sendall(_command("PING"))
            reply = reader.readline()
    except (OSError, ssl.SSLError) as exc:
        return str(exc) or type(exc).__name__
    if reply.startswith(b"+PONG"):
        return None
    return "PING answered " + (reply.decode(errors="replace").strip() or "nothing")


def _command(*args):
    """A command in RESP, Redis' wire format."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)
