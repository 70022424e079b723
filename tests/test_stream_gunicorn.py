"""``stream.gunicorn``'s hooks and the service config's helpers, as units.

gunicorn's arbiter and worker are stand-ins here (the hooks use a few of their attributes);
stream.server's process-wide switches are replaced by recorders, so nothing here shuts down the
test process's streams. The real thing runs in tests/test_gunicorn_hooks.py and
tests/test_install.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from tests.service import ROOT, wait_for


def _conf() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "service_gunicorn_conf", ROOT / "gunicorn.conf.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:p%40ss@host/1", "rediss://user:***@host/1"),
    ],
)
def test_the_redis_url_is_logged_without_its_password(url: str, shown: str) -> None:
    assert _conf()._redacted(url) == shown


def test_ping_is_resp() -> None:
    assert _conf()._command("AUTH", "u", "pässword") == (
        b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$9\r\np\xc3\xa4ssword\r\n"
    )


def test_stream_gunicorn_star_brings_only_hooks_and_settings() -> None:
    code = "from stream.gunicorn import *\nprint(sorted(n for n in dir() if not n.startswith('_')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    assert out.strip() == str(
        sorted(
            [
                "child_exit",
                "on_exit",
                "on_starting",
                "post_fork",
                "post_worker_init",
                "pre_exec",
                "worker_class",
                "worker_exit",
            ]
        )
    )


# -- stream.gunicorn's hooks as units, with stand-ins for gunicorn's arbiter and worker ---------


class FakeLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def _add(self, level: str, msg: str, *args: object) -> None:
        self.lines.append((level, msg % args))

    def info(self, msg: str, *args: object) -> None:
        self._add("info", msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self._add("warning", msg, *args)

    def debug(self, msg: str, *args: object) -> None:
        self._add("debug", msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        self._add("exception", msg, *args)


class FakeWorker:
    def __init__(self, protocol: str = "http", wsgi: object = None) -> None:
        self.alive = True
        self.pid = 4242
        self.log = FakeLog()
        self.cfg = SimpleNamespace(protocol=protocol)
        self.wsgi = wsgi


class FakeServer:
    def __init__(self) -> None:
        self.log = FakeLog()
        self.cfg = SimpleNamespace()


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """stream.gunicorn with stream.server's process-wide switches replaced by recorders."""
    import stream.gunicorn
    import stream.server

    calls: list[object] = []
    monkeypatch.setattr(stream.server, "shutdown_streams", lambda *a: calls.append("shutdown") or 3)
    monkeypatch.setattr(stream.server, "inline_keepalives", lambda on: calls.append(("inline", on)))
    monkeypatch.setattr(stream.gunicorn, "_metrics_dir", None)
    # Recorded, so that what on_starting sets is undone: later tests' services inherit os.environ.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setattr(stream.gunicorn, "WATCH_INTERVAL", 0.01)
    monkeypatch.setattr(stream.gunicorn, "calls", calls, raising=False)
    return stream.gunicorn


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("protocol", "inline"), [("http", [("inline", True)]), ("uwsgi", [("inline", False)])]
)
def test_post_worker_init_ends_the_streams_when_the_worker_stops(
    hooks: ModuleType, protocol: str, inline: list[object]
) -> None:
    worker = FakeWorker(protocol)
    hooks.post_worker_init(worker)
    assert hooks.calls == inline  # type: ignore[attr-defined]
    worker.alive = False
    wait_for(lambda: "shutdown" in hooks.calls)  # type: ignore[attr-defined]
    wait_for(lambda: ("info", "worker 4242 stopping: ended 3 open streams") in worker.log.lines)


class Broker:
    def __init__(self, fails: bool = False) -> None:
        self.fails = fails
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.fails:
            raise OSError("connection reset")


@pytest.mark.parametrize("fails", [False, True])
def test_worker_exit_closes_the_apps_broker(hooks: ModuleType, fails: bool) -> None:
    broker = Broker(fails)
    worker = FakeWorker(wsgi=SimpleNamespace(extensions={"stream.broker": broker}))
    hooks.worker_exit(FakeServer(), worker)
    assert broker.closed
    level = "exception" if fails else "info"
    assert [lvl for lvl, _ in worker.log.lines] == [level]


@pytest.mark.parametrize("wsgi", [None, SimpleNamespace(extensions={}), lambda e, s: []])
def test_worker_exit_without_a_broker_does_nothing(hooks: ModuleType, wsgi: object) -> None:
    worker = FakeWorker(wsgi=wsgi)
    hooks.worker_exit(FakeServer(), worker)
    assert worker.log.lines == []


def test_post_fork_sets_the_mmap_threshold(hooks: ModuleType) -> None:
    server = FakeServer()
    hooks.post_fork(server, FakeWorker())
    assert server.log.lines == []  # glibc here: no fallback taken


def test_metrics_dir_lives_from_start_to_exit(
    hooks: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(sys.modules, "prometheus_client", raising=False)
    server = FakeServer()
    hooks.on_starting(server)
    path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert path.is_dir()
    worker = FakeWorker()
    live = path / f"gauge_livesum_{worker.pid}.db"
    counter = path / f"counter_{worker.pid}.db"
    other = path / f"gauge_livesum_{worker.pid + 1}.db"
    for f in (live, counter, other):
        f.write_bytes(b"")
    hooks.child_exit(server, worker)
    # the exited worker's live gauges go; its counters and other workers' gauges stay
    assert sorted(p.name for p in path.iterdir()) == sorted([counter.name, other.name])
    hooks.on_exit(server)
    assert not path.exists()


def test_metrics_dir_given_is_used_created_and_kept(
    hooks: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    given = tmp_path / "metrics"  # not there yet: prometheus-client would not create it
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(given))
    server = FakeServer()
    hooks.on_starting(server)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(given)
    assert given.is_dir()
    hooks.on_exit(server)
    assert given.is_dir()


def test_metrics_stay_per_worker_when_prometheus_is_already_loaded(
    hooks: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prometheus_client

    monkeypatch.setitem(sys.modules, "prometheus_client", prometheus_client)
    server = FakeServer()
    hooks.on_starting(server)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert [lvl for lvl, _ in server.log.lines] == ["warning"]
    hooks.child_exit(server, FakeWorker())  # no directory: nothing to forget


def test_the_master_imports_nothing_but_the_standard_library() -> None:
    # What gunicorn's master loads with the config file: gevent must patch the workers first,
    # and the app, Flask, redis-py and prometheus-client belong to the workers.
    code = (
        "import sys\nfrom stream.gunicorn import *\n"
        "bad = ['flask', 'werkzeug', 'gevent', 'greenlet', 'redis', 'requests', 'httpx',\n"
        "       'prometheus_client', 'app', 'wsgi', 'stream.server', 'stream.metrics']\n"
        "print(','.join(sorted(n for n in bad if n in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.timeout(30)
@pytest.mark.parametrize("patched", [True, False])
def test_post_worker_init_shortens_the_hubs_run_under_gevent_only(
    hooks: ModuleType, monkeypatch: pytest.MonkeyPatch, patched: bool
) -> None:
    import stream.runners

    before = sys.getswitchinterval()
    monkeypatch.setattr(stream.runners, "gevent_active", lambda: patched)
    try:
        sys.setswitchinterval(0.005)
        worker = FakeWorker()
        hooks.post_worker_init(worker)
        expected = hooks.SWITCH_INTERVAL if patched else 0.005
        assert sys.getswitchinterval() == pytest.approx(expected)
        worker.alive = False
        wait_for(lambda: "shutdown" in hooks.calls)  # type: ignore[attr-defined]
    finally:
        sys.setswitchinterval(before)
