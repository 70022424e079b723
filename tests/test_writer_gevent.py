"""The stream writer under gunicorn+gevent: its inline and producer modes, framing, HEAD.

Served by ``tests/writer_app.py`` (1 s heartbeat) with the repository's gunicorn.conf.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator

import orjson
import pytest
import requests

from tests.service import Service, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def app_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("writer"), app="tests.writer_app:app").start()
    yield svc
    svc.stop()


def finished(svc: Service, name: str) -> int:
    return int(requests.get(svc.url + "/finished", timeout=5).json().get(name, 0))


def open_streams(svc: Service) -> int:
    return int(requests.get(svc.url + "/healthz", timeout=5).json()["open_streams"])


def timed_lines(svc: Service, path: str) -> list[tuple[float, dict[str, object]]]:
    """Each NDJSON value of ``path`` with the client's time.time() when its bytes arrived."""
    out: list[tuple[float, dict[str, object]]] = []
    tail = b""
    with requests.get(svc.url + path, stream=True, timeout=(5, 30)) as resp:
        assert resp.status_code == 200
        while chunk := resp.raw.read1(65536):
            now = time.time()
            *lines, tail = (tail + chunk).split(b"\n")
            out += [(now, orjson.loads(line)) for line in lines if line]
    assert tail == b""
    return out


def raw_get(svc: Service, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", svc.port), timeout=10)
    sock.sendall(request)
    return sock


def read_for(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends in ``seconds`` (or until it closes)."""
    data = b""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return data


def dechunk(body: bytes) -> tuple[list[bytes], bytes]:
    """Split a chunked body into its chunks; also what is left (an incomplete chunk)."""
    chunks = []
    while b"\r\n" in body:
        size_line, rest = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if len(rest) < size + 2:
            break
        assert rest[size : size + 2] == b"\r\n", body[:200]
        chunks.append(rest[:size])
        body = rest[size + 2 :]
    return chunks, body


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("w5", id="waits-only"),
        pytest.param("b300", id="burst-only"),
        pytest.param("w3,b200,w3,b5,w2", id="waits-bursts-waits"),
        pytest.param("b1,w1,b1,w1,b3", id="short-bursts"),
    ],
)
def test_every_mode_keeps_order_and_request_context(app_service: Service, spec: str) -> None:
    # Waiting events run in the server's greenlet, a burst moves the generator to a producer
    # greenlet: nothing is lost or reordered, and the request context follows the generator.
    total = sum(int(part[1:]) for part in spec.split(","))
    before = finished(app_service, "pattern")
    values = [v for _, v in timed_lines(app_service, f"/pattern?spec={spec}&tag=t-{spec}")]
    assert [v["seq"] for v in values] == list(range(total))
    assert {v["tag"] for v in values} == {f"t-{spec}"}
    wait_for(lambda: finished(app_service, "pattern") == before + 1, timeout=5)


@pytest.mark.parametrize(
    "spec", [pytest.param("w4", id="inline"), pytest.param("b50,w4", id="after-a-burst")]
)
def test_an_event_goes_out_before_the_next_is_produced(app_service: Service, spec: str) -> None:
    # Events 0.4 s apart: each must reach the client before the server produces the next one
    # (coalescing never holds an event back waiting for company).
    values = timed_lines(app_service, f"/pattern?spec={spec}&tag=x&wait=0.4")
    waited = values[-4:]
    for (arrived, _), (_, following) in zip(waited, waited[1:], strict=False):
        assert arrived < float(following["t"])  # type: ignore[arg-type]


def test_a_generator_slow_again_after_a_burst_costs_one_greenlet_again(
    app_service: Service,
) -> None:
    # A burst (say, a resume replaying history) moves the generator to a producer greenlet;
    # once its events come one at a time again, it goes back to the serving greenlet.
    def alive() -> int:
        return int(requests.get(app_service.url + "/greenlets", timeout=5).json()["alive"])

    wait_for(lambda: open_streams(app_service) == 0)
    base = alive()
    before = finished(app_service, "pattern")
    values: list[dict[str, object]] = []
    with requests.get(
        app_service.url + "/pattern?spec=b200,w60&wait=0.1&tag=back", stream=True, timeout=10
    ) as resp:
        reader = resp.iter_lines()  # fine here: a test of the server, a few lines a second
        values += [orjson.loads(next(reader)) for _ in range(210)]
        assert values[-1]["seq"] == 209
        wait_for(lambda: alive() == base + 1, timeout=4)  # the serving greenlet alone
        values += [orjson.loads(line) for line in reader if line]
    assert [v["seq"] for v in values] == list(range(260))
    assert {v["tag"] for v in values} == {"back"}
    wait_for(lambda: finished(app_service, "pattern") == before + 1, timeout=5)


@pytest.mark.parametrize(
    ("fmt", "first", "keepalive"),
    [
        pytest.param("sse", b'data: {"first":true}\n\n', b":\n", id="sse"),
        pytest.param("ndjson", b'{"first":true}\n', b" ", id="ndjson"),
        pytest.param("json-seq", b'\x1e{"first":true}\n', b"\x1e", id="json-seq"),
    ],
)
def test_http11_keepalives_are_whole_chunks(
    app_service: Service, fmt: str, first: bytes, keepalive: bytes
) -> None:
    # Keep-alives written while the generator waits go straight to the socket: they must be
    # framed as gunicorn frames its own writes (chunked for HTTP/1.1).
    before = finished(app_service, "blocked")
    request = f"GET /blocked?format={fmt} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    sock = raw_get(app_service, request.encode())
    with sock:
        raw = read_for(sock, 2.6)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    chunks, rest = dechunk(body)
    assert rest == b""
    assert chunks[0] == first
    assert len(chunks) >= 3 and set(chunks[1:]) == {keepalive}  # a keep-alive each heartbeat
    # Leaving ends it (its finally runs): the next test counts the finally blocks from there.
    wait_for(lambda: finished(app_service, "blocked") == before + 1, timeout=5)


def test_http10_keepalives_are_unframed_and_leaving_runs_finally(app_service: Service) -> None:
    before = finished(app_service, "blocked")
    sock = raw_get(app_service, b"GET /blocked HTTP/1.0\r\nHost: t\r\n\r\n")
    with sock:
        raw = read_for(sock, 2.6)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"transfer-encoding" not in head.lower()
    first, _, keepalives = body.partition(b'{"first":true}\n')
    assert first.strip(b" ") == b""
    # NDJSON keep-alives: a space each, never a newline (no empty line for strict readers).
    assert len(keepalives) >= 2 and keepalives.strip(b" ") == b""
    # The client left while the generator waited: it is interrupted there, its finally runs.
    wait_for(lambda: finished(app_service, "blocked") == before + 1, timeout=5)
    wait_for(lambda: open_streams(app_service) == 0)


def test_head_sends_headers_and_runs_no_stream(app_service: Service) -> None:
    resp = requests.head(app_service.url + "/blocked?format=sse", timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache, no-transform"
    assert "Content-Length" not in resp.headers
    assert resp.content == b""
    assert open_streams(app_service) == 0


@pytest.fixture
def many(app_service: Service) -> Iterator[Callable[[int], list[socket.socket]]]:
    opened: list[socket.socket] = []

    def open_many(n: int) -> list[socket.socket]:
        for _ in range(n):
            sock = raw_get(app_service, b"GET /blocked HTTP/1.1\r\nHost: t\r\n\r\n")
            opened.append(sock)
        return opened

    yield open_many
    for sock in opened:
        sock.close()


def test_dropping_many_blocked_streams_runs_every_finally(
    app_service: Service, many: Callable[[int], list[socket.socket]]
) -> None:
    before = finished(app_service, "blocked")
    socks = many(50)
    wait_for(lambda: open_streams(app_service) == 50)
    for sock in socks:
        sock.close()
    wait_for(lambda: finished(app_service, "blocked") == before + 50, timeout=10)
    wait_for(lambda: open_streams(app_service) == 0)


@pytest.mark.parametrize("wait", ["0", "0.2"])
def test_a_timeout_escaping_the_generator_is_its_error_event(
    app_service: Service, wait: str
) -> None:
    resp = requests.get(app_service.url + f"/escape?wait={wait}", timeout=10)
    values = [orjson.loads(line) for line in resp.content.split(b"\n") if line]
    assert values == [
        {"first": True},
        {"error": {"code": "internal_error", "message": "the stream failed on the server"}},
    ]


def test_a_strict_json_lines_reader_reads_a_stream_with_keepalives(app_service: Service) -> None:
    # Events 1.5 s apart with a 1 s heartbeat: keep-alives go out between them. A strict JSON
    # Lines reader (json.loads on every line, as jsonlines and ndjson.loads do) reads it all.
    with requests.get(
        app_service.url + "/pattern?spec=w3&wait=1.5&tag=strict", stream=True, timeout=(5, 10)
    ) as resp:
        body = resp.raw.read()
    assert b" " in body  # keep-alives were sent (orjson writes no spaces of its own)
    values = [json.loads(line) for line in body.split(b"\n")[:-1]]
    assert [v["seq"] for v in values] == [0, 1, 2]
    assert body.endswith(b"}\n")
