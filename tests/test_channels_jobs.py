"""End to end: jobs and channels across workers, reloads, restarts (of the service and of Redis).

Every test runs the real service (gunicorn + gevent) and, where named, the session's real
redis-server (appendonly, so its data survives ``restart()``), all on 127.0.0.1. Every wait is a
bounded poll; every streaming test has a timeout.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import requests

from app import create_app
from stream import Client, Event
from stream.errors import StreamReset
from stream.ndjson import NDJSONDecoder
from tests.job_worker import JobWorker, queue_env
from tests.redis_server import RedisServer
from tests.service import Service, wait_for

E2E = [pytest.mark.e2e, pytest.mark.timeout(120)]
FORMATS = ["ndjson", "sse", "json-seq"]
TOKEN = "s3cret-token"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def publish(url: str, channel: str, *values: Any, token: str | None = None) -> list[str]:
    """Publish on a fresh connection (so it can land on any worker); the ids, or raise."""
    headers = {"Content-Type": "application/json", "Connection": "close"}
    body = orjson.dumps(values[0])
    if len(values) > 1:
        headers["Content-Type"] = "application/x-ndjson"
        body = b"".join(orjson.dumps(v, option=orjson.OPT_APPEND_NEWLINE) for v in values)
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    resp = requests.post(f"{url}/channels/{channel}", data=body, headers=headers, timeout=10)
    assert resp.status_code == 201, resp.text
    ids: list[str] = resp.json()["ids"]
    return ids


@pytest.fixture(scope="module")
def memory_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with the in-process broker (one worker)."""
    svc = Service(tmp_path_factory.mktemp("memory")).start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def redis_service(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Service]:
    """The service on the session's Redis, with two web workers and a job worker."""
    env = queue_env(redis_url, WEB_CONCURRENCY="2")
    svc = Service(tmp_path_factory.mktemp("redis"), env).start()
    worker = JobWorker(tmp_path_factory.mktemp("job-worker"), env).start()
    yield svc
    worker.stop()
    svc.stop()


@pytest.fixture(params=["memory", "redis"])
def any_service(request: pytest.FixtureRequest) -> Service:
    """Each test that takes it runs once per broker."""
    svc: Service = request.getfixturevalue(f"{request.param}_service")
    return svc


# -- 1. two workers, one log ------------------------------------------------------------------


class Pinned:
    """One keep-alive HTTP connection whose worker is known: /healthz told its pid."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.conn.request("GET", "/healthz")
        resp = self.conn.getresponse()
        body = resp.read()
        assert resp.status == 200, body
        self.pid: int = orjson.loads(body)["pid"]

    def close(self) -> None:
        self.conn.close()


def pinned_to(port: int, want: Callable[[int], bool], attempts: int = 300) -> Pinned:
    """A connection served by a worker ``want`` accepts (new TCP connections until one is)."""
    for _ in range(attempts):
        pinned = Pinned(port)
        if want(pinned.pid):
            return pinned
        pinned.close()
    raise AssertionError(f"no connection landed on the wanted worker in {attempts} tries")


def read_envelopes(resp: http.client.HTTPResponse, n: int, until_end: bool = False) -> list[Any]:
    """Read NDJSON envelopes from a raw response: ``n`` of them, or up to the end marker."""
    decoder = NDJSONDecoder()
    out: list[Any] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(out) < n:
        chunk = resp.read1(65536)
        if not chunk:
            break
        out += [value for value in decoder.feed(chunk) if value != ""]
        if until_end and out and out[-1]["event"] == "end":
            break
    return out


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_publish_on_one_worker_receive_on_the_other(redis_service: Service) -> None:
    channel = unique("cross")
    sub = pinned_to(redis_service.port, lambda pid: True)
    try:
        sub.conn.request("GET", f"/channels/{channel}", headers={"Accept": "application/x-ndjson"})
        stream = sub.conn.getresponse()
        assert stream.status == 200
        # The subscription is registered before the first byte goes out: publish only then.
        pub = pinned_to(redis_service.port, lambda pid: pid != sub.pid)
        try:
            body = b'{"n": 1}\n{"n": 2}\n'
            pub.conn.request(
                "POST", f"/channels/{channel}", body=body,
                headers={"Content-Type": "application/x-ndjson"},
            )  # fmt: skip
            resp = pub.conn.getresponse()
            assert resp.status == 201
            ids = orjson.loads(resp.read())["ids"]
        finally:
            pub.close()
        assert pub.pid != sub.pid
        got = read_envelopes(stream, 2)
        assert got == [
            {"id": ids[0], "event": "message", "data": {"n": 1}},
            {"id": ids[1], "event": "message", "data": {"n": 2}},
        ]
    finally:
        sub.close()


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_job_started_on_one_worker_is_read_on_the_other(redis_service: Service) -> None:
    starter = pinned_to(redis_service.port, lambda pid: True)
    try:
        starter.conn.request(
            "POST", "/jobs", body=b'{"count": 20, "interval": 0.02}',
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        resp = starter.conn.getresponse()
        assert resp.status == 202
        job = orjson.loads(resp.read())
    finally:
        starter.close()
    reader = pinned_to(redis_service.port, lambda pid: pid != starter.pid)
    try:
        reader.conn.request("GET", job["events_url"])
        stream = reader.conn.getresponse()
        assert stream.status == 200
        got = read_envelopes(stream, 21, until_end=True)
    finally:
        reader.close()
    assert reader.pid != starter.pid
    assert [e["data"]["event_id"] for e in got[:-1]] == list(range(20))
    assert got[-1]["event"] == "end"


# -- 2. a subscriber across reloads and restarts ----------------------------------------------


class Publisher(threading.Thread):
    """Publishes ``{"i": 0..n-1}`` one per request, retrying while the service or Redis is down.

    A retry after a refused connection cannot duplicate; a retry after a 503 or a cut connection
    can (Redis may have appended the entry and died before its reply went out, and the broker
    does not retry for exactly that reason): those values are noted in ``ambiguous``.
    """

    def __init__(self, url: str, channel: str, n: int, period: float) -> None:
        super().__init__(daemon=True, name="publisher")
        self.url = url
        self.channel = channel
        self.n = n
        self.period = period
        self.retries = 0
        self.statuses: set[int] = set()
        self.ambiguous: set[int] = set()
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.n):
                self._publish_one(i)
                if self.stop.wait(self.period):
                    return
        except BaseException as exc:  # reported by the test
            self.error = exc

    def _publish_one(self, i: int) -> None:
        body = orjson.dumps({"i": i})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                resp = requests.post(
                    f"{self.url}/channels/{self.channel}",
                    data=body,
                    headers={"Content-Type": "application/json", "Connection": "close"},
                    timeout=10,
                )
            except requests.ConnectionError as exc:
                if "refused" not in str(exc).lower():
                    self.ambiguous.add(i)
            else:
                if resp.status_code == 201:
                    return
                self.statuses.add(resp.status_code)
                assert resp.status_code == 503, resp.text
                self.ambiguous.add(i)
            self.retries += 1
            self.stop.wait(0.02)
        raise AssertionError("could not publish within 60 s")


class Subscriber(threading.Thread):
    """Reads a channel with the client (reconnecting, resuming by id) until the value ``last``."""

    def __init__(self, url: str, channel: str, last: int, last_id: str, format: str) -> None:
        super().__init__(daemon=True, name="subscriber")
        self.client = Client(
            url, reconnect=True, max_attempts=None, backoff_initial=0.05, backoff_max=0.5,
            timeout=(2.0, 15.0),
        )  # fmt: skip
        self.stream = self.client.events(
            f"/channels/{channel}", format=format, last_event_id=last_id, reconnect=True
        )
        self.last = last
        self.got: list[int] = []
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.stream:
                self.ids.append(event.id)
                self.got.append(event.json()["i"])
                if self.got[-1] == self.last:
                    break
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.stream.close()
            self.client.close()


def read_log(url: str, channel: str, after: str, last: int) -> list[str]:
    """The channel's ids after ``after`` up to the value ``last``, replayed in one request."""
    ids: list[str] = []
    with Client(url, timeout=(5, 10)) as client:
        with client.events(f"/channels/{channel}", last_event_id=after, reconnect=False) as s:
            for event in s:
                ids.append(event.id)
                if event.json()["i"] == last:
                    break
    return ids


def check_all_once(sub: Subscriber, pub: Publisher, url: str, channel: str, after: str) -> None:
    """The subscriber got the log exactly (each entry once, in order), and the log holds every
    value in order, a value twice in a row only where a publish was retried ambiguously."""
    assert sub.error is None, repr(sub.error)
    assert len(set(sub.ids)) == len(sub.ids), "an event was delivered twice"
    assert sub.ids == read_log(url, channel, after, sub.last), "delivery differs from the log"
    once = [v for k, v in enumerate(sub.got) if k == 0 or sub.got[k - 1] != v]
    assert once == list(range(sub.last + 1))
    twice = {v for k, v in enumerate(sub.got) if k and sub.got[k - 1] == v}
    assert twice <= pub.ambiguous, f"published twice without an ambiguous retry: {twice}"


def wait_progress(sub: Subscriber, pub: Publisher, at_least: int, timeout: float = 30) -> None:
    def reached() -> bool:
        for thread in (sub, pub):
            assert thread.error is None, repr(thread.error)
        return len(sub.got) >= at_least or not sub.is_alive()

    wait_for(reached, timeout)


N = 1000


@pytest.mark.e2e
@pytest.mark.timeout(180)
@pytest.mark.parametrize("format", ["ndjson", "sse"])
def test_subscriber_survives_reload_and_restart(
    start_service: Callable[..., Service], redis_url: str, format: str
) -> None:
    env = {"REDIS_URL": redis_url, "WEB_CONCURRENCY": "2"}
    svc = start_service(env)
    channel = unique("restart")
    # A starting id: resuming from it replays everything published after it, even if the
    # subscriber's first connection drops before its first event.
    (start_id,) = publish(svc.url, channel, {"start": True})
    sub = Subscriber(svc.url, channel, N - 1, start_id, format)
    pub = Publisher(svc.url, channel, N, period=0.008)
    sub.start()
    pub.start()
    try:
        wait_progress(sub, pub, 250)
        old = set(svc.worker_pids())
        svc.send_signal(signal.SIGHUP)
        # gunicorn starts new workers, then gracefully stops the old ones.
        wait_for(
            lambda: len(set(svc.worker_pids()) - old) == 2 and not old & set(svc.worker_pids()), 30
        )
        wait_progress(sub, pub, 500)
        port = svc.port
        assert svc.stop(signal.SIGTERM) == 0
        svc2 = start_service(env, port=port)
        wait_progress(sub, pub, N, 60)
        pub.join(30)
        assert pub.error is None, repr(pub.error)
        assert pub.retries > 0  # the publisher did meet the service down
        check_all_once(sub, pub, svc2.url, channel, start_id)
    finally:
        pub.stop.set()
        sub.stream.close()
        sub.join(10)
        pub.join(10)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_subscriber_survives_redis_restart(
    start_service: Callable[..., Service], redis_url: str, restart_redis: RedisServer
) -> None:
    svc = start_service({"REDIS_URL": redis_url, "WEB_CONCURRENCY": "2"})
    channel = unique("redis-restart")
    (start_id,) = publish(svc.url, channel, {"start": True})
    sub = Subscriber(svc.url, channel, N - 1, start_id, "ndjson")
    pub = Publisher(svc.url, channel, N, period=0.005)
    sub.start()
    pub.start()
    try:
        wait_progress(sub, pub, 400)
        restart_redis.restart()
        wait_progress(sub, pub, N, 60)
        pub.join(30)
        assert pub.error is None, repr(pub.error)
        assert pub.statuses == {503}  # refused while Redis was down, then retried
        check_all_once(sub, pub, svc.url, channel, start_id)
    finally:
        pub.stop.set()
        sub.stream.close()
        sub.join(10)
        pub.join(10)


# -- 3. a job resumed halfway -----------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("format", FORMATS)
def test_job_resumed_halfway_gets_the_rest_once(any_service: Service, format: str) -> None:
    count = 60
    resp = requests.post(
        any_service.url + "/jobs", json={"count": count, "interval": 0.02}, timeout=10
    )
    assert resp.status_code == 202
    url = resp.json()["events_url"]
    with Client(any_service.url, timeout=(5, 10)) as client:
        first: list[Any] = []
        with client.stream(url, format=format) as s:
            for value in s:
                first.append(value)
                if len(first) == count // 2:
                    break
            last_id = s.last_event_id
        assert last_id
        # The job goes on meanwhile; the resume replays what was missed, then follows live.
        rest = list(client.stream(url, format=format, last_event_id=last_id))
    assert [v["event_id"] for v in first] == list(range(count // 2))
    assert [v["event_id"] for v in rest] == list(range(count // 2, count))
    assert rest[-1]["is_last_event"] is True


# -- 4. publish refusals ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with a publish token and a 1 KiB body limit."""
    env = {"STREAM_PUBLISH_TOKEN": TOKEN, "STREAM_MAX_BODY": "1024"}
    svc = Service(tmp_path_factory.mktemp("token"), env).start()
    yield svc
    svc.stop()


def raw_post(
    svc: Service, path: str, body: bytes, content_type: str = "application/json",
    token: str | None = TOKEN,
) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """POST exactly ``path`` (no client-side normalisation of dots or escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=10)
    try:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type") == "application/json", data
        return resp.status, orjson.loads(data)
    finally:
        conn.close()


REFUSALS = [
    pytest.param(
        "/channels/{c}", b"{}", "application/json", None, 401, "unauthorized", id="no-token"
    ),
    pytest.param(
        "/channels/{c}", b"{}", "application/json", "wrong", 401, "unauthorized", id="wrong-token"
    ),
    pytest.param(
        "/channels/{c}",
        b"{}",
        "application/json",
        TOKEN + "x",
        401,
        "unauthorized",
        id="token-prefix",
    ),
    pytest.param(
        "/channels/{c}",
        b'"' + b"x" * 2000 + b'"',
        "application/json",
        TOKEN,
        413,
        None,
        id="too-large",
    ),
    pytest.param(
        "/channels/{c}?event=end",
        b"{}",
        "application/json",
        TOKEN,
        400,
        "bad_event",
        id="reserved-event",
    ),
    pytest.param(
        "/channels/{c}?event=a%20b",
        b"{}",
        "application/json",
        TOKEN,
        400,
        "bad_event",
        id="bad-event",
    ),
    pytest.param(
        "/channels/{c}?event=" + "e" * 65,
        b"{}",
        "application/json",
        TOKEN,
        400,
        "bad_event",
        id="long-event",
    ),
    pytest.param(
        "/channels/{c}", b"{}", "text/plain", TOKEN, 415, "unsupported_media_type", id="text-plain"
    ),
    pytest.param(
        "/channels/{c}",
        b"{}",
        "application/x-www-form-urlencoded",
        TOKEN,
        415,
        "unsupported_media_type",
        id="form",
    ),
    pytest.param(
        "/channels/{c}", b'{"a": ', "application/json", TOKEN, 400, "bad_json", id="bad-json"
    ),
    pytest.param("/channels/{c}", b"", "application/json", TOKEN, 400, "bad_json", id="empty-json"),
    pytest.param(
        "/channels/{c}",
        b'{"ok": 1}\n{"bad"\n',
        "application/x-ndjson",
        TOKEN,
        400,
        "bad_json",
        id="bad-ndjson-line-2",
    ),
    pytest.param(
        "/channels/{c}", b"\n \n", "application/x-ndjson", TOKEN, 400, "bad_json", id="empty-ndjson"
    ),
]


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("path", "body", "content_type", "token", "status", "code"), REFUSALS)
def test_publish_refusals_publish_nothing(
    token_service: Service, path: str, body: bytes, content_type: str, token: str | None,
    status: int, code: str | None,
) -> None:  # fmt: skip
    channel = unique("refuse")
    (before,) = publish(token_service.url, channel, {"marker": "before"}, token=TOKEN)
    got_status, error = raw_post(token_service, path.format(c=channel), body, content_type, token)
    assert got_status == status, error
    if code is not None:
        assert error["error"]["code"] == code
    if content_type == "application/x-ndjson" and b'{"bad"' in body:
        assert "line 2" in error["error"]["message"]  # the valid line 1 was not published
    (after,) = publish(token_service.url, channel, {"marker": "after"}, token=TOKEN)
    # Replay from the first marker: the next event must be the second marker, nothing between.
    with Client(token_service.url, timeout=(5, 10)) as client:
        with client.events(f"/channels/{channel}", last_event_id=before) as s:
            first = next(iter(s))
    assert (first.id, first.json()) == (after, {"marker": "after"})


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/channels/" + "a" * 129, id="too-long"),
        pytest.param("/channels/bad%20name", id="space"),
        pytest.param("/channels/b@d", id="at-sign"),
        pytest.param("/channels/%2E", id="dot-escaped"),
        pytest.param("/channels/%2E%2E", id="dotdot-escaped"),
        pytest.param("/channels/a%2Fb", id="slash-escaped"),
        pytest.param("/channels/", id="empty"),
    ],
)
def test_publish_to_a_bad_name_is_refused(token_service: Service, path: str) -> None:
    status, error = raw_post(token_service, path, b"{}")
    assert status in (400, 404), error
    assert "error" in error


def test_publish_with_the_right_token_is_accepted(token_service: Service) -> None:
    channel = unique("ok")
    status, body = raw_post(token_service, f"/channels/{channel}", b'{"a": 1}')
    assert status == 201
    assert len(body["ids"]) == 1


def test_only_loopback_may_publish_without_a_token() -> None:
    # No traffic leaves the machine: the remote address is set in the WSGI environ.
    app = create_app({"REDIS_URL": None, "STREAM_PUBLISH_TOKEN": None})
    broker = app.extensions["stream.broker"]
    client = app.test_client()
    outside = {"REMOTE_ADDR": "10.1.2.3"}
    resp = client.post("/channels/lan", json={"a": 1}, environ_overrides=outside)
    assert resp.status_code == 403
    assert resp.get_json()["error"]["code"] == "forbidden"
    sub = broker.subscribe("channel:lan", from_start=True)
    try:
        assert sub.get(0) == []  # nothing was published
    finally:
        sub.close()
    for address in ("127.0.0.1", "::1", "127.8.9.10"):
        resp = client.post(
            "/channels/lan", json={"a": 1}, environ_overrides={"REMOTE_ADDR": address}
        )
        assert resp.status_code == 201, address
    broker.close()


def test_a_token_lets_any_address_publish() -> None:
    app = create_app({"REDIS_URL": None, "STREAM_PUBLISH_TOKEN": TOKEN})
    client = app.test_client()
    outside = {"REMOTE_ADDR": "10.1.2.3"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert client.post("/channels/x", json=1, environ_overrides=outside).status_code == 401
    resp = client.post("/channels/x", json=1, headers=auth, environ_overrides=outside)
    assert resp.status_code == 201
    app.extensions["stream.broker"].close()


# -- 5. reset ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["memory", "redis"])
def short_history(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """A service that keeps only the last 5 events of each log."""
    env = {"STREAM_HISTORY_LENGTH": "5"}
    if request.param == "redis":
        env.update(REDIS_URL=request.getfixturevalue("redis_url"), WEB_CONCURRENCY="2")
    svc = Service(tmp_path_factory.mktemp(f"short-{request.param}"), env).start()
    yield svc
    svc.stop()


def trimmed_channel(svc: Service) -> tuple[str, str, list[str]]:
    """A channel whose first id is trimmed: (name, that id, the ids still retained)."""
    channel = unique("trim")
    (gone,) = publish(svc.url, channel, {"i": -1})
    ids = publish(svc.url, channel, *({"i": i} for i in range(20)))
    return channel, gone, ids[-5:]


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize("format", FORMATS)
def test_resume_from_a_trimmed_id_resets_first(short_history: Service, format: str) -> None:
    channel, gone, kept = trimmed_channel(short_history)
    with Client(short_history.url, timeout=(5, 10)) as client:
        events: list[Event] = []
        with client.events(f"/channels/{channel}", format=format, last_event_id=gone) as s:
            for event in s:
                events.append(event)
                if len(events) == 6:
                    break
        with pytest.raises(StreamReset):
            with client.stream(f"/channels/{channel}", format=format, last_event_id=gone) as s:
                next(iter(s))
    reset, *rest = events
    assert reset.event == "reset"
    assert reset.json() == {"last_event_id": gone, "first_retained_id": kept[0]}
    assert [(e.event, e.id) for e in rest] == [("message", i) for i in kept]
    assert [e.json()["i"] for e in rest] == list(range(15, 20))


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_resume_from_a_retained_id_does_not_reset(short_history: Service) -> None:
    channel, _, kept = trimmed_channel(short_history)
    with Client(short_history.url, timeout=(5, 10)) as client:
        with client.events(f"/channels/{channel}", last_event_id=kept[0]) as s:
            events = [event for _, event in zip(range(4), s, strict=False)]
    assert [e.id for e in events] == kept[1:]


# -- shutdown ---------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_worker_exit_closes_the_redis_broker(
    start_service: Callable[..., Service], redis_url: str
) -> None:
    svc = start_service({"REDIS_URL": redis_url, "WEB_CONCURRENCY": "2"})
    channel = unique("exit")
    # A subscriber on each worker, so that each has a running reader to stop.
    first = pinned_to(svc.port, lambda pid: True)
    second = pinned_to(svc.port, lambda pid: pid != first.pid)
    streams = []
    for pinned in (first, second):
        pinned.conn.request("GET", f"/channels/{channel}")
        streams.append(pinned.conn.getresponse())
        assert streams[-1].status == 200
    publish(svc.url, channel, {"x": 1})
    for stream in streams:
        assert [e["data"] for e in read_envelopes(stream, 1)] == [{"x": 1}]
    codes: list[int] = []
    stopper = threading.Thread(target=lambda: codes.append(svc.stop(signal.SIGTERM)))
    started = time.monotonic()
    stopper.start()
    try:
        for stream in streams:
            # The body ends cleanly (the last chunk), with nothing after the event.
            assert stream.read().strip(b" ") == b""  # at most NDJSON keep-alives
    finally:
        first.close()
        second.close()
        stopper.join(30)
    assert codes == [0]
    # Well within GRACEFUL_TIMEOUT (10 s here): closing the broker does not hold the exit up.
    assert time.monotonic() - started < 5
    log = svc.log()
    for pid in (first.pid, second.pid):
        assert f"worker {pid} exiting: closed the broker" in log
