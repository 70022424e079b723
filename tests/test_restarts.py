"""Restarts without a thundering herd and without losing anything (the real service).

- SIGTERM: every SSE stream ends cleanly with its own ``retry:`` hint, spread over
  [STREAM_SHUTDOWN_RETRY, + STREAM_SHUTDOWN_RETRY_WINDOW] (3 to 10 s by default).
- Zero-downtime restarts with Redis: ``kill -HUP`` the master, or ``USR2`` then ``TERM`` the
  old master (``WINCH`` first, to stop the old workers, where the master is daemonized). A
  ``stream.Client`` follows a channel while a publisher publishes numbered values on fresh
  connections throughout: every publish is accepted, and the subscriber receives every value
  once, in order (it resumes with ``Last-Event-ID``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from stream import Client
from tests.service import ROOT, Service, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def publish(url: str, channel: str, value: Any) -> str:
    """Publish one value on a fresh connection (it may land on any worker); its id."""
    resp = requests.post(
        f"{url}/channels/{channel}",
        data=orjson.dumps(value),
        headers={"Content-Type": "application/json", "Connection": "close"},
        timeout=10,
    )
    assert resp.status_code == 201, resp.text
    ids: list[str] = resp.json()["ids"]
    return ids[0]


def open_streams(svc: Service) -> int:
    return int(requests.get(svc.url + "/healthz", timeout=5).json()["open_streams"])


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def gone(pid: int) -> bool:
    """Whether the process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_sigterm_spreads_the_retry_hints_of_sse_streams(
    start_service: Callable[..., Service],
) -> None:
    svc = start_service()
    streams = [
        requests.get(svc.url + "/channels/spread?format=sse", stream=True, timeout=(5, 20))
        for _ in range(8)
    ]
    wait_for(lambda: open_streams(svc) == 8)
    with ThreadPoolExecutor(1) as pool:
        stopped = pool.submit(svc.stop, signal.SIGTERM, 20)
        hints = []
        for resp in streams:
            with resp:
                assert resp.status_code == 200
                # The whole body, up to the chunked terminator: urllib3 raises if it is cut.
                body = resp.raw.read()
            match = re.fullmatch(rb"(?::\n)*retry: (\d+)\n\n", body)
            assert match, body
            hints.append(int(match.group(1)))
        assert stopped.result(timeout=25) == 0
    assert all(3000 <= hint <= 10_000 for hint in hints), hints
    assert len(set(hints)) > 1, hints


def follow_through(url: str, restart: Callable[[], None], fmt: str) -> None:
    """Publish numbered values and follow them while ``restart`` runs; assert none is lost."""
    channel = f"restart-{uuid.uuid4().hex[:8]}"
    start_id = publish(url, channel, "start")
    received: list[Any] = []
    failures: list[BaseException] = []

    def follow() -> None:
        try:
            with (
                Client(url, timeout=(5, 30)) as client,
                client.stream(f"/channels/{channel}", last_event_id=start_id, format=fmt) as s,
            ):
                for value in s:
                    received.append(value)
                    if value == "last":
                        return
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    published: list[int] = []
    restarted = threading.Event()

    def publish_until_restarted() -> None:
        # Values every 20 ms before, during and after the restart; 20 more once it is over.
        after = 0
        while after < 20:
            if restarted.is_set():
                after += 1
            publish(url, channel, len(published))
            published.append(len(published))
            restarted.wait(0.02)
        publish(url, channel, "last")

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    with ThreadPoolExecutor(1) as pool:
        publishing = pool.submit(publish_until_restarted)
        wait_for(lambda: len(published) >= 20, timeout=10)
        try:
            restart()
        finally:
            restarted.set()
        publishing.result(timeout=30)
    follower.join(40)
    assert not follower.is_alive(), f"received {len(received)} of {len(published)}"
    assert failures == []
    assert received == [*published, "last"]
    assert len(published) > 40


def redis_env(redis_url: str, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "WEB_CONCURRENCY": "1", **extra}


@pytest.mark.parametrize("fmt", ["ndjson", "sse"])
def test_hup_restart_loses_nothing(
    start_service: Callable[..., Service], redis_url: str, fmt: str
) -> None:
    svc = start_service(redis_env(redis_url))

    def hup() -> None:
        (old,) = svc.worker_pids()
        svc.send_signal(signal.SIGHUP)
        # A new worker serves, and the old one has ended its streams and exited.
        wait_for(lambda: gone(old) and len(svc.worker_pids()) == 1, timeout=20)

    follow_through(svc.url, hup, fmt)
    # The follower's stream was ended by the old worker's shutdown, and resumed.
    assert re.search(r"stream \S+ ended: shutdown after", svc.log())


def test_usr2_then_term_upgrade_loses_nothing(
    start_service: Callable[..., Service], redis_url: str, tmp_path: Path
) -> None:
    pidfile = tmp_path / "gunicorn.pid"
    svc = start_service(redis_env(redis_url, GUNICORN_CMD_ARGS=f"--pid {pidfile}"))
    assert svc.proc is not None
    old_master = svc.proc.pid
    new_master: list[int] = []

    def upgrade() -> None:
        (old_worker,) = svc.worker_pids()
        svc.send_signal(signal.SIGUSR2)
        # The new master (a child of the old one, on the same listening socket) writes
        # <pidfile>.2 while the old one runs, and starts its own worker.
        pid = wait_for(lambda: int(Path(f"{pidfile}.2").read_text()), timeout=20)
        new_master.append(pid)
        wait_for(lambda: children(pid), timeout=20)
        assert sorted(children(old_master)) == sorted([old_worker, pid])
        # The old master stops its workers gracefully (their streams end, clients resume on
        # the new worker) and exits; the new master keeps the socket. (WINCH, to stop the old
        # workers first, only acts on a daemonized master: see the test below.)
        assert svc.stop(signal.SIGTERM, timeout=20) == 0
        assert gone(old_worker)

    try:
        follow_through(svc.url, upgrade, "ndjson")
        assert re.search(r"stream \S+ ended: shutdown after", svc.log())
        assert new_master and not gone(new_master[0])
        assert requests.get(svc.url + "/healthz", timeout=5).status_code == 200
    finally:
        for pid in new_master:
            if not gone(pid):
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda pid=pid: gone(pid), timeout=20)


def test_usr2_winch_term_upgrade_of_a_daemon_loses_nothing(redis_url: str, tmp_path: Path) -> None:
    # The classic dance, for a daemonized master (the only kind that acts on WINCH): USR2 starts
    # a new master and its workers on the same socket, WINCH stops the old workers gracefully,
    # TERM ends the old master.
    port, pidfile, logfile = free_port(), tmp_path / "g.pid", tmp_path / "g.log"
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if k != "PORT"},
        **redis_env(redis_url, STREAM_HEARTBEAT="1", GRACEFUL_TIMEOUT="10"),
    }
    command = [sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", f"127.0.0.1:{port}"]
    command += ["--daemon", "--pid", str(pidfile), "--error-logfile", str(logfile)]
    subprocess.run([*command, "--capture-output"], cwd=ROOT, env=env, check=True, timeout=20)
    masters: list[int] = []
    try:
        masters.append(wait_for(lambda: int(pidfile.read_text()), timeout=20))
        wait_for(lambda: requests.get(url + "/healthz", timeout=1).status_code == 200, timeout=20)

        def upgrade() -> None:
            old_master = masters[0]
            (old_worker,) = children(old_master)
            os.kill(old_master, signal.SIGUSR2)
            new_master = wait_for(lambda: int(Path(f"{pidfile}.2").read_text()), timeout=20)
            masters.append(new_master)
            wait_for(lambda: children(new_master), timeout=20)
            os.kill(old_master, signal.SIGWINCH)
            wait_for(lambda: gone(old_worker), timeout=20)
            # Reaped by the old master, which now only has the new master as a child.
            wait_for(lambda: children(old_master) == [new_master], timeout=10)
            os.kill(old_master, signal.SIGTERM)
            wait_for(lambda: gone(old_master), timeout=20)

        follow_through(url, upgrade, "sse")
        log = logfile.read_text(errors="replace")
        assert "graceful stop of workers" in log
        assert re.search(r"stream \S+ ended: shutdown after", log)
        assert requests.get(url + "/healthz", timeout=5).status_code == 200
    finally:
        for pid in masters:
            if not gone(pid):
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda pid=pid: gone(pid), timeout=20)
