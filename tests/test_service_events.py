"""End to end: ``GET /events`` and friends on the real gunicorn+gevent service, over loopback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest
import requests

from stream import Client
from stream.errors import HTTPStatusError, RemoteError
from tests.service import Service, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

SEED = ["some data", "some more data", "and more", "finally the end"]


def read_lines_timed(url: str, headers: dict[str, str] | None = None) -> list[tuple[float, bytes]]:
    """Read a body with raw read1 and note when each complete line arrived."""
    start = time.monotonic()
    out: list[tuple[float, bytes]] = []
    with requests.get(url, headers=headers, stream=True, timeout=(5, 10)) as resp:
        assert resp.status_code == 200
        tail = b""
        while chunk := resp.raw.read1(65536):
            *lines, tail = (tail + chunk).split(b"\n")
            now = time.monotonic() - start
            out.extend((now, line) for line in lines)
    return out


def metric(service: Service, name: str) -> float:
    return service.metrics()[name]


def test_seed_events_arrive_one_by_one(service: Service) -> None:
    lines = [(t, line) for t, line in read_lines_timed(service.url + "/events") if line]
    values = [orjson.loads(line) for _, line in lines]
    assert values == [{"event_id": i, "data": SEED[i], "is_last_event": i == 3} for i in range(4)]
    times = [t for t, _ in lines]
    # The first event is there at once, each next one about 0.5 s later: delivered live, not
    # buffered until the end.
    assert times[0] < 0.4
    for earlier, later in zip(times, times[1:], strict=False):
        assert later - earlier > 0.3


def test_stream_headers(service: Service) -> None:
    with requests.get(service.url + "/events?interval=0", stream=True, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        assert resp.headers["Cache-Control"] == "no-cache, no-transform"
        assert resp.headers["X-Accel-Buffering"] == "no"
        assert "Content-Length" not in resp.headers
        assert resp.headers["Transfer-Encoding"] == "chunked"


@pytest.mark.parametrize(
    ("query", "accept", "media_type"),
    [
        pytest.param("", None, "application/x-ndjson", id="default"),
        pytest.param("", "*/*", "application/x-ndjson", id="any"),
        pytest.param("", "text/event-stream", "text/event-stream", id="accept-sse"),
        pytest.param("", "application/json-seq", "application/json-seq", id="accept-json-seq"),
        pytest.param("&format=sse", "application/json-seq", "text/event-stream", id="param-wins"),
        pytest.param("&format=json-seq", None, "application/json-seq", id="param-json-seq"),
        pytest.param("&format=ndjson", "text/event-stream", "application/x-ndjson", id="param-nd"),
    ],
)
def test_formats(service: Service, query: str, accept: str | None, media_type: str) -> None:
    headers = {"Accept": accept} if accept else {}
    resp = requests.get(service.url + "/events?interval=0" + query, headers=headers, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == media_type
    body = resp.content
    if media_type == "text/event-stream":
        blocks = [b for b in body.split(b"\n\n") if b.strip(b":\n")]
        values = [orjson.loads(b.split(b"data: ", 1)[1]) for b in blocks]
    elif media_type == "application/json-seq":
        assert body.startswith(b"\x1e")
        values = [orjson.loads(t) for t in body.split(b"\x1e") if t.strip()]
    else:
        values = [orjson.loads(line) for line in body.split(b"\n") if line.strip()]
    assert [v["data"] for v in values] == SEED


def test_not_acceptable(service: Service) -> None:
    resp = requests.get(service.url + "/events", headers={"Accept": "text/html"}, timeout=5)
    assert resp.status_code == 406
    assert resp.json()["error"]["code"] == "not_acceptable"


def test_accept_json_gets_ndjson(service: Service) -> None:
    # What OpenAPI-generated clients send: a stream of JSON values, one a line.
    url = service.url + "/events?count=2&interval=0"
    resp = requests.get(url, headers={"Accept": "application/json"}, timeout=5)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/x-ndjson"
    assert [json.loads(line)["event_id"] for line in resp.content.splitlines()] == [0, 1]


@pytest.mark.parametrize(
    "media_type, keepalive",
    [
        pytest.param("ndjson", b"\n  ", id="ndjson-spaces"),
        pytest.param("sse", b"\n:\n", id="sse-comment"),
        pytest.param("json-seq", b"\n\x1e\x1e", id="json-seq-lone-rs"),
    ],
)
def test_keepalive_after_heartbeat_of_silence(
    service: Service, media_type: str, keepalive: bytes
) -> None:
    # The service runs with a 1 s heartbeat; 2.5 s between two events leaves room for two.
    url = service.url + f"/events?count=2&interval=2.5&format={media_type}"
    resp = requests.get(url, timeout=10)
    assert keepalive in resp.content
    if media_type == "ndjson":
        # Strict JSON Lines: no empty line anywhere, every line one JSON text.
        assert b"\n\n" not in resp.content and not resp.content.startswith(b"\n")
        assert [json.loads(line) for line in resp.content.splitlines()][-1]["is_last_event"]


def test_headers_and_first_bytes_go_out_at_once(service: Service) -> None:
    # The first event needs no time here, but a job's subscriber waits: its response must still
    # start at once (routers drop responses that send nothing for 30 s).
    job = requests.post(service.url + "/jobs", json={"count": 2, "interval": 3}, timeout=5).json()
    start = time.monotonic()
    with requests.get(service.url + job["events_url"], stream=True, timeout=(5, 10)) as resp:
        assert resp.status_code == 200
        first = resp.raw.read1(65536)
        assert first
        assert time.monotonic() - start < 1.0


def test_disconnect_releases_the_stream(service: Service) -> None:
    # Start from no open stream: earlier tests' streams may still be ending.
    wait_for(lambda: metric(service, "stream_open_streams") == 0, timeout=5)
    base_open = 0.0
    base_disconnects = metric(service, "stream_disconnects_total")
    sock = socket.create_connection(("127.0.0.1", service.port), timeout=5)
    sock.sendall(b"GET /events?count=1000&interval=10 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    wait_for(lambda: metric(service, "stream_open_streams") == base_open + 1, timeout=5)
    sock.close()
    start = time.monotonic()
    # Released within one heartbeat (1 s here), plus a bound.
    wait_for(lambda: metric(service, "stream_open_streams") == base_open, timeout=3)
    assert time.monotonic() - start < 2.0
    assert metric(service, "stream_disconnects_total") == base_disconnects + 1


def test_error_mid_stream_is_the_last_line(service: Service) -> None:
    resp = requests.get(service.url + "/events?count=5&interval=0&fail_after=2", timeout=10)
    assert resp.status_code == 200
    lines = [orjson.loads(line) for line in resp.content.split(b"\n") if line.strip()]
    assert [line.get("event_id") for line in lines[:2]] == [0, 1]
    assert lines[2] == {
        "error": {"code": "failed_on_purpose", "message": "the stream failed after 2 events"}
    }
    assert len(lines) == 3


def test_error_mid_stream_sse(service: Service) -> None:
    resp = requests.get(service.url + "/events?count=5&interval=0&fail_after=1&format=sse")
    blocks = [b for b in resp.content.split(b"\n\n") if b.strip()]
    assert blocks[-1].startswith(b"event: error\ndata: ")
    assert orjson.loads(blocks[-1].split(b"data: ", 1)[1])["error"]["code"] == "failed_on_purpose"


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("count=-1", id="count-negative"),
        pytest.param("count=abc", id="count-text"),
        pytest.param("count=1.5", id="count-decimal"),
        pytest.param("count=10000001", id="count-too-big"),
        pytest.param("count=99999999999999999999", id="count-huge"),
        pytest.param("count=", id="count-empty"),
        pytest.param("interval=61", id="interval-too-big"),
        pytest.param("interval=-0.1", id="interval-negative"),
        pytest.param("interval=nan", id="interval-nan"),
        pytest.param("interval=inf", id="interval-inf"),
        pytest.param("interval=1e1", id="interval-exponent"),
        pytest.param("size=1000001", id="size-too-big"),
        pytest.param("size=x", id="size-text"),
        pytest.param("count=3&fail_after=4", id="fail-after-past-count"),
        pytest.param("fail_after=-1", id="fail-after-negative"),
        pytest.param("format=xml", id="format-unknown"),
    ],
)
def test_bad_parameters_get_json_400(service: Service, query: str) -> None:
    resp = requests.get(service.url + "/events?" + query, timeout=5)
    assert resp.status_code == 400
    assert resp.headers["Content-Type"] == "application/json"
    error = resp.json()["error"]
    assert error["code"] and error["message"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param("count=0", [], id="count-zero"),
        pytest.param("count=6&interval=0", [*SEED, *SEED[:2]], id="count-cycles"),
        pytest.param(
            "count=2&interval=0&size=20",
            ["some data ..........", "some more data ....."],
            id="size-pads",
        ),
        pytest.param("count=1&interval=0&size=3", ["som"], id="size-cuts"),
    ],
)
def test_parameters(service: Service, query: str, expected: list[str]) -> None:
    resp = requests.get(service.url + "/events?" + query, timeout=10)
    values = [orjson.loads(line) for line in resp.content.split(b"\n") if line.strip()]
    assert [v["data"] for v in values] == expected
    if values:
        assert values[-1]["is_last_event"] is True
        assert [v["event_id"] for v in values] == list(range(len(values)))


def test_healthz(service: Service) -> None:
    body = requests.get(service.url + "/healthz", timeout=5).json()
    assert body["status"] == "ok"
    assert body["broker"] == "memory"
    assert body["broker_reachable"] is True


def test_unknown_path_is_json_404(service: Service) -> None:
    resp = requests.get(service.url + "/nope", timeout=5)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("fmt", ["ndjson", "sse", "json-seq"])
def test_client_reads_the_seed(service: Service, fmt: str) -> None:
    with Client(service.url) as client:
        values = list(client.stream("/events", params={"interval": 0}, format=fmt))
    assert [v["data"] for v in values] == SEED


@pytest.mark.parametrize("fmt", ["ndjson", "sse", "json-seq"])
def test_error_mid_stream_reaches_client_as_remote_error(service: Service, fmt: str) -> None:
    seen: list[Any] = []
    with Client(service.url) as client, pytest.raises(RemoteError) as info:
        for value in client.stream(
            "/events", params={"count": 5, "interval": 0, "fail_after": 3}, format=fmt
        ):
            seen.append(value["event_id"])
    assert seen == [0, 1, 2]
    assert info.value.code == "failed_on_purpose"


def test_client_bad_parameter_is_http_status_error(service: Service) -> None:
    with Client(service.url) as client, pytest.raises(HTTPStatusError) as info:
        list(client.stream("/events", params={"count": "lots"}))
    assert info.value.status_code == 400
    assert info.value.body["error"]["code"] == "bad_count"


def test_cli_prints_lines_as_they_arrive(service: Service) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "stream", service.url + "/events?count=3&interval=1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdout is not None
        start = time.monotonic()
        first = proc.stdout.readline()
        first_at = time.monotonic() - start
        assert orjson.loads(first)["event_id"] == 0
        rest = proc.stdout.read()
        total = time.monotonic() - start
        assert proc.wait(10) == 0
    assert [orjson.loads(line)["event_id"] for line in rest.splitlines()] == [1, 2]
    # The first line was printed about 2 s before the last event was written.
    assert total - first_at > 1.5


def test_cli_exits_non_zero_on_server_error(service: Service) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stream", service.url + "/events?count=3&interval=0&fail_after=1"],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 4
    assert [orjson.loads(line)["event_id"] for line in proc.stdout.splitlines()] == [0]
    assert b"failed_on_purpose" in proc.stderr
