"""A real ``redis-server`` for the tests: one per session, on a free loopback port.

It runs in a temporary directory with ``--save "" --appendonly yes --appendfsync always``, so
every acknowledged write is on disk and ``RedisServer.restart()`` (stop, then start on the same
port and directory) keeps the data, as a production Redis with AOF would. A missing
``redis-server`` fails the tests that need it: a skipped Redis suite would look green.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import free_port, wait_for


class RedisServer:
    """One ``redis-server`` process with AOF on, bound to 127.0.0.1."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            pytest.fail(
                "redis-server is not installed (apt-get install redis-server); the Redis broker "
                "tests need a real one and are never skipped",
                pytrace=False,
            )
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start the server and wait until it answers PING (after loading its AOF)."""
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--daemonize", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._log = log
        wait_for(self.ready, timeout)
        return self

    def ready(self) -> bool:
        """Whether the server answers ``+PONG`` (``-LOADING`` while it reads its AOF)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{self.log()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``) and wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None
        self._log.close()

    def restart(self) -> None:
        """Stop, then start again on the same port and directory (the AOF keeps the data)."""
        self.stop()
        self.start()

    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """The server's log so far."""
        path = self.directory / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """The session's redis-server (started on first use, killed at the end)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:<port>/0`` of the session's redis-server."""
    return redis_server.url


@pytest.fixture
def restart_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's server, for a test that stops or restarts it; it is running again after."""
    try:
        yield redis_server
    finally:
        if not redis_server.running():
            redis_server.start()
