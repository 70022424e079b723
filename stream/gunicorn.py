"""gunicorn hooks and settings for an app that streams: ``from stream.gunicorn import *``.

In your own ``gunicorn.conf.py``::

    from stream.gunicorn import *  # noqa: F403

    bind = "0.0.0.0:8000"
    graceful_timeout = 20  # a bound, not a wait: streams end as soon as the worker stops

``import *`` brings only what ``__all__`` lists:

- ``worker_class = "gevent"``: one greenlet per connection, so a worker holds thousands of
  open streams (``-k`` on the command line, or an assignment after the import, overrides it);
- ``post_worker_init``: when the worker is told to stop (SIGTERM, SIGHUP, SIGINT, a
  max-requests restart) every open stream ends at once and cleanly: a complete HTTP body (SSE
  first gets a ``retry:`` hint), the generator's ``finally`` runs, and the worker exits without
  waiting out ``graceful_timeout``. It also tells the streams whether gunicorn frames bodies as
  HTTP/1.x (its default protocol), the proof an inline stream needs to write keep-alives
  around it (under ``--protocol uwsgi``, unframed bodies, every byte goes through gunicorn),
  and it freezes what the app loaded and raises the collector's thresholds
  (``GC_THRESHOLDS``): with thousands of open streams the defaults paused the worker for up to
  0.5 s in the middle of fan-outs; under gevent it has the hub look at sockets after every
  millisecond of ready greenlets (``SWITCH_INTERVAL``), so a request waits less behind a big
  fan-out's wake-ups;
- ``worker_exit``: closes the broker a Flask app keeps in ``app.extensions["stream.broker"]``;
- ``post_fork``: glibc returns large freed blocks (big events) to the system;
- ``on_starting``: refuses to start with HTTP/2 switched on (``--http-protocols h2``): gunicorn
  27's gevent worker serves one h2 connection's streams one after another, and a browser puts a
  page's streams on one connection. HTTP/2 belongs at the edge (``deploy/nginx.conf``);
- ``on_starting``, ``child_exit``, ``on_exit``: with prometheus-client installed, a temporary
  ``PROMETHEUS_MULTIPROC_DIR`` the workers share, so ``stream.metrics.render()`` describes every
  worker, whichever answers (an existing ``PROMETHEUS_MULTIPROC_DIR`` is used as it is);
- and, in the environment the workers inherit, ``GEVENT_TRACK_GREENLET_TREE=0`` (gevent would
  otherwise keep ~1 KiB of spawn frames per open stream, for debugging).

gunicorn keeps one function per hook: the last definition in the file wins. To add your own
work to a hook, call this module's from yours::

    from stream import gunicorn as stream_gunicorn
    from stream.gunicorn import *  # noqa: F403

    def post_worker_init(worker):
        stream_gunicorn.post_worker_init(worker)
        ...  # yours

The master imports this module with the config file: it imports the standard library and the
package's core (orjson) only. gevent patches the workers after the fork; Flask, the app, redis-py
and prometheus-client belong to the workers.
"""

from __future__ import annotations

import gc
import glob
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, Protocol

__all__ = [
    "child_exit",
    "on_exit",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "pre_exec",
    "worker_class",
    "worker_exit",
]

#: prometheus-client reads it once, when first imported: set before any worker starts
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: how often the watch looks at ``worker.alive`` (gevent's workers only flip it on SIGTERM)
WATCH_INTERVAL = 0.1
#: the collector's thresholds in a worker (CPython's default: 700, 10, 10); see post_worker_init
GC_THRESHOLDS = (50_000, 20, 10)
#: glibc's mmap threshold in a worker (bytes): blocks above it are mapped, and unmapped on free;
#: the heap keeps up to twice this free at its top (the trim threshold)
MMAP_THRESHOLD = 1024 * 1024
#: under gevent, how long (s) the hub runs ready greenlets before it looks at sockets again
#: (gevent's default: 0.005); see post_worker_init
SWITCH_INTERVAL = 0.001

worker_class = "gevent"

#: the ``retry:`` hint (ms) of a stopping worker's SSE streams, plus a random share of the
#: window per stream; None: stream.server's defaults (a config file may set these)
shutdown_retry_ms: int | None = None
shutdown_retry_window_ms: int | None = None

os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "0")

#: the metrics directory this module created (and removes on exit); None if it made none
_metrics_dir: str | None = None


class Log(Protocol):
    def info(self, msg: str, *args: Any) -> None: ...
    def warning(self, msg: str, *args: Any) -> None: ...
    def debug(self, msg: str, *args: Any) -> None: ...
    def exception(self, msg: str, *args: Any) -> None: ...


class Server(Protocol):
    """What the hooks use of gunicorn's Arbiter."""

    log: Log
    cfg: Any
    START_CTX: dict[Any, Any]


class Worker(Protocol):
    """What the hooks use of a gunicorn worker."""

    alive: bool
    pid: int
    log: Log
    cfg: Any


#: why this module refuses HTTP/2 (see refuse_serial_http2)
HTTP2_REFUSED = (
    "stream.gunicorn: http_protocols includes h2, but gunicorn's gevent worker serves an HTTP/2 "
    "connection's streams one after another, and a browser puts every stream of a page on one "
    "connection: its second stream would never start. Serve HTTP/2 at the edge (nginx, see "
    "deploy/nginx.conf, or the platform's router) in front of gunicorn's HTTP/1.1, and drop h2 "
    "from --http-protocols."
)


def refuse_serial_http2(cfg: Any) -> None:
    """Stop the start when HTTP/2 is switched on: gunicorn 27 serves an h2 connection's requests
    one after another (``base_async.handle_http2``), so a page's second stream would stall."""
    if "h2" in (getattr(cfg, "http_protocols", None) or ()):
        raise SystemExit(HTTP2_REFUSED)


def on_starting(server: Server) -> None:
    """Refuse HTTP/2 (see refuse_serial_http2); give the workers a shared directory for their
    metrics before the first one forks."""
    global _metrics_dir
    refuse_serial_http2(server.cfg)
    existing = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if existing:
        # prometheus-client writes there but never creates it: a worker would fail to boot.
        os.makedirs(existing, exist_ok=True)
        server.log.info("metrics: shared by the workers in %s", existing)
        return
    if importlib.util.find_spec("prometheus_client") is None:
        return
    if "prometheus_client" in sys.modules:
        # Imported in the master already (preload_app, or the config file): its metrics chose
        # per-process values, and the workers inherit that choice.
        server.log.warning(
            "metrics: prometheus_client was imported before the workers' directory was set; "
            "each worker reports its own figures (set %s yourself to share them)",
            MULTIPROCESS_DIR_VARIABLE,
        )
        return
    _metrics_dir = tempfile.mkdtemp(prefix="stream-metrics-")
    os.environ[MULTIPROCESS_DIR_VARIABLE] = _metrics_dir
    server.log.info("metrics: shared by the workers in %s", _metrics_dir)


def child_exit(server: Server, worker: Worker) -> None:
    """Forget an exited worker's live gauges (its open streams are closed, so they do not count).

    What ``prometheus_client.multiprocess.mark_process_dead`` does, without importing
    prometheus-client into the master (the workers it forks later would inherit it unpatched).
    """
    path = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if not path:
        return
    for name in glob.glob(os.path.join(path, f"gauge_live*_{worker.pid}.db")):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass


def on_exit(server: Server) -> None:
    """Remove the metrics directory this module created."""
    if _metrics_dir is not None:
        shutil.rmtree(_metrics_dir, ignore_errors=True)


def post_fork(server: Server, worker: Worker) -> None:
    """Fix glibc's mmap threshold (``MMAP_THRESHOLD``): huge blocks go back to the system.

    The heap's trim threshold is twice that, glibc's own rule when it moves the thresholds.

    glibc raises its mmap threshold as large blocks are freed (up to 32 MiB), after which big
    payloads come from the heap and fragment it: a worker that streamed 20 MB of 10 KB events
    kept growing even after the data was gone. A fixed threshold maps larger blocks and unmaps
    them on free. It sits above a stream's writes (``max_chunk``, 256 KiB, and gunicorn's
    framed copy of it): mapped, each write cost a fresh mmap, its page faults and an munmap,
    about a fifth of a fast stream's time; trimmed at 128 KiB, the heap's top was given back
    and faulted in again for every write (bench/PROFILE.md). Skipped where the C library is
    not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
        # Fixing one threshold fixes the other at its 128 KiB default: every write freed at
        # the heap's top was then given back and faulted in again by the next one.
        libc.mallopt(m_trim_threshold, 2 * MMAP_THRESHOLD)
    except (OSError, AttributeError):
        server.log.debug("mallopt unavailable; keeping the C library's defaults")


def post_worker_init(worker: Worker) -> None:
    """Watch for the worker's stop and end every open stream then.

    gunicorn would otherwise wait ``graceful_timeout`` and kill the streams mid-body, without
    running their ``finally``. Workers only flip ``worker.alive`` when told to stop, so the
    watch polls it: in a greenlet under gevent (which patched ``threading`` and ``time`` before
    this hook runs), in a daemon thread under the thread-based workers.
    """
    from .runners import gevent_active
    from .server import inline_keepalives, shutdown_streams

    # CPython's collector defaults (a young collection every 700 new container objects, a
    # full one walking every live object) paused a worker with 10,000 open streams for 30 ms
    # about every second and for 0.5 s every few: each such pause lands on a fan-out in
    # progress. Objects loaded with the app never become garbage: frozen, they are never
    # walked again; young collections come every 50,000 allocations (a few ms each).
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)

    # gevent's hub runs ready greenlets (a fan-out's woken subscribers: thousands) for up to
    # the switch interval before it polls for I/O, and every greenlet waiting on a socket
    # waits that long again: a publish (request, Redis reply) waits twice (bench table 7,
    # publish and probe columns); a poll costs about a microsecond. Outside gevent the
    # interval only paces the GIL between threads, which these workers barely have.
    if gevent_active():
        sys.setswitchinterval(SWITCH_INTERVAL)

    # gunicorn's HTTP protocol frames bodies as HTTP/1.x: proof that inline streams may frame
    # keep-alives the same way. uwsgi bodies are not HTTP-framed: every byte then goes through
    # gunicorn's own writes.
    inline_keepalives(getattr(worker.cfg, "protocol", "http") == "http")

    def watch() -> None:
        while worker.alive:
            time.sleep(WATCH_INTERVAL)
        ended = shutdown_streams(shutdown_retry_ms, shutdown_retry_window_ms)
        worker.log.info("worker %s stopping: ended %d open streams", worker.pid, ended)

    threading.Thread(target=watch, name="stream-shutdown-watch", daemon=True).start()


def pre_exec(server: Server) -> None:
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


def worker_exit(server: Server, worker: Worker) -> None:
    """Close the app's broker as the worker exits: a Redis reader stops, connections close.

    Runs in the worker after its loop ended (the streams already ended). The broker is the one
    a Flask app keeps in ``app.extensions["stream.broker"]``; other apps have nothing to close.
    """
    extensions = getattr(getattr(worker, "wsgi", None), "extensions", None)
    broker = extensions.get("stream.broker") if isinstance(extensions, dict) else None
    if broker is None:
        return
    try:
        broker.close()
    except Exception:  # noqa: BLE001 - exiting anyway: say so, never hang or crash the exit
        worker.log.exception("worker %s exiting: closing the broker failed", worker.pid)
    else:
        worker.log.info("worker %s exiting: closed the broker", worker.pid)
