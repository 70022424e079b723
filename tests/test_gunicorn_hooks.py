"""The service's gunicorn.conf.py: settings checked once, one worker without Redis, Redis pinged.

Every test starts the real ``gunicorn wsgi:app`` from the repository root (or fails to, on
purpose) and reads what it logged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.service import ROOT, Service, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ONE_WORKER = "running 1 worker instead of"


def _bootings(svc: Service) -> int:
    return svc.log().count("Booting worker with pid")


def _job_reads(svc: Service, times: int) -> list[int]:
    started = requests.post(
        svc.url + "/jobs", json={"count": 2, "interval": 0, "size": 0}, timeout=10
    )
    assert started.status_code == 202, started.text
    url = svc.url + started.json()["events_url"]
    return [requests.get(url, timeout=10).status_code for _ in range(times)]


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"GUNICORN_CMD_ARGS": "-w 3"}, id="-w 3"),
        pytest.param({"WEB_CONCURRENCY": "3"}, id="WEB_CONCURRENCY=3"),
    ],
)
def test_without_redis_one_worker_runs_and_the_log_says_so(
    start_service: Callable[..., Service], env: dict[str, str]
) -> None:
    svc = start_service(env)
    # Every read of one job reaches the worker that holds it: with three workers, two in three
    # would answer 404.
    assert _job_reads(svc, 6) == [200] * 6
    assert len(svc.worker_pids()) == 1
    assert _bootings(svc) == 1
    if "GUNICORN_CMD_ARGS" in env:
        assert f"{ONE_WORKER} 3" in svc.log()
    assert "broker: in-process (one worker)" in svc.log()


def test_without_redis_ttin_adds_no_worker(start_service: Callable[..., Service]) -> None:
    svc = start_service()
    svc.send_signal(signal.SIGTTIN)
    wait_for(lambda: f"{ONE_WORKER} 2" in svc.log())
    assert _job_reads(svc, 6) == [200] * 6
    assert len(svc.worker_pids()) == 1
    assert _bootings(svc) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "x"),
        ("PORT", "70000"),
        ("WEB_CONCURRENCY", "0"),
        ("GRACEFUL_TIMEOUT", "-1"),
        ("GRACEFUL_TIMEOUT", "ten"),
        ("GUNICORN_TIMEOUT", "1.5"),
        ("GUNICORN_KEEPALIVE", "-3"),
        ("STREAM_MAX_STREAMS", "1e4"),
        ("LOG_LEVEL", "loud"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("REDIS_URL", "redis://127.0.0.1:port"),
        ("STREAM_HEARTBEAT", "abc"),
        ("STREAM_HEARTBEAT", "0"),
        ("STREAM_MAX_BODY", "-1"),
        ("STREAM_HISTORY_AGE", "nan"),
        ("STREAM_QUEUE_SIZE", "1.5"),
        ("STREAM_MAX_LIFETIME", "-2"),
        ("STREAM_SHUTDOWN_RETRY", "soon"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(name: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PORT")}
    env[name] = value
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "wsgi:app", "--bind", f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{name}={value!r}" in lines[0]
    assert "expected" in lines[0]


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_redis_reachable_is_logged_before_workers_fork(
    start_service: Callable[..., Service], redis_url: str
) -> None:
    svc = start_service({"REDIS_URL": redis_url, "WEB_CONCURRENCY": "2"})
    log = svc.log()
    assert f"broker: Redis at {redis_url} is reachable" in log
    assert log.index("is reachable") < log.index("Booting worker")
    wait_for(lambda: len(svc.worker_pids()) == 2)
    # The ping used no redis-py in the master (importing redis loads hiredis): workers forked
    # from it would inherit redis' retry sleeping through gevent's loop. The workers import it.
    assert svc.proc is not None
    assert "hiredis" not in _mapped(svc.proc.pid)
    # (the second worker may still be importing the app)
    wait_for(lambda: all("hiredis" in _mapped(pid) for pid in svc.worker_pids()), 20)


class _Booting(Service):
    """A service that counts as started once its master logged the broker check."""

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        return "Booting worker" in self.log()


def test_redis_unreachable_is_logged_and_the_service_still_starts(tmp_path: Path) -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    svc = _Booting(tmp_path, {"REDIS_URL": url}).start()
    try:
        log = svc.log()
        assert "broker: Redis at redis://:***@127.0.0.1:" in log
        assert "is unreachable: " in log
        assert "secret" not in log
        # the workers start and answer, saying the broker is down
        status = wait_for(lambda: requests.get(svc.url + "/healthz", timeout=2).status_code, 20)
        assert status == 503
    finally:
        svc.stop()
