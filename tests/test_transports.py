"""Every stream on every transport it is served on: the transport matrix.

Transports: HTTP/1.1 and HTTP/1.0 (close-delimited) straight to gunicorn, TLS (gunicorn's
``--certfile``), ``--protocol uwsgi`` behind nginx's ``uwsgi_pass``, and HTTP/2 at the edge
(deploy/nginx.conf: nginx terminating TLS and HTTP/2 in front of gunicorn's HTTP/1.1). Cases: a
stream quieter than the heartbeat (keep-alives between its events), a fast stream (coalesced),
a client that leaves (the generator's ``finally`` runs, the open-streams gauge returns within
the heartbeat + 3 s), SIGTERM (a clean end with SSE's ``retry:``), and a generator that raises
(the error event). The client is curl, which says whether a body ended properly (exit 0) or was
cut, and which HTTP version it spoke. The app is tests/writer_app.py with a 0.4 s heartbeat.

Also here: Chromium on one page over HTTP/2 at the edge, ten EventSources and two fetch NDJSON
readers all flowing at once, and stream.gunicorn's refusal of gunicorn's own (serial) HTTP/2.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests

from tests.service import ROOT, Service, free_port, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(120),
    # The certificates are self-signed: verification is off on purpose.
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]

HEARTBEAT = 0.4
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TRANSPORTS = ["http11", "http10", "tls", "uwsgi", "h2-edge"]
#: the HTTP version curl must report per transport (so a test cannot pass on the wrong one)
VERSIONS = {"http11": "1.1", "http10": "1", "tls": "1.1", "uwsgi": "1.1", "h2-edge": "2"}


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and its key)."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class Backend(Service):
    """gunicorn serving tests/writer_app.py with extra command-line arguments."""

    def __init__(self, tmp: Path, args: list[str]) -> None:
        super().__init__(tmp, {"STREAM_HEARTBEAT": str(HEARTBEAT)}, app="tests.writer_app:app")
        self.args = args

    def start(self, timeout: float = 20.0) -> Backend:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", self.app, "--bind", f"127.0.0.1:{self.port}"]
            + self.args,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        try:
            return super().stop(sig, timeout)
        finally:
            self._log.close()  # also when the master had exited already (SIGTERM cases)


class Nginx:
    """nginx in the foreground with a configuration of its own in a temporary directory."""

    def __init__(self, tmp: Path, server_block: str) -> None:
        self.dir = tmp
        conf = tmp / "nginx.conf"
        temps = "\n".join(
            f"    {name}_temp_path {tmp / name};"
            for name in ("client_body", "proxy", "uwsgi", "fastcgi", "scgi")
        )
        conf.write_text(
            f"daemon off;\nworker_processes 1;\npid {tmp / 'nginx.pid'};\n"
            f"error_log {tmp / 'error.log'} info;\n"
            "events { worker_connections 512; }\n"
            f"http {{\n    access_log off;\n{temps}\n{server_block}\n}}\n"
        )
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def edge_block(port: int, upstream: int, cert: tuple[Path, Path]) -> str:
    """deploy/nginx.conf with this test's ports and certificate."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    for old, new in [
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;"),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{upstream};"),
        ("/etc/ssl/certs/stream.pem", str(cert[0])),
        ("/etc/ssl/private/stream.key", str(cert[1])),
    ]:
        assert old in text, f"deploy/nginx.conf no longer has {old!r}"
        text = text.replace(old, new)
    return text


def uwsgi_block(port: int, upstream: int) -> str:
    return f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include /etc/nginx/uwsgi_params;
            uwsgi_pass 127.0.0.1:{upstream};
            uwsgi_buffering off;
            uwsgi_read_timeout 1h;
        }}
    }}
    """


@dataclass
class Setup:
    """One transport: gunicorn, maybe nginx in front, and how curl reaches it."""

    name: str
    base: str
    curl_args: list[str]
    backend: Backend
    nginx: Nginx | None = None
    session: requests.Session = field(default_factory=requests.Session)

    def get(self, path: str) -> Any:
        resp = self.session.get(self.base + path, timeout=5, verify=False)
        resp.raise_for_status()
        return resp.json()

    def finished(self, name: str) -> int:
        return int(self.get("/finished").get(name, 0))

    def open_streams(self) -> int:
        return int(self.get("/healthz")["open_streams"])

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        try:
            self.backend.stop(timeout=20)
        except subprocess.TimeoutExpired:
            pass


def make_setup(name: str, tmp: Path, cert: tuple[Path, Path]) -> Setup:
    args: list[str] = []
    if name == "tls":
        args = ["--certfile", str(cert[0]), "--keyfile", str(cert[1])]
    elif name == "uwsgi":
        args = ["--protocol", "uwsgi"]
    backend = Backend(tmp, args).start()
    nginx = None
    version = {"http10": ["--http1.0"], "h2-edge": ["--http2"]}.get(name, ["--http1.1"])
    if name == "uwsgi":
        port = free_port()
        nginx = Nginx(tmp, uwsgi_block(port, backend.port))
        base = f"http://127.0.0.1:{port}"
    elif name == "h2-edge":
        port = free_port()
        nginx = Nginx(tmp, edge_block(port, backend.port, cert))
        base = f"https://127.0.0.1:{port}"
    elif name == "tls":
        base = f"https://127.0.0.1:{backend.port}"
    else:
        base = f"http://127.0.0.1:{backend.port}"
    setup = Setup(name, base, version, backend, nginx)
    # Certificates are self-signed here; REQUESTS_CA_BUNDLE would override verify=False.
    setup.session.trust_env = False

    def healthy() -> bool:
        if backend.proc is not None and backend.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited:\n{backend.log()}")
        return bool(setup.get("/healthz")["status"] == "ok")

    try:
        wait_for(healthy, timeout=20)
    except BaseException:
        setup.stop()  # never leave a gunicorn or an nginx behind
        raise
    return setup


@pytest.fixture(scope="module", params=TRANSPORTS)
def setup(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    cert: tuple[Path, Path],
) -> Iterator[Setup]:
    s = make_setup(request.param, tmp_path_factory.mktemp(request.param), cert)
    yield s
    s.stop()


class Curl:
    """curl reading one stream, its body collected as it arrives."""

    def __init__(self, setup: Setup, path: str) -> None:
        self.setup = setup
        self.proc = subprocess.Popen(
            ["curl", "-sS", "-N", "-k", "--noproxy", "*", "--max-time", "60"]
            + ["-w", "%{stderr}\nversion=%{http_version}\n", *setup.curl_args]
            + [setup.base + path],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.body = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            self.body += chunk

    def wait(self, timeout: float = 30) -> tuple[int, bytes, str]:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode(errors="replace")
        self._close_pipes()
        assert f"version={VERSIONS[self.setup.name]}\n" in err, err
        return rc, self.body, err

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        self._reader.join(5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def values(body: bytes) -> list[Any]:
    """The NDJSON values of a body (keep-alives are JSON whitespace before a value)."""
    return [json.loads(line) for line in body.split(b"\n") if line.strip()]


def test_a_quiet_stream_gets_keepalives_and_all_its_events(setup: Setup) -> None:
    curl = Curl(setup, "/pattern?spec=w3&wait=1.2&tag=quiet")
    rc, body, err = curl.wait()
    assert rc == 0, err
    assert [v["seq"] for v in values(body)] == [0, 1, 2]
    # Keep-alives (a single space) before the first event and in each 1.2 s gap between two.
    gaps = body.split(b"\n")
    assert gaps[0].startswith(b" ") and gaps[1].startswith(b" ") and gaps[2].startswith(b" ")


def test_a_fast_stream_arrives_whole_and_in_order(setup: Setup) -> None:
    curl = Curl(setup, "/pattern?spec=w1,b20000,w1&wait=0.01&tag=fast")
    rc, body, err = curl.wait()
    assert rc == 0, err
    got = values(body)
    assert [v["seq"] for v in got] == list(range(20002))
    assert {v["tag"] for v in got} == {"fast"}


def test_a_client_that_leaves_is_noticed(setup: Setup) -> None:
    before = setup.finished("blocked")
    curl = Curl(setup, "/blocked")
    wait_for(lambda: b'{"first":true}' in curl.body, timeout=10)
    assert setup.open_streams() == 1
    curl.kill()
    # The generator's finally ran and the gauge is back, within the heartbeat + 3 s.
    wait_for(
        lambda: setup.finished("blocked") == before + 1 and setup.open_streams() == 0,
        timeout=HEARTBEAT + 3,
    )


def test_a_generator_that_raises_ends_with_the_error_event(setup: Setup) -> None:
    rc, body, err = Curl(setup, "/fails").wait()
    assert rc == 0, err
    assert values(body) == [
        {"seq": 0},
        {"seq": 1},
        {"error": {"code": "internal_error", "message": "the stream failed on the server"}},
    ]


@pytest.mark.parametrize("name", TRANSPORTS)
def test_sigterm_ends_the_stream_cleanly_with_a_retry_hint(
    name: str, tmp_path: Path, cert: tuple[Path, Path]
) -> None:
    setup = make_setup(name, tmp_path, cert)
    try:
        curl = Curl(setup, "/blocked?format=sse")
        wait_for(lambda: b'data: {"first":true}' in curl.body, timeout=10)
        setup.backend.send_signal(signal.SIGTERM)
        rc, body, err = curl.wait()
        assert rc == 0, err  # a proper end of the body, not a cut
        blocks = body.split(b"\n\n")
        assert blocks[-1] == b"" and blocks[-2].startswith(b"retry: "), body
        assert setup.backend.proc is not None
        setup.backend.proc.wait(20)
        assert "stream blocked ended: shutdown" in setup.backend.log()
    finally:
        setup.stop()


def test_gunicorns_serial_http2_is_refused() -> None:
    # gunicorn 27's gevent worker serves one HTTP/2 connection's streams one after another: a
    # page's second EventSource would never open. The hook stops the start, saying why.
    from stream import gunicorn as hooks

    server = SimpleNamespace(cfg=SimpleNamespace(http_protocols=["h2", "h1"]), log=None)
    with pytest.raises(SystemExit) as exc:
        hooks.on_starting(server)  # type: ignore[arg-type]
    assert "deploy/nginx.conf" in str(exc.value.code)
    hooks.refuse_serial_http2(SimpleNamespace(http_protocols=["h1"]))  # HTTP/1.1: fine


PAGE_SCRIPT = """
async () => {
  const now = () => performance.now();
  const eventSource = (i) => new Promise((resolve, reject) => {
    const es = new EventSource(`/pattern?spec=w8&wait=0.25&tag=es${i}&format=sse`);
    const seqs = [];
    let first = null;
    es.onmessage = (e) => {
      if (first === null) first = now();
      seqs.push(JSON.parse(e.data).seq);
      if (seqs.length === 8) { es.close(); resolve({seqs, first, last: now()}); }
    };
    es.onerror = () => { es.close(); reject(new Error(`EventSource ${i} failed`)); };
  });
  const reader = async (i) => {
    const resp = await fetch(`/pattern?spec=w8&wait=0.25&tag=fetch${i}`);
    const r = resp.body.getReader();
    const decoder = new TextDecoder();
    let text = "", first = null;
    for (;;) {
      const {value, done} = await r.read();
      if (done) break;
      text += decoder.decode(value, {stream: true});
      if (first === null && text.includes("\\n")) first = now();
    }
    const seqs = text.split("\\n").filter((l) => l.trim()).map((l) => JSON.parse(l).seq);
    return {seqs, first, last: now()};
  };
  const all = [];
  for (let i = 0; i < 10; i++) all.push(eventSource(i));
  for (let i = 0; i < 2; i++) all.push(reader(i));
  const results = await Promise.all(all);
  const protocol = performance.getEntriesByType("navigation")[0].nextHopProtocol;
  return {results, protocol};
}
"""


def test_a_page_with_twelve_streams_flows_over_http2_at_the_edge(
    tmp_path: Path, cert: tuple[Path, Path]
) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_page import CHROMIUM, CHROMIUM_ARGS

    setup = make_setup("h2-edge", tmp_path, cert)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=[*CHROMIUM_ARGS, "--ignore-certificate-errors"],
            )
            try:
                page = browser.new_page()
                page.goto(setup.base + "/healthz")
                out = page.evaluate(PAGE_SCRIPT)
            finally:
                browser.close()
    finally:
        setup.stop()
    assert out["protocol"] == "h2"
    results = out["results"]
    assert len(results) == 12
    assert all(r["seqs"] == list(range(8)) for r in results), results
    # All twelve were open at once: every stream had its first event before any had its last.
    assert max(r["first"] for r in results) < min(r["last"] for r in results)
