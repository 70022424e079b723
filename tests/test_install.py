"""The distribution as a new user gets it: the wheel, installed into fresh virtualenvs.

The wheel is built once from a copy of the sources (never from the working tree's own
``build/``, which can hold modules deleted since). The runtime set pinned in requirements.txt is
downloaded once into a wheelhouse (kept in ``~/.cache`` for later runs); each virtualenv then
installs the wheel with one extra, offline, from there. Each environment runs from a temporary
directory, so ``import stream`` finds the installed package and never this repository's.

The server test runs a user's own Flask app (written here, not this repository's ``app.py``)
under ``gunicorn -k gevent -c <a config that does from stream.gunicorn import *>``, and stops it
with SIGTERM while a stream is open.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.service import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
DIST = "flask-json-stream"
#: what a missing extra's ImportError must say, by extra
HINT = "pip install '" + DIST + "[{}]'"
#: far above how long a clean shutdown takes: a master still waiting for its workers at this
#: point is waiting out graceful_timeout, which is what the shutdown hooks exist to avoid
GRACEFUL_TIMEOUT = 60
#: what pyproject.toml's [build-system] requires
BUILD_BACKEND = "setuptools>=68"


def _run(args: list[str | Path], timeout: float = 240, **kwargs: object) -> str:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs
    )  # type: ignore[call-overload]
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return str(result.stdout)


def _clean_env(venv: Path) -> dict[str, str]:
    """An environment as a new shell with ``venv`` activated: nothing of this repository's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PROMETHEUS_MULTIPROC_DIR", "REDIS_URL", "PORT")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned runtime set (requirements.txt), its dependencies and the build backend.

    Kept in the user's cache directory, one per content of requirements.txt, so later runs
    need no network at all.
    """
    pins = (ROOT / "requirements.txt").read_bytes() + BUILD_BACKEND.encode()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    house = cache / "flask-json-stream-tests" / hashlib.sha256(pins).hexdigest()[:16]
    if (house / "complete").exists():
        return house
    partial = tmp_path_factory.mktemp("wheelhouse")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "-d",
            partial,
            "-r",
            ROOT / "requirements.txt",
            BUILD_BACKEND,
        ],
        timeout=280,
    )
    (partial / "complete").write_text("")
    house.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(house, ignore_errors=True)
    shutil.copytree(partial, house)
    return house


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Path:
    """The wheel, built from a copy of what the distribution is made of."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "stream", src / "stream", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    _run(
        [
            sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out,
            "--no-index", "--find-links", wheelhouse,  # the build backend, from there too
            src,
        ]
    )  # fmt: skip
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def make_venv(
    tmp_path_factory: pytest.TempPathFactory, wheel: Path, wheelhouse: Path
) -> Iterator[object]:
    """A factory: a fresh virtualenv with the wheel and one extra installed (one per extra)."""
    made: dict[str, Path] = {}

    def make(extra: str) -> Path:
        if extra not in made:
            venv = tmp_path_factory.mktemp(f"venv-{extra}")
            _run([sys.executable, "-m", "venv", "--without-pip", venv])
            _run(
                [
                    sys.executable, "-m", "pip", "--python", venv / "bin" / "python",
                    "install", "-q", "--no-index", "--find-links", wheelhouse,
                    f"{DIST}[{extra}] @ {wheel.as_uri()}",
                ]
            )  # fmt: skip
            made[extra] = venv
        return made[extra]

    yield make


def _python(venv: Path, code: str, cwd: Path) -> str:
    """Run ``code`` with the virtualenv's interpreter, from a directory outside the repository."""
    return _run(
        [venv / "bin" / "python", "-c", textwrap.dedent(code)], cwd=cwd, env=_clean_env(venv)
    )


def test_flask_extra_serves_streams_and_names_the_missing_extras(
    make_venv: object, tmp_path: Path
) -> None:
    venv = make_venv("flask")  # type: ignore[operator]
    out = _python(
        venv,
        """
        import importlib.metadata, importlib.util, json, pathlib, sys
        import stream
        from stream import stream_response
        from stream import metrics
        from flask import Flask

        app = Flask("user_app")

        @app.get("/")
        def view():
            return stream_response(iter([{"a": 1}, {"b": 2}]))

        body = app.test_client().get("/").get_data().decode()
        # The brokers' package is in the wheel and needs no extra in process.
        from stream.broker import create_broker
        from stream.wire import END
        broker = create_broker(None)
        broker.publish("k", [("message", b"1"), (END, b"null")])
        logged = [entry.event for entry in broker.subscribe("k", from_start=True).get(1.0)]
        errors = {}
        for extra, statement in [
            ("aio", "from stream.aio import AsyncClient"),
            ("client", "from stream import Client"),
            ("redis", "import stream.broker.redis"),
        ]:
            try:
                exec(statement)
            except ImportError as exc:
                errors[extra] = str(exc)
        print(json.dumps({
            "file": stream.__file__,
            "typed": (pathlib.Path(stream.__file__).parent / "py.typed").exists(),
            "version": stream.__version__,
            "dist_version": importlib.metadata.version("flask-json-stream"),
            "body": body,
            "metrics_installed": metrics.INSTALLED,
            "metrics": metrics.render().decode(),
            "absent": [m for m in ("requests", "httpx", "gevent", "gunicorn", "prometheus_client")
                       if importlib.util.find_spec(m) is not None],
            "errors": errors,
            "logged": logged,
        }))
        """,
        tmp_path,
    )
    got = json.loads(out)
    assert got["file"].startswith(str(venv)), "imported this repository's stream, not the wheel's"
    assert got["typed"] is True
    assert got["version"] == got["dist_version"]
    assert got["body"] == '{"a":1}\n{"b":2}\n'
    assert got["absent"] == []  # the flask extra brought Flask and orjson, nothing else
    assert got["metrics_installed"] is False
    assert HINT.format("metrics") in got["metrics"]
    assert set(got["errors"]) == {"aio", "client", "redis"}
    assert got["logged"] == ["message", "end"]
    for extra, message in got["errors"].items():
        assert HINT.format(extra) in message, message


@pytest.fixture
def user_app(tmp_path: Path) -> Path:
    """A user's own app and gunicorn config, in a directory of their own."""
    (tmp_path / "userapp.py").write_text(
        textwrap.dedent(
            """
            import os
            import pathlib
            import time

            from flask import Flask

            import stream
            from stream import stream_response

            app = Flask(__name__)
            MARKER = pathlib.Path(os.environ["MARKER_DIR"])


            @app.get("/where")
            def where():
                return {"stream": stream.__file__}


            @app.get("/count")
            def count():
                return stream_response({"n": n} for n in range(5))


            @app.get("/ticks")
            def ticks():
                def generate():
                    try:
                        n = 0
                        while True:
                            yield {"n": n}
                            n += 1
                            time.sleep(0.1)
                    finally:
                        (MARKER / "finally").write_text(f"ran after {n}")

                return stream_response(generate())
            """
        )
    )
    (tmp_path / "conf.py").write_text(
        textwrap.dedent(
            f"""
            from stream.gunicorn import *  # noqa: F403

            graceful_timeout = {GRACEFUL_TIMEOUT}
            """
        )
    )
    return tmp_path


class UserServer:
    def __init__(self, venv: Path, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / "gunicorn.log"
        env = _clean_env(venv)
        env["MARKER_DIR"] = str(directory)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    venv / "bin" / "gunicorn", "-k", "gevent", "-c", "conf.py",
                    "--bind", f"127.0.0.1:{self.port}", "userapp:app",
                ],
                cwd=directory,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.where = wait_for(self._where, 30)

    def _where(self) -> str:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        return str(requests.get(self.url + "/where", timeout=1).json()["stream"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def test_client_extra_reads_streams_without_flask(
    make_venv: object, user_app: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server_venv = make_venv("server")  # type: ignore[operator]
    client_venv = make_venv("client")  # type: ignore[operator]
    server = UserServer(server_venv, user_app)
    try:
        cwd = tmp_path_factory.mktemp("client-cwd")
        out = _python(
            client_venv,
            f"""
            import importlib.util, json, stream
            from stream import Client

            values = list(Client({server.url!r}).stream("/count"))
            print(json.dumps({{"file": stream.__file__, "values": values,
                               "flask": importlib.util.find_spec("flask") is not None}}))
            """,
            cwd,
        )
        got = json.loads(out)
        assert got["file"].startswith(str(client_venv))
        assert got["flask"] is False
        assert got["values"] == [{"n": n} for n in range(5)]
        # the command line comes with the client extra
        cli = _run([client_venv / "bin" / "stream", server.url + "/count"], timeout=30, cwd=cwd)
        assert [json.loads(line) for line in cli.splitlines()] == [{"n": n} for n in range(5)]
    finally:
        server.stop()


def test_users_own_app_shuts_down_cleanly_with_a_stream_open(
    make_venv: object, user_app: Path
) -> None:
    venv = make_venv("server")  # type: ignore[operator]
    server = UserServer(venv, user_app)
    try:
        assert server.where.startswith(str(venv))
        body = user_app / "body.ndjson"
        curl = subprocess.Popen(
            ["curl", "-sS", "-N", "--max-time", "60", "-o", str(body), server.url + "/ticks"]
        )
        wait_for(lambda: body.exists() and body.read_text().count("\n") >= 3, 15)

        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(GRACEFUL_TIMEOUT / 2)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the master waited for its workers:\n{server.log()}") from None
        assert code == 0, server.log()

        # curl exits 18 when a chunked body is cut before its last chunk
        assert curl.wait(15) == 0
        lines = body.read_text().splitlines()
        assert [json.loads(line) for line in lines] == [{"n": n} for n in range(len(lines))]
        marker = user_app / "finally"
        assert marker.exists(), server.log()
        assert marker.read_text() == f"ran after {len(lines)}"
        assert "ended 1 open streams" in server.log()
        assert "Worker graceful timeout" not in server.log()
    finally:
        server.stop()
