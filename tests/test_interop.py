"""Interop: software this project did not write reads the service, and the clients read it.

Two directions, all on loopback, with the third-party packages of ``requirements-dev.txt``:

1. Third-party readers read the real service (gunicorn + gevent, ``STREAM_HEARTBEAT`` 0.2 s,
   so every body with a pause in it carries keep-alives): the strict JSON Lines readers
   (``jsonlines.Reader`` over the response's lines, ``ndjson.loads``, a ``json.loads(line)``
   loop, the ``jq`` command) read NDJSON, ``jq --seq`` reads JSON-seq, and the SSE readers
   (sseclient-py, httpx-sse, requests-sse, aiohttp-sse-client) read SSE, from ``/events``, a
   job (ids, the end marker) and a channel that stays quiet past a keep-alive before anything
   is published. EventSource-like readers reconnect after a job's end and must be told
   ``204`` (then they stop); a reader that was cut resumes with ``Last-Event-ID``.
2. ``stream.Client`` and ``stream.aio.AsyncClient`` read third-party servers run under uvicorn
   (``tests/interop_servers.py``): sse-starlette (finite with ids: the iteration ends, no
   replay; cut then resumed with ``Last-Event-ID``; keep-alive comments), FastAPI's SSE,
   JSON Lines and ``StreamingResponse`` NDJSON, an OpenAI-style stream ending in
   ``data: [DONE]``, and gzip from Starlette's ``GZipMiddleware``. Then the bytes captured
   from those servers are replayed by the scripted server (``tests/rawserver.py``) gzip-encoded,
   with CRLF (and bare CR) line ends, in 1-byte chunks and close-delimited (no chunking, no
   ``Content-Length``), and cut then resumed.

Every network read has a timeout; a reader that does not end is stopped after a bound and the
test fails with what it had read.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiohttp
import httpx
import httpx_sse
import jsonlines
import ndjson
import orjson
import pytest
import requests
import requests_sse
import sseclient
from aiohttp_sse_client import client as aiohttp_sse

from stream import Client
from stream.aio import AsyncClient
from tests.interop_servers import chat_chunks
from tests.rawserver import Cut, RawServer, Script, Wait
from tests.service import ROOT, Service, free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

#: the service's keep-alive interval here: every pause longer than this carries keep-alives
HEARTBEAT = 0.2
#: (connect, read) timeouts of every third-party reader's request
TIMEOUT = (5.0, 10.0)
#: how long a reader may take to read a whole test stream before the test calls it stuck
WITHIN = 15.0

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
JSON_SEQ = "application/json-seq"

#: ``/events?count=3``: the seed's first three events
SEED = [
    {"event_id": 0, "data": "some data", "is_last_event": False},
    {"event_id": 1, "data": "some more data", "is_last_event": False},
    {"event_id": 2, "data": "and more", "is_last_event": True},
]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def run_bounded(work: Callable[[], Any], within: float, on_timeout: Callable[[], None]) -> Any:
    """Run ``work`` in a thread; after ``within`` s call ``on_timeout`` and fail the test."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the test's own thread below
            failure.append(exc)

    thread = threading.Thread(target=target, name="interop-reader", daemon=True)
    thread.start()
    thread.join(within)
    if thread.is_alive():
        on_timeout()
        thread.join(5)
        raise AssertionError(f"the reader did not finish within {within} s")
    if failure:
        raise failure[0]
    return result[0]


# == 1. third-party readers read this service ====================================================


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with a 0.2 s heartbeat (a pause of 0.5 s between events carries keep-alives)."""
    svc = Service(tmp_path_factory.mktemp("interop"), {"STREAM_HEARTBEAT": str(HEARTBEAT)})
    svc.start()
    yield svc
    svc.stop()


def start_job(svc: Service, count: int = 3, interval: float = 0.5) -> str:
    """Start a job on the service; its events URL."""
    resp = requests.post(
        svc.url + "/jobs", json={"count": count, "interval": interval}, timeout=TIMEOUT
    )
    assert resp.status_code == 202, resp.text
    return svc.url + resp.json()["events_url"]


def publish(svc: Service, channel: str, values: list[Any]) -> list[str]:
    """Publish ``values`` (one NDJSON body) to a channel; their ids."""
    body = b"".join(orjson.dumps(v, option=orjson.OPT_APPEND_NEWLINE) for v in values)
    resp = requests.post(
        f"{svc.url}/channels/{channel}",
        data=body,
        headers={"Content-Type": NDJSON},
        timeout=TIMEOUT,
    )
    assert resp.status_code == 201, resp.text
    ids: list[str] = resp.json()["ids"]
    return ids


def get(url: str, accept: str, **headers: str) -> requests.Response:
    """A streaming GET as a user of requests writes it; the status must be 200."""
    resp = requests.get(url, headers={"Accept": accept, **headers}, stream=True, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    return resp


def after_keepalive(resp: requests.Response, action: Callable[[], None]) -> None:
    """Call ``action`` once the response's second piece has arrived, before it is read on.

    The service sends its first bytes at once and a keep-alive after ``HEARTBEAT`` s of
    silence; until ``action`` publishes there is nothing else to send, so a second piece is a
    keep-alive that a quiet channel sent. Hooked under requests' ``iter_content`` (and so under
    ``iter_lines``), so the reader reads the response exactly as a user's code would.
    """
    original = resp.raw.stream

    def stream(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        pieces = 0
        for piece in original(*args, **kwargs):
            pieces += 1
            if pieces == 2:
                action()
            yield piece

    resp.raw.stream = stream  # type: ignore[method-assign]


@dataclass
class Source:
    """A stream of the service: where it is, what a reader must get, what to do once quiet."""

    name: str
    url: str
    expected: list[Any]
    #: publishes the channel's values once the reader's connection has carried a keep-alive
    publish: Callable[[], None] | None = None
    #: values that end the reading of an endless body (a channel)
    limit: int = 1000


def envelopes(ids: list[str], values: list[Any], event: str = "message") -> list[Any]:
    return [{"id": i, "event": event, "data": v} for i, v in zip(ids, values, strict=True)]


def make_source(svc: Service, name: str) -> Source:
    """``events``: the seed's stream, 0.5 s apart; ``job``: a job of 3 events 0.5 s apart (ids,
    end marker); ``channel``: a channel where 3 values are published after a keep-alive."""
    if name == "events":
        return Source(name, svc.url + "/events?count=3&interval=0.5", SEED)
    if name == "job":
        url = start_job(svc)
        # The ids are the service's to choose: ``check_job`` checks the envelopes' shape.
        return Source(name, url, [])
    channel = unique("interop")
    values = [{"n": 1}, {"n": 2, "text": "é ✓"}, {"n": 3, "list": [1.5, None, True]}]
    source = Source(name, f"{svc.url}/channels/{channel}", [], limit=len(values))

    def action() -> None:
        ids = publish(svc, channel, values)
        source.expected[:] = envelopes(ids, values)

    source.publish = action
    return source


def check_job(values: list[Any]) -> None:
    """A job's envelopes: 3 messages with the seed's data, then the end marker; distinct ids."""
    assert [v["event"] for v in values] == ["message"] * 3 + ["end"], values
    assert [v["data"] for v in values[:3]] == SEED
    ids = [v["id"] for v in values]
    assert len(set(ids)) == 4 and all(isinstance(i, str) and i for i in ids), ids


def check(source: Source, values: list[Any]) -> None:
    if source.name == "job":
        check_job(values)
    else:
        assert values == source.expected


# -- the strict JSON Lines readers ---------------------------------------------------------------


def read_jsonlines(resp: requests.Response, limit: int) -> list[Any]:
    """``jsonlines.Reader`` over ``resp.iter_lines()``: an empty line is an InvalidLineError."""
    out: list[Any] = []
    with jsonlines.Reader(resp.iter_lines()) as reader:
        for value in reader:
            out.append(value)
            if len(out) >= limit:
                break
    return out


def read_json_loads(resp: requests.Response, limit: int) -> list[Any]:
    """The loop everyone writes: ``json.loads`` on each of ``resp.iter_lines()``."""
    out: list[Any] = []
    for line in resp.iter_lines():
        out.append(json.loads(line))
        if len(out) >= limit:
            break
    return out


def read_ndjson(resp: requests.Response, limit: int) -> list[Any]:
    """``ndjson.loads`` on the text read so far (the whole body, or its first ``limit`` lines)."""
    body = b""
    for piece in resp.iter_content(chunk_size=None):
        body += piece
        if body.count(b"\n") >= limit:
            break
    # The complete lines: what a program that decodes "what has arrived" hands to ndjson.
    complete = body[: body.rfind(b"\n") + 1]
    values: list[Any] = ndjson.loads(complete.decode("utf-8"))
    return values


def read_jq(resp: requests.Response, limit: int, seq: bool = False) -> list[Any]:
    """The ``jq`` command (``jq -c .``, or ``jq --seq`` for JSON-seq) fed the body as it arrives."""
    jq = shutil.which("jq")
    assert jq is not None, "jq is not installed (scripts/test installs it with apt-get)"
    argv = [jq, "--unbuffered", "-c", *(["--seq"] if seq else []), "."]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin = proc.stdin

    pump_failure: list[BaseException] = []

    def pump() -> None:
        try:
            for piece in resp.iter_content(chunk_size=None):
                stdin.write(piece)
                stdin.flush()
        except (OSError, ValueError, requests.RequestException, AttributeError):
            pass  # the test closed the response or jq's input: reading is over
        except BaseException as exc:  # a failed publish (the keep-alive hook): the test's
            pump_failure.append(exc)
        finally:
            try:
                stdin.close()
            except OSError:
                pass

    pumper = threading.Thread(target=pump, name="jq-pump", daemon=True)
    pumper.start()
    out: list[Any] = []
    deadline = time.monotonic() + WITHIN
    pending = b""
    fd = proc.stdout.fileno()
    try:
        # os.read on the pipe, not readline: a buffered reader would hold lines that select()
        # then no longer sees.
        while len(out) < limit:
            line, newline, rest = pending.partition(b"\n")
            if newline:
                pending = rest
                out.append(json.loads(line.lstrip(b"\x1e")))
                continue
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"jq printed nothing more within {WITHIN} s after {out!r}")
            piece = os.read(fd, 65536)
            if not piece:
                break
            pending += piece
    finally:
        resp.close()
        pumper.join(5)
        try:
            proc.wait(5)  # its input is closed: jq ends on its own
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        errors = proc.stderr.read().decode(errors="replace")
        proc.stdout.close()
        proc.stderr.close()
    if pump_failure:
        raise pump_failure[0]
    if len(out) < limit:
        assert proc.returncode == 0, f"jq failed ({proc.returncode}): {errors}"
    return out


NDJSON_READERS: dict[str, Callable[[requests.Response, int], list[Any]]] = {
    "jsonlines": read_jsonlines,
    "ndjson": read_ndjson,
    "json.loads": read_json_loads,
    "jq": read_jq,
}
SOURCES = ["events", "job", "channel"]


@pytest.mark.parametrize("reader", list(NDJSON_READERS))
@pytest.mark.parametrize("source_name", SOURCES)
def test_strict_json_lines_reader_reads_ndjson(
    ours: Service, reader: str, source_name: str
) -> None:
    """Keep-alives are JSON whitespace, never an empty line: every strict reader reads on."""
    source = make_source(ours, source_name)
    resp = get(source.url, NDJSON)
    assert resp.headers["Content-Type"].startswith(NDJSON)
    if source.publish is not None:
        after_keepalive(resp, source.publish)
    with resp:
        values = run_bounded(lambda: NDJSON_READERS[reader](resp, source.limit), WITHIN, resp.close)
    check(source, values)


@pytest.mark.parametrize("source_name", SOURCES)
def test_jq_seq_reads_json_seq(ours: Service, source_name: str) -> None:
    """``jq --seq`` reads the RFC 7464 body; a keep-alive is a lone RS, which RFC 7464 skips."""
    source = make_source(ours, source_name)
    resp = get(source.url, JSON_SEQ)
    assert resp.headers["Content-Type"].startswith(JSON_SEQ)
    if source.publish is not None:
        after_keepalive(resp, source.publish)
    with resp:
        values = run_bounded(lambda: read_jq(resp, source.limit, seq=True), WITHIN, resp.close)
    check(source, values)


def test_accept_application_json_gets_ndjson_a_strict_reader_reads(ours: Service) -> None:
    """OpenAPI-generated clients send ``Accept: application/json``: they get NDJSON."""
    resp = get(ours.url + "/events?count=3&interval=0.5", "application/json")
    assert resp.headers["Content-Type"].startswith(NDJSON)
    with resp:
        assert run_bounded(lambda: read_jsonlines(resp, 100), WITHIN, resp.close) == SEED


def test_jsonlines_resumes_a_job_with_last_event_id(ours: Service) -> None:
    """Cut after two envelopes, resumed with ``Last-Event-ID``: the rest, once, then the end."""
    url = start_job(ours, count=3, interval=0.5)
    with get(url, NDJSON) as first:
        head = run_bounded(lambda: read_jsonlines(first, 2), WITHIN, first.close)
    with get(url, NDJSON, **{"Last-Event-ID": head[-1]["id"]}) as second:
        rest = run_bounded(lambda: read_jsonlines(second, 100), WITHIN, second.close)
    check_job(head + rest)


def test_jsonlines_reads_a_close_delimited_body(ours: Service) -> None:
    """An HTTP/1.0 request gets a body that ends with the connection; the reader reads it all."""
    url = start_job(ours, count=3, interval=0.5)
    conn = http.client.HTTPConnection("127.0.0.1", ours.port, timeout=TIMEOUT[1])
    conn._http_vsn = 10  # HTTP/1.0: no chunked transfer coding
    conn._http_vsn_str = "HTTP/1.0"
    try:
        conn.request("GET", url.removeprefix(ours.url), headers={"Accept": NDJSON})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") is None
        assert resp.getheader("Content-Length") is None

        def read() -> list[Any]:
            with jsonlines.Reader(iter(resp.readline, b"")) as reader:
                return list(reader)

        values = run_bounded(read, WITHIN, conn.close)
    finally:
        conn.close()
    check_job(values)


# -- the SSE readers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One event as an SSE reader reported it."""

    event: str
    data: Any
    id: str | None


def seen(event: str | None, data: str, ident: str | None) -> Seen:
    return Seen(event or "message", json.loads(data), ident or None)


def read_sseclient(url: str, limit: int, headers: dict[str, str]) -> list[Seen]:
    """sseclient-py over a requests response."""
    out: list[Seen] = []
    with requests.get(
        url, headers={"Accept": SSE, **headers}, stream=True, timeout=TIMEOUT
    ) as resp:
        assert resp.status_code == 200, resp.text
        for event in sseclient.SSEClient(resp).events():
            out.append(seen(event.event, event.data, event.id))
            if len(out) >= limit:
                break
    return out


def read_httpx_sse(url: str, limit: int, headers: dict[str, str]) -> list[Seen]:
    """httpx-sse's ``connect_sse`` on an ``httpx.Client``."""
    out: list[Seen] = []
    timeout = httpx.Timeout(TIMEOUT[1], connect=TIMEOUT[0])
    with (
        httpx.Client(timeout=timeout) as client,
        httpx_sse.connect_sse(client, "GET", url, headers=headers) as source,
    ):
        for sse in source.iter_sse():
            out.append(seen(sse.event, sse.data, sse.id))
            if len(out) >= limit:
                break
    return out


def read_httpx_sse_async(url: str, limit: int, headers: dict[str, str]) -> list[Seen]:
    """httpx-sse's ``aconnect_sse`` on an ``httpx.AsyncClient``."""

    async def read() -> list[Seen]:
        out: list[Seen] = []
        timeout = httpx.Timeout(TIMEOUT[1], connect=TIMEOUT[0])
        async with (
            httpx.AsyncClient(timeout=timeout) as client,
            httpx_sse.aconnect_sse(client, "GET", url, headers=headers) as source,
        ):
            async for sse in source.aiter_sse():
                out.append(seen(sse.event, sse.data, sse.id))
                if len(out) >= limit:
                    break
        return out

    return asyncio.run(asyncio.wait_for(read(), WITHIN))


def read_requests_sse(url: str, limit: int, headers: dict[str, str]) -> list[Seen]:
    """requests-sse's ``EventSource`` (it reconnects like a browser: read up to ``limit``)."""
    out: list[Seen] = []
    last = headers.get("Last-Event-ID")
    with requests_sse.EventSource(
        url,
        timeout=TIMEOUT[1],
        reconnection_time=timedelta(milliseconds=50),
        max_connect_retry=0,
        latest_event_id=last,
    ) as source:
        for event in source:
            out.append(seen(event.type, event.data or "", event.last_event_id))
            if len(out) >= limit:
                break
    return out


def read_aiohttp_sse(url: str, limit: int, headers: dict[str, str]) -> list[Seen]:
    """aiohttp-sse-client's ``EventSource`` (it reconnects like a browser: read up to ``limit``)."""

    async def read() -> list[Seen]:
        out: list[Seen] = []
        timeout = aiohttp.ClientTimeout(sock_connect=TIMEOUT[0], sock_read=TIMEOUT[1])
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            aiohttp_sse.EventSource(
                url,
                session=session,
                reconnection_time=timedelta(milliseconds=50),
                max_connect_retry=0,
                headers=dict(headers),
            ) as source,
        ):
            async for event in source:
                out.append(seen(event.type, event.data, event.last_event_id))
                if len(out) >= limit:
                    break
        return out

    return asyncio.run(asyncio.wait_for(read(), WITHIN))


SSE_READERS: dict[str, Callable[[str, int, dict[str, str]], list[Seen]]] = {
    "sseclient-py": read_sseclient,
    "httpx-sse": read_httpx_sse,
    "httpx-sse-async": read_httpx_sse_async,
    "requests-sse": read_requests_sse,
    "aiohttp-sse-client": read_aiohttp_sse,
}


def open_streams(svc: Service) -> float:
    return svc.metrics().get("stream_open_streams", 0.0)


def publish_when_subscribed(svc: Service, action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` in a thread once the service holds a stream open (the reader's).

    Streams of earlier tests are gone first (the service notices a closed connection at its
    next keep-alive), so the one open stream is the reader's.
    """
    wait_for(lambda: open_streams(svc) == 0, WITHIN)

    def run() -> None:
        try:
            wait_for(lambda: open_streams(svc) >= 1, WITHIN)
        except AssertionError:
            return  # the reader fails on its own (nothing is published)
        action()

    thread = threading.Thread(target=run, name="interop-publisher", daemon=True)
    thread.start()
    return thread


def check_sse_job(events: list[Seen]) -> None:
    """A job over SSE: 3 messages with the seed's data, then ``end``; ids present and distinct."""
    assert [e.event for e in events] == ["message"] * 3 + ["end"], events
    assert [e.data for e in events[:3]] == SEED
    ids = [e.id for e in events]
    assert len(set(ids)) == 4 and all(ids), ids


@pytest.mark.parametrize("reader", list(SSE_READERS))
@pytest.mark.parametrize("source_name", SOURCES)
def test_sse_reader_reads_sse(ours: Service, reader: str, source_name: str) -> None:
    """Each SSE reader reads the seed's stream (comments between events), a job and a channel."""
    read = SSE_READERS[reader]
    publisher = None
    if source_name == "events":
        events = read(ours.url + "/events?count=3&interval=0.5", 3, {})
        assert [(e.event, e.data) for e in events] == [("message", v) for v in SEED]
    elif source_name == "job":
        events = read(start_job(ours), 4, {})
        check_sse_job(events)
    else:
        channel = unique("interop-sse")
        values = [{"n": 1}, {"n": 2, "text": "é ✓"}, {"n": 3}]
        ids: list[str] = []
        publisher = publish_when_subscribed(
            ours, lambda: ids.extend(publish(ours, channel, values))
        )
        events = read(f"{ours.url}/channels/{channel}", 3, {})
        publisher.join(WITHIN)
        assert events == [Seen("message", v, i) for v, i in zip(values, ids, strict=True)]


def test_requests_sse_stops_after_a_job_ends(ours: Service) -> None:
    """requests-sse reconnects after ``end`` with its id; ``204`` makes it stop."""
    url = start_job(ours, count=2, interval=0)
    source = requests_sse.EventSource(
        url,
        timeout=TIMEOUT[1],
        reconnection_time=timedelta(milliseconds=50),
        max_connect_retry=0,
    )
    events: list[Seen] = []

    def read() -> BaseException | None:
        with source:
            try:
                for event in source:
                    events.append(seen(event.type, event.data or "", event.last_event_id))
            except requests_sse.InvalidStatusCodeError as exc:
                exc.response.close()  # requests-sse leaves the refused response open
                return exc
        return None

    stopped = run_bounded(read, WITHIN, source.close)
    assert [e.event for e in events] == ["message", "message", "end"], events
    assert isinstance(stopped, requests_sse.InvalidStatusCodeError)
    assert stopped.status_code == 204


def test_aiohttp_sse_client_stops_after_a_job_ends(ours: Service) -> None:
    """aiohttp-sse-client reconnects after ``end``; the ``204`` ends its reconnecting."""
    url = start_job(ours, count=2, interval=0)

    async def read() -> tuple[list[Seen], BaseException | None]:
        events: list[Seen] = []
        timeout = aiohttp.ClientTimeout(sock_connect=TIMEOUT[0], sock_read=TIMEOUT[1])
        async with aiohttp.ClientSession(timeout=timeout) as session:
            source = aiohttp_sse.EventSource(
                url, session=session, reconnection_time=timedelta(milliseconds=50)
            )
            try:
                async with source:
                    async for event in source:
                        events.append(seen(event.type, event.data, event.last_event_id))
            except ConnectionError as exc:  # its way to say "status 204, not 200"
                return events, exc
        return events, None

    try:
        events, stopped = asyncio.run(asyncio.wait_for(read(), WITHIN))
    except TimeoutError:
        raise AssertionError("the resume after the job's end was held open (want 204)") from None
    assert [e.event for e in events] == ["message", "message", "end"], events
    assert stopped is not None and "204" in str(stopped)


def test_requests_sse_resumes_a_job_after_a_cut(ours: Service) -> None:
    """Closed after two events, reopened with ``latest_event_id``: the rest once, then ``end``."""
    url = start_job(ours, count=3, interval=0.5)
    head = run_bounded(lambda: read_requests_sse(url, 2, {}), WITHIN, lambda: None)
    rest = run_bounded(
        lambda: read_requests_sse(url, 2, {"Last-Event-ID": str(head[-1].id)}),
        WITHIN,
        lambda: None,
    )
    check_sse_job(head + rest)


def test_httpx_sse_resumes_a_channel_with_last_event_id(ours: Service) -> None:
    """Values published while a reader was away come first when it resumes with its id."""
    channel = unique("interop-resume")
    publisher = publish_when_subscribed(ours, lambda: publish(ours, channel, [1, 2]))
    head = read_httpx_sse(f"{ours.url}/channels/{channel}", 2, {})
    publisher.join(WITHIN)
    wait_for(lambda: open_streams(ours) == 0, WITHIN)
    missed = publish(ours, channel, [3, 4])
    rest = read_httpx_sse(f"{ours.url}/channels/{channel}", 2, {"Last-Event-ID": str(head[-1].id)})
    assert [e.data for e in head + rest] == [1, 2, 3, 4]
    assert [e.id for e in rest] == missed


# == 2. this project's clients read third-party servers ==========================================


class Uvicorn:
    """``uvicorn tests.interop_servers:app`` on a free loopback port, from the repository root."""

    def __init__(self, log_dir: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"uvicorn-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Uvicorn:
        argv = [sys.executable, "-m", "uvicorn", "tests.interop_servers:app"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT
            )
        wait_for(self.healthy, 20)
        return self

    def healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"uvicorn exited: {self.log_path.read_text(errors='replace')}")
        return requests.get(self.url + "/healthz", timeout=1).status_code == 200

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log(self, key: str) -> list[dict[str, Any]]:
        """The stream requests the server logged under ``key``."""
        entries: list[dict[str, Any]] = requests.get(
            self.url + "/log", params={"key": key}, timeout=TIMEOUT
        ).json()
        return entries


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Uvicorn]:
    server = Uvicorn(tmp_path_factory.mktemp("uvicorn")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    """Which client reads: ``Client`` (requests) or ``AsyncClient`` (httpx)."""
    value: str = request.param
    return value


#: clients that give up quickly, so a wrong resume shows as an error, not a long wait
CLIENT_OPTIONS: dict[str, Any] = {
    "timeout": TIMEOUT,
    "backoff_initial": 0.05,
    "backoff_max": 0.2,
    "max_attempts": 3,
}


def read_with(
    kind: str,
    url: str,
    *,
    events: bool = False,
    limit: int = 1000,
    on_item: Callable[[Any], None] = lambda item: None,
    **kwargs: Any,
) -> list[Any]:
    """What ``Client``/``AsyncClient`` ``stream()`` (or ``events()``) yields for ``url``.

    At most ``limit`` items (a replaying client is caught by asking for one more than there
    are), each handed to ``on_item`` as it comes; a stream that has not ended after ``WITHIN``
    s fails the test.
    """
    if kind == "sync":
        client = Client(**CLIENT_OPTIONS)
        stream = (client.events if events else client.stream)(url, **kwargs)

        def consume() -> list[Any]:
            items: list[Any] = []
            for item in stream:
                items.append(item)
                on_item(item)
                if len(items) >= limit:
                    break
            return items

        try:
            items: list[Any] = run_bounded(consume, WITHIN, stream.close)
            return items
        finally:
            stream.close()
            client.close()

    async def consume_async() -> list[Any]:
        async with AsyncClient(**CLIENT_OPTIONS) as aclient:
            astream = (aclient.events if events else aclient.stream)(url, **kwargs)
            items: list[Any] = []
            async with astream:
                async for item in astream:
                    items.append(item)
                    on_item(item)
                    if len(items) >= limit:
                        break
            return items

    try:
        result: list[Any] = asyncio.run(asyncio.wait_for(consume_async(), WITHIN))
    except TimeoutError:
        raise AssertionError(f"the stream did not end within {WITHIN} s") from None
    return result


NUMBERED = [{"n": i} for i in range(1, 6)]
LINES = [{"n": i, "text": "x" * 100} for i in range(1, 6)]


def test_finite_sse_starlette_stream_with_ids_ends(peers: Uvicorn, kind: str) -> None:
    """A normal end with nothing left to resume ends the iteration: no replay, one request."""
    key = unique("finite")
    url = f"{peers.url}/sse-starlette/finite?count=5&key={key}"
    assert read_with(kind, url, limit=6) == NUMBERED
    assert len(peers.log(key)) == 1


def test_sse_starlette_events_carry_their_ids(peers: Uvicorn, kind: str) -> None:
    key = unique("ids")
    url = f"{peers.url}/sse-starlette/finite?count=5&key={key}"
    events = read_with(kind, url, events=True, limit=6)
    assert [(e.id, e.event, e.json()) for e in events] == [
        (str(i), "message", {"n": i}) for i in range(1, 6)
    ]
    assert len(peers.log(key)) == 1


def test_sse_starlette_cut_is_resumed_with_last_event_id(peers: Uvicorn, kind: str) -> None:
    """Cut after event 3: resumed once with ``Last-Event-ID: 3``, every event once, then the end."""
    key = unique("cut")
    url = f"{peers.url}/sse-starlette/resumable?count=6&cut_after=3&key={key}"
    assert read_with(kind, url, limit=7) == [{"n": i} for i in range(1, 7)]
    assert [entry["last_event_id"] for entry in peers.log(key)] == [None, "3"]


def test_sse_starlette_pings_are_skipped(peers: Uvicorn, kind: str) -> None:
    """sse-starlette's ``: ping`` comments (every 0.1 s here) between events are keep-alives."""
    url = f"{peers.url}/sse-starlette/plain?count=3&interval=0.5&ping=0.1"
    assert read_with(kind, url, limit=4) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_fastapi_sse_with_ids_ends(peers: Uvicorn, kind: str) -> None:
    key = unique("fastapi-sse")
    url = f"{peers.url}/fastapi/sse?count=5&key={key}"
    assert read_with(kind, url, limit=6) == NUMBERED
    assert len(peers.log(key)) == 1


@pytest.mark.parametrize("path", ["/fastapi/jsonl", "/fastapi/ndjson"], ids=["jsonl", "ndjson"])
def test_fastapi_json_lines(peers: Uvicorn, kind: str, path: str) -> None:
    """FastAPI's own JSON Lines (``application/jsonl``) and a ``StreamingResponse`` of NDJSON."""
    assert read_with(kind, f"{peers.url}{path}?count=5", limit=6) == LINES


@pytest.mark.parametrize("hold", [0, 1], ids=["closed-after-done", "held-after-done"])
def test_openai_style_stream_ends_at_done(peers: Uvicorn, kind: str, hold: int) -> None:
    """``data: [DONE]`` ends ``stream()`` without an error, even when the body stays open."""
    url = f"{peers.url}/openai/chat?count=4&hold={hold}"
    assert read_with(kind, url, limit=10) == chat_chunks(4)


@pytest.mark.parametrize(
    "path", ["/gz/fastapi/jsonl", "/gz/fastapi/ndjson"], ids=["jsonl", "ndjson"]
)
def test_gzip_from_starlette_middleware(peers: Uvicorn, kind: str, path: str) -> None:
    url = f"{peers.url}{path}?count=50"
    with requests.get(url, stream=True, timeout=TIMEOUT) as probe:
        assert probe.headers.get("Content-Encoding") == "gzip"  # so the clients decode gzip
    expected = [{"n": i, "text": "x" * 100} for i in range(1, 51)]
    assert read_with(kind, url, limit=51) == expected


# -- the captured bytes, replayed byte by byte -------------------------------------------------


@dataclass(frozen=True)
class Capture:
    """A body captured from a third-party server, split into its events."""

    name: str
    content_type: str
    events: tuple[bytes, ...]
    expected: tuple[Any, ...]

    @property
    def sse(self) -> bool:
        return self.content_type.startswith(SSE)


def _fetch(url: str) -> tuple[str, bytes]:
    """Content-Type and body of ``url`` (http.client takes the chunked coding off)."""
    host, _, rest = url.removeprefix("http://").partition("/")
    conn = http.client.HTTPConnection(host, timeout=TIMEOUT[1])
    try:
        conn.request("GET", "/" + rest)
        resp = conn.getresponse()
        assert resp.status == 200
        return resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def _split(body: bytes, sse: bool) -> tuple[bytes, ...]:
    """The body's events, each with its own line ends (SSE: up to its blank line)."""
    if not sse:
        return tuple(line + b"\n" for line in body.split(b"\n") if line)
    sep = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
    return tuple(part + sep for part in body.split(sep) if part)


@pytest.fixture(scope="module")
def captures(peers: Uvicorn) -> dict[str, Capture]:
    """sse-starlette with ids (CRLF), the OpenAI-style stream, and FastAPI's JSON Lines."""
    sources = {
        "sse-starlette": ("/sse-starlette/finite?count=5", NUMBERED),
        "openai": ("/openai/chat?count=4", chat_chunks(4)),
        "fastapi-jsonl": ("/fastapi/jsonl?count=5", LINES),
    }
    out: dict[str, Capture] = {}
    for name, (path, expected) in sources.items():
        content_type, body = _fetch(peers.url + path)
        events = _split(body, content_type.startswith(SSE))
        out[name] = Capture(name, content_type, events, tuple(expected))
    return out


def _lf(event: bytes) -> bytes:
    return event.replace(b"\r\n", b"\n")


#: line-end rewrites; bare CR is an SSE line end only (JSON Lines has none)
LINE_ENDS: dict[str, Callable[[bytes], bytes]] = {
    "crlf": lambda event: _lf(event).replace(b"\n", b"\r\n"),
    "cr": lambda event: _lf(event).replace(b"\n", b"\r"),
}


def _gzip_pieces(events: list[bytes]) -> list[bytes]:
    """Each event gzip-compressed and flushed on its own, as a streaming gzip encoder sends."""
    encoder = zlib.compressobj(wbits=31)
    pieces = [encoder.compress(event) + encoder.flush(zlib.Z_SYNC_FLUSH) for event in events]
    pieces[-1] += encoder.flush()
    return pieces


def script_for(
    capture: Capture, variant: str, events: tuple[bytes, ...], end: list[Any] | None = None
) -> Script:
    """The scripted response playing ``events`` in ``variant``, then the pieces of ``end``."""
    body: list[Any]
    headers: list[tuple[str, str]] = []
    framing: Any = "chunked"
    if variant == "gzip":
        body = _gzip_pieces(list(events))
        headers.append(("Content-Encoding", "gzip"))
    elif variant == "one-byte-chunks":
        body = [bytes([b]) for event in events for b in event]
    elif variant == "close-delimited":
        body = list(events)
        framing = "close"
    else:
        body = [LINE_ENDS[variant](event) for event in events]
    if end is not None:
        body.extend(end)
    return Script(body, content_type=capture.content_type, framing=framing, headers=headers)


VARIANTS = ["crlf", "cr", "gzip", "one-byte-chunks", "close-delimited"]


def _variant_params() -> list[Any]:
    params = []
    for name in ["sse-starlette", "openai", "fastapi-jsonl"]:
        for variant in VARIANTS:
            if variant == "cr" and name == "fastapi-jsonl":
                continue
            params.append(pytest.param(name, variant, id=f"{name}-{variant}"))
    return params


@pytest.mark.parametrize(("capture_name", "variant"), _variant_params())
def test_captured_stream_in_every_variant(
    captures: dict[str, Capture], kind: str, capture_name: str, variant: str
) -> None:
    """The same values from the same bytes however they are framed, coded or cut up; one request."""
    capture = captures[capture_name]
    with RawServer([script_for(capture, variant, capture.events)]) as server:
        values = read_with(kind, server.url + "/stream", limit=len(capture.expected) + 1)
        assert values == list(capture.expected)
        assert len(server.requests) == 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_captured_ids_in_every_variant(
    captures: dict[str, Capture], kind: str, variant: str
) -> None:
    """sse-starlette's ids survive every framing and line end (no stray CR in an id)."""
    capture = captures["sse-starlette"]
    with RawServer([script_for(capture, variant, capture.events)]) as server:
        events = read_with(kind, server.url + "/stream", events=True, limit=6)
        assert [(e.id, e.json()) for e in events] == [(str(i), {"n": i}) for i in range(1, 6)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_captured_cut_is_resumed_in_every_variant(
    captures: dict[str, Capture], kind: str, variant: str
) -> None:
    """sse-starlette's bytes cut (RST) after event 3, then the rest: every event once.

    The cut waits until event 3 was delivered: a reset discards what the client's kernel holds
    unread, which would make the test about the kernel, not the client.
    """
    capture = captures["sse-starlette"]
    delivered = threading.Event()
    first = script_for(capture, variant, capture.events[:3], end=[Wait(delivered), Cut()])
    second = script_for(capture, variant, capture.events[3:])

    def on_item(item: Any) -> None:
        if item == {"n": 3}:
            delivered.set()

    with RawServer([first, second]) as server:
        assert read_with(kind, server.url + "/stream", limit=6, on_item=on_item) == NUMBERED
        assert len(server.requests) == 2
        assert server.requests[1].headers.get("last-event-id") == "3"
