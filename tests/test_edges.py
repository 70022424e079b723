"""End to end: the edges of the service under attack (request bodies, proxies, job bounds).

Each attack runs against the real service (gunicorn + gevent on loopback) and asserts what the
contract promises: 413 with or without ``Content-Length`` and nothing published, 408 for a body
that does not arrive in time (the connection closed, the worker still answering), relayed
requests that are not loopback, jobs behind the publish authorization and bounded. Every socket
has a timeout; every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator

import orjson
import pytest
import requests
from werkzeug.datastructures import Headers

from app import create_app, relayed_from_elsewhere
from stream import Client
from tests.service import Service, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

#: the body timeout of the module's service, seconds
BODY_TIMEOUT = 2.0
#: the default body limit (1 MiB)
LIMIT = 1024 * 1024
TOKEN = "edge-token"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def edge_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with the default body limit and a 2 s body timeout."""
    env = {"STREAM_BODY_TIMEOUT": str(BODY_TIMEOUT)}
    svc = Service(tmp_path_factory.mktemp("edges"), env).start()
    yield svc
    svc.stop()


def publish_one(url: str, channel: str, value: object) -> str:
    resp = requests.post(f"{url}/channels/{channel}", json=value, timeout=10)
    assert resp.status_code == 201, resp.text
    ids: list[str] = resp.json()["ids"]
    return ids[0]


def next_after(url: str, channel: str, after: str) -> tuple[str, object]:
    """The first event of ``channel`` after ``after`` (id, value)."""
    with Client(url, timeout=(5, 10)) as client:
        with client.events(f"/channels/{channel}", last_event_id=after) as s:
            first = next(iter(s))
    return first.id, first.json()


def ndjson_lines(n: int, size: int = 1024) -> Iterator[bytes]:
    """``n`` NDJSON lines of ``size`` bytes each (the attack: 2,048 lines of 1 KiB)."""
    for i in range(n):
        line = orjson.dumps({"i": i, "pad": ""})  # b'{"i":0,"pad":""}': pad it inside the quotes
        yield line[:-2] + b"x" * (size - len(line) - 1) + b'"}\n'


# -- 413: bodies over the limit, with or without Content-Length --------------------------------


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
@pytest.mark.parametrize("media_type", ["application/x-ndjson", "application/json"])
def test_publish_over_the_limit_is_413_and_publishes_nothing(
    edge_service: Service, chunked: bool, media_type: str
) -> None:
    channel = unique("big")
    before = publish_one(edge_service.url, channel, {"marker": "before"})
    if media_type == "application/x-ndjson":
        chunks = list(ndjson_lines(2048))  # 2 MiB
    else:
        chunks = [b'"', *(b"x" * 1024 for _ in range(2048)), b'"']
    assert sum(map(len, chunks)) > LIMIT
    # requests sends a generator chunked (no Content-Length), bytes with a Content-Length.
    body: Iterator[bytes] | bytes = iter(chunks) if chunked else b"".join(chunks)
    resp = requests.post(
        f"{edge_service.url}/channels/{channel}",
        data=body,
        headers={"Content-Type": media_type},
        timeout=30,
    )
    assert resp.status_code == 413, resp.text[:300]
    assert resp.json()["error"]["code"] == "request_entity_too_large"
    after = publish_one(edge_service.url, channel, {"marker": "after"})
    # Nothing between the two markers: not one line of the refused body was published.
    assert next_after(edge_service.url, channel, before) == (after, {"marker": "after"})


def test_publish_just_under_the_limit_is_accepted_whole(edge_service: Service) -> None:
    channel = unique("fits")
    lines = list(ndjson_lines(1023))  # 1,047,552 bytes: under 1 MiB
    resp = requests.post(
        f"{edge_service.url}/channels/{channel}",
        data=iter(lines),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=30,
    )
    assert resp.status_code == 201, resp.text[:300]
    assert len(resp.json()["ids"]) == 1023


def test_job_body_over_the_limit_is_413(edge_service: Service) -> None:
    body = iter([b'{"count": 1, "pad": "', *(b"x" * 1024 for _ in range(2048)), b'"}'])
    resp = requests.post(
        f"{edge_service.url}/jobs",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_entity_too_large"


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP response with a Content-Length from a raw socket: status, headers, body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        rest += chunk
    return status, headers, rest[:length]


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server closes the connection (EOF) within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_huge_content_length_is_refused_before_the_body(edge_service: Service) -> None:
    with socket.create_connection(("127.0.0.1", edge_service.port), timeout=10) as sock:
        sock.sendall(
            b"POST /channels/huge HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 104857600\r\n\r\n{"
        )
        status, headers, body = read_response(sock, 10)
        assert status == 413
        assert orjson.loads(body)["error"]["code"] == "request_entity_too_large"
        # 100 MB will not be read: the connection is closed instead of drained.
        assert headers["connection"] == "close"
        assert closed_by_server(sock)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_cut_short_publishes_nothing(edge_service: Service, chunked: bool) -> None:
    # Three whole lines, then the client stops sending before the body is complete.
    channel = unique("cut")
    before = publish_one(edge_service.url, channel, {"marker": "before"})
    lines = b'{"a": 1}\n{"a": 2}\n{"a": 3}\n'
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 2000"
    body = b"%x\r\n%s\r\n" % (len(lines), lines) if chunked else lines
    with socket.create_connection(("127.0.0.1", edge_service.port), timeout=10) as sock:
        sock.sendall(
            b"POST /channels/" + channel.encode() + b" HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/x-ndjson\r\n" + framing + b"\r\n\r\n" + body
        )
        sock.shutdown(socket.SHUT_WR)
        status, _, data = read_response(sock, 10)
    assert status == 400
    assert orjson.loads(data)["error"]["code"] == "incomplete_body"
    after = publish_one(edge_service.url, channel, {"marker": "after"})
    assert next_after(edge_service.url, channel, before) == (after, {"marker": "after"})


# -- 408: bodies that do not arrive -----------------------------------------------------------


def slow_request(port: int, path: str, chunked: bool) -> socket.socket:
    """Open a POST whose headers arrive at once and whose body never finishes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 100"
    sock.sendall(
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\n" + framing + b"\r\n\r\n"
    )
    return sock


def trickle(sock: socket.socket, chunked: bool) -> None:
    """Send two more bytes of the body (a chunk of two bytes when chunked)."""
    sock.sendall(b"2\r\n  \r\n" if chunked else b"  ")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/channels/slow", "/jobs"])
def test_slow_body_gets_408_and_the_connection_closes(
    edge_service: Service, path: str, chunked: bool
) -> None:
    sock = slow_request(edge_service.port, path, chunked)
    with sock:
        start = time.monotonic()
        answered = False
        # 2 bytes every 2 s (the attack's pace), until the server answers; bounded.
        while time.monotonic() - start < BODY_TIMEOUT + 15:
            trickle(sock, chunked)
            if select.select([sock], [], [], 2.0)[0]:
                answered = True
                break
            # The worker still serves others while this body trickles.
            assert requests.get(edge_service.url + "/healthz", timeout=5).status_code == 200
        assert answered, "no answer to a body that never finishes"
        elapsed = time.monotonic() - start
        status, headers, body = read_response(sock, 5)
        assert status == 408
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
        assert headers["connection"] == "close"
        assert closed_by_server(sock)
    # Answered once the timeout passed, not before and not much after.
    assert BODY_TIMEOUT - 0.5 <= elapsed < BODY_TIMEOUT + 10


def test_many_slow_bodies_leave_the_worker_answering(edge_service: Service) -> None:
    socks = [slow_request(edge_service.port, "/channels/slow", chunked=False) for _ in range(200)]
    try:
        for s in socks:
            trickle(s, chunked=False)
        # While all 200 bodies are pending, the worker answers others.
        pending = [s for s in socks if not select.select([s], [], [], 0)[0]]
        resp = requests.get(edge_service.url + "/healthz", timeout=5)
        assert resp.status_code == 200 and resp.json()["status"] == "ok"
        assert pending, "every slow body was answered before /healthz was asked"
        # Then every one of them gets its 408 and its connection is closed.
        deadline = time.monotonic() + BODY_TIMEOUT + 20
        statuses = []
        for s in socks:
            status, headers, _ = read_response(s, max(deadline - time.monotonic(), 0.1))
            statuses.append(status)
            assert headers["connection"] == "close"
        assert statuses == [408] * len(socks)
        assert all(closed_by_server(s, 5) for s in socks)
    finally:
        for s in socks:
            s.close()
    assert requests.get(edge_service.url + "/healthz", timeout=5).status_code == 200


def test_refused_body_is_read_and_the_answer_arrives(edge_service: Service) -> None:
    # A refusal before the body is read (403 here) still gets to the client, which is sending a
    # body: the service reads and throws it away instead of resetting the connection.
    conn = http.client.HTTPConnection("127.0.0.1", edge_service.port, timeout=10)
    try:
        body = b"[" + b"1," * 200_000 + b"1]"
        headers = {"Content-Type": "application/json", "X-Forwarded-For": "8.8.8.8"}
        conn.request("POST", "/channels/refused", body=body, headers=headers)
        resp = conn.getresponse()
        assert resp.status == 403
        assert orjson.loads(resp.read())["error"]["code"] == "forbidden"
        # The body was consumed: the same connection serves the next request.
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


# -- relayed requests are not loopback ----------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-Forwarded-For": "8.8.8.8"}, id="xff"),
        pytest.param({"X-Forwarded-For": "127.0.0.1, 8.8.8.8"}, id="xff-appended"),
        pytest.param({"X-Real-IP": "10.0.0.7"}, id="x-real-ip"),
        pytest.param({"Forwarded": "for=192.0.2.60;proto=http;by=127.0.0.1"}, id="forwarded"),
    ],
)
@pytest.mark.parametrize("path", ["/channels/{c}", "/jobs"])
def test_relayed_requests_may_not_publish_or_start_jobs(
    edge_service: Service, headers: dict[str, str], path: str
) -> None:
    channel = unique("relayed")
    before = publish_one(edge_service.url, channel, {"marker": "before"})
    resp = requests.post(
        edge_service.url + path.format(c=channel), json={"count": 1}, headers=headers, timeout=10
    )
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "forbidden"
    after = publish_one(edge_service.url, channel, {"marker": "after"})
    assert next_after(edge_service.url, channel, before) == (after, {"marker": "after"})


@pytest.mark.parametrize(
    ("headers", "relayed"),
    [
        pytest.param([], False, id="none"),
        pytest.param([("X-Forwarded-For", "127.0.0.1")], False, id="xff-loopback"),
        pytest.param([("X-Forwarded-For", "127.0.0.1, ::1, 127.8.9.10")], False, id="xff-all-lo"),
        pytest.param([("X-Forwarded-For", "8.8.8.8")], True, id="xff-other"),
        pytest.param([("X-Forwarded-For", "127.0.0.1,8.8.8.8")], True, id="xff-appended"),
        pytest.param([("X-Forwarded-For", "1.2.3.4:5678")], True, id="xff-with-port"),
        pytest.param([("X-Forwarded-For", "127.0.0.1:5678")], False, id="xff-lo-with-port"),
        pytest.param([("X-Forwarded-For", "[::1]:80")], False, id="xff-v6-lo-port"),
        pytest.param([("X-Forwarded-For", "2001:db8::1")], True, id="xff-v6"),
        pytest.param([("X-Forwarded-For", "unknown")], True, id="xff-unknown"),
        pytest.param([("X-Forwarded-For", "garbage")], True, id="xff-garbage"),
        pytest.param([("X-Forwarded-For", "")], False, id="xff-empty"),
        pytest.param(
            [("X-Forwarded-For", "127.0.0.1"), ("X-Forwarded-For", "9.9.9.9")],
            True,
            id="xff-two-lines",
        ),
        pytest.param([("X-Real-IP", "::1")], False, id="real-ip-lo"),
        pytest.param([("X-Real-IP", "::ffff:127.0.0.1")], False, id="real-ip-v4-mapped-lo"),
        pytest.param([("X-Real-IP", "::ffff:10.0.0.1")], True, id="real-ip-v4-mapped"),
        pytest.param([("X-Real-IP", "192.168.1.2")], True, id="real-ip-lan"),
        pytest.param([("Forwarded", "for=127.0.0.1;proto=https")], False, id="fwd-lo"),
        pytest.param([("Forwarded", 'for="[::1]:4711"')], False, id="fwd-v6-lo"),
        pytest.param([("Forwarded", 'For="[2001:db8:cafe::17]:4711"')], True, id="fwd-v6"),
        pytest.param([("Forwarded", "for=127.0.0.1, for=198.51.100.17")], True, id="fwd-two"),
        pytest.param([("Forwarded", "for=unknown")], True, id="fwd-unknown"),
        pytest.param([("Forwarded", "for=_hidden")], True, id="fwd-obfuscated"),
        pytest.param([("Forwarded", "proto=https;by=10.0.0.1")], False, id="fwd-no-for"),
        pytest.param([("Forwarded", "by=127.0.0.1;for=10.1.1.1")], True, id="fwd-for-second"),
    ],
)
def test_relayed_from_elsewhere(headers: list[tuple[str, str]], relayed: bool) -> None:
    assert relayed_from_elsewhere(Headers(headers)) is relayed


# -- jobs: the same authorization as publishing, and bounded ------------------------------------


def test_jobs_need_the_token_when_one_is_set() -> None:
    app = create_app({"REDIS_URL": None, "STREAM_PUBLISH_TOKEN": TOKEN})
    client = app.test_client()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            resp = client.post("/jobs", json={"count": 1}, headers=headers)
            assert resp.status_code == 401, headers
            assert resp.get_json()["error"]["code"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        # From any address, with the token.
        resp = client.post(
            "/jobs",
            json={"count": 1, "interval": 0},
            headers={"Authorization": f"Bearer {TOKEN}"},
            environ_overrides={"REMOTE_ADDR": "10.1.2.3"},
        )
        assert resp.status_code == 202
    finally:
        app.extensions["stream.broker"].close()


def test_jobs_without_a_token_only_from_loopback() -> None:
    app = create_app({"REDIS_URL": None, "STREAM_PUBLISH_TOKEN": None})
    client = app.test_client()
    try:
        resp = client.post(
            "/jobs", json={"count": 1}, environ_overrides={"REMOTE_ADDR": "10.1.2.3"}
        )
        assert resp.status_code == 403
        assert resp.get_json()["error"]["code"] == "forbidden"
        assert app.extensions["stream.jobs"].running == {}
        resp = client.post("/jobs", json={"count": 1, "interval": 0})
        assert resp.status_code == 202
    finally:
        app.extensions["stream.broker"].close()


def test_running_jobs_are_bounded(start_service: Callable[..., Service]) -> None:
    svc = start_service({"STREAM_MAX_JOBS": "2"})

    def start(count: int, interval: float) -> requests.Response:
        return requests.post(
            svc.url + "/jobs", json={"count": count, "interval": interval}, timeout=10
        )

    running = [start(30, 0.1) for _ in range(2)]  # about 3 s each
    assert [r.status_code for r in running] == [202, 202]
    refused = start(1, 0)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "too_many_jobs"
    assert int(refused.headers["Retry-After"]) > 0
    # Once they end, jobs are accepted again, and the refused one never ran.
    with Client(svc.url, timeout=(5, 20)) as client:
        for resp in running:
            values = list(client.stream(resp.json()["events_url"]))
            assert [v["event_id"] for v in values] == list(range(30))
    wait_for(lambda: start(1, 0).status_code == 202, timeout=10)


# -- publishes keep every value exactly as json.loads reads it ---------------------------------

EXACT_TEXTS = [
    b'{"big": 12345678901234567890123}',
    b"-98765432109876543210",
    b"1e400",
    b'"\\ud800 lone surrogate"',
    b'{"pretty": [1,\r\n  2]}',
    b'{"plain": "value"}',
]


@pytest.mark.parametrize("media_type", ["application/x-ndjson", "application/json"])
def test_published_values_are_exactly_what_json_loads_reads(
    edge_service: Service, media_type: str
) -> None:
    channel = unique("exact")
    marker = publish_one(edge_service.url, channel, "before")
    for text in EXACT_TEXTS:
        body = text.replace(b"\r\n", b" ") if media_type == "application/x-ndjson" else text
        resp = requests.post(
            f"{edge_service.url}/channels/{channel}",
            data=body,
            headers={"Content-Type": media_type},
            timeout=10,
        )
        assert resp.status_code == 201, resp.text
    # Read the raw NDJSON back (from the marker on) and decode it with the reference parser.
    got: list[object] = []
    with requests.get(
        f"{edge_service.url}/channels/{channel}",
        params={"last_event_id": marker},
        stream=True,
        timeout=(5, 10),
    ) as resp:
        tail = b""
        while len(got) < len(EXACT_TEXTS):
            chunk = resp.raw.read1(65536)
            assert chunk, "the stream ended early"
            *lines, tail = (tail + chunk).split(b"\n")
            got += [json.loads(line)["data"] for line in lines if line.strip()]
    expected = [json.loads(text) for text in EXACT_TEXTS]
    assert repr(got) == repr(expected)  # repr: inf == inf, and ints stay ints


@pytest.mark.parametrize("text", [b"NaN", b"[1, Infinity]", b"-Infinity"])
def test_publishing_nan_or_infinity_is_refused(edge_service: Service, text: bytes) -> None:
    resp = requests.post(
        f"{edge_service.url}/channels/{unique('nan')}",
        data=text,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "bad_json"
