"""How each peer's server is started (all on 127.0.0.1, free ports, one worker each)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from bench.common import LOGS, PY, ROOT, Server, free_port, wait_for

UVICORN = ["--loop", "uvloop", "--http", "httptools", "--host", "127.0.0.1"]


@cache
def service_importable() -> bool:
    """Whether ``gunicorn wsgi:app`` can start (app.py needs stream/broker/, not there yet)."""
    r = subprocess.run([PY, "-c", "import app"], cwd=ROOT, capture_output=True, timeout=60)
    return r.returncode == 0


def seed() -> Server:
    """The seed's approach: FastAPI StreamingResponse on uvicorn (uvloop, httptools)."""
    return Server(
        "seed", lambda p: [PY, "-m", "uvicorn", "bench.peers.seed:app", *UVICORN, "--port", str(p)]
    )


def fastapi_sse() -> Server:
    """FastAPI's own EventSourceResponse on uvicorn (uvloop, httptools)."""
    return Server(
        "fastapi-sse",
        lambda p: [PY, "-m", "uvicorn", "bench.peers.fastapi_sse:app", *UVICORN, "--port", str(p)],
    )


def flask_naive() -> Server:
    """The naive Flask generator on gunicorn + gevent, one worker, gunicorn's defaults."""
    return Server(
        "flask-naive",
        lambda p: [
            PY,
            "-m",
            "gunicorn",
            "-c",
            "bench/peers/gunicorn_naive.py",
            "--bind",
            f"127.0.0.1:{p}",
            "bench.peers.flask_naive:app",
        ],
        forks_worker=True,
    )


def project_service() -> Server:
    """This project: ``gunicorn wsgi:app`` from the repository root (its gunicorn.conf.py)."""
    return Server(
        "project",
        lambda p: [PY, "-m", "gunicorn", "wsgi:app", "--bind", f"127.0.0.1:{p}"],
        env={"STREAM_HEARTBEAT": "15", "WEB_CONCURRENCY": "1"},
        forks_worker=True,
    )


def project_service_redis(redis_url: str, workers: int = 2) -> Server:
    """This project on Redis Streams with ``workers`` gunicorn workers."""
    return Server(
        "project-redis",
        lambda p: [PY, "-m", "gunicorn", "wsgi:app", "--bind", f"127.0.0.1:{p}"],
        env={"STREAM_HEARTBEAT": "15", "WEB_CONCURRENCY": str(workers), "REDIS_URL": redis_url},
        forks_worker=True,
        workers=workers,
    )


@contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    LOGS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, open(LOGS / "redis.log", "ab") as log:
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", ""]
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            import redis

            client = redis.Redis(port=port)
            wait_for(client.ping, 10)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def project_tls(cert: str, key: str) -> Server:
    """This project serving HTTPS itself: ``gunicorn wsgi:app --certfile --keyfile``."""
    return Server(
        "project-tls",
        lambda p: (
            [PY, "-m", "gunicorn", "wsgi:app", "--bind", f"127.0.0.1:{p}"]
            + ["--certfile", cert, "--keyfile", key]
        ),
        env={"STREAM_HEARTBEAT": "15", "WEB_CONCURRENCY": "1"},
        forks_worker=True,
        scheme="https",
    )


def seed_tls(cert: str, key: str) -> Server:
    """The seed (FastAPI StreamingResponse on uvicorn) serving HTTPS itself."""
    return Server(
        "seed-tls",
        lambda p: (
            [PY, "-m", "uvicorn", "bench.peers.seed:app", *UVICORN, "--port", str(p)]
            + ["--ssl-certfile", cert, "--ssl-keyfile", key]
        ),
        scheme="https",
    )


def project_bench() -> Server:
    """``stream.server.stream_response`` in a bench-only app, under the repo's gunicorn.conf.py."""
    return Server(
        "project-bench",
        lambda p: [
            PY,
            "-m",
            "gunicorn",
            "bench.peers.project_bench:app",
            "--bind",
            f"127.0.0.1:{p}",
        ],
        env={"STREAM_HEARTBEAT": "15", "WEB_CONCURRENCY": "1"},
        forks_worker=True,
    )


def project_events() -> tuple[Server, str]:
    """The server for the project's ``/events``: the service, or the bench app until it imports."""
    if service_importable():
        return project_service(), "gunicorn wsgi:app"
    return project_bench(), (
        "bench/peers/project_bench.py (app.py did not import yet: "
        "same stream_response path, same gunicorn.conf.py)"
    )
