"""CORS: pages of other origins read streams and publish when ``STREAM_CORS_ORIGINS`` says so.

The unit tests use Flask's test client; the end-to-end test serves a page from a second port (a
tiny ``http.server`` on 127.0.0.1, another origin) in Debian's Chromium (driven by Playwright, as
in ``test_page.py``) and reads the real service (gunicorn + gevent) with ``fetch`` and
``EventSource``: allowed when the page's origin is configured, blocked when it is not.
"""

from __future__ import annotations

import functools
import http.server
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from playwright.sync_api import Browser, sync_playwright

from app import create_app
from stream import Client
from tests.service import Service

ORIGIN = "http://app.example:3000"


@pytest.fixture
def make_app() -> Iterator[Callable[[str | None], Flask]]:
    apps: list[Flask] = []

    def make(origins: str | None) -> Flask:
        app = create_app({"REDIS_URL": None, "STREAM_CORS_ORIGINS": origins})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["stream.broker"].close()


def preflight(app: Flask, path: str, origin: str, method: str = "POST") -> Any:
    return app.test_client().options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "content-type, last-event-id",
        },
    )


def test_no_cors_headers_unless_configured(make_app: Callable[[str | None], Flask]) -> None:
    app = make_app(None)
    resp = app.test_client().get("/events?count=1&interval=0", headers={"Origin": ORIGIN})
    assert resp.status_code == 200
    assert not [h for h in resp.headers if h[0].lower().startswith("access-control-")]
    assert "Origin" not in resp.vary
    resp = preflight(app, "/channels/news", ORIGIN)
    assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize(
    "path",
    ["/events?count=2&interval=0", "/events?count=2&interval=0&format=sse", "/healthz"],
)
def test_an_allowed_origin_reads(make_app: Callable[[str | None], Flask], path: str) -> None:
    app = make_app(f"https://other.example, {ORIGIN}/")
    resp = app.test_client().get(path, headers={"Origin": ORIGIN})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in resp.vary
    exposed = {h.strip() for h in resp.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"Retry-After", "Location", "WWW-Authenticate"} <= exposed


def test_an_allowed_origin_publishes_and_sees_errors(
    make_app: Callable[[str | None], Flask],
) -> None:
    app = make_app(ORIGIN)
    client = app.test_client()
    resp = preflight(app, "/channels/news", ORIGIN)
    assert resp.status_code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    methods = {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")}
    assert methods == {"GET", "POST", "HEAD", "OPTIONS"}
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"last-event-id", "authorization", "content-type", "accept"} <= allowed
    assert int(resp.headers["Access-Control-Max-Age"]) > 0
    assert resp.data == b""
    resp = client.post("/channels/news", json={"a": 1}, headers={"Origin": ORIGIN})
    assert resp.status_code == 201
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    # Errors carry the headers too, or the page could not read why it was refused.
    resp = client.post("/channels/b@d", json={"a": 1}, headers={"Origin": ORIGIN})
    assert resp.status_code == 400
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    resp = client.get("/jobs/" + "0" * 32 + "/events", headers={"Origin": ORIGIN})
    assert resp.status_code == 404
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN


@pytest.mark.parametrize("origin", ["https://evil.example", "http://app.example", "null"])
def test_other_origins_get_no_allowance(
    make_app: Callable[[str | None], Flask], origin: str
) -> None:
    app = make_app(ORIGIN)
    resp = app.test_client().get("/events?count=1&interval=0", headers={"Origin": origin})
    assert resp.status_code == 200  # the server answers; the browser keeps it from the page
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Origin" in resp.vary
    resp = preflight(app, "/channels/news", origin)
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert "Access-Control-Allow-Methods" not in resp.headers


def test_any_origin(make_app: Callable[[str | None], Flask]) -> None:
    app = make_app("*")
    for origin in (ORIGIN, "https://anywhere.example"):
        resp = app.test_client().get("/healthz", headers={"Origin": origin})
        assert resp.headers["Access-Control-Allow-Origin"] == origin
        assert "Origin" in resp.vary


def test_a_resume_after_the_end_gets_204_with_cors(
    make_app: Callable[[str | None], Flask],
) -> None:
    app = make_app(ORIGIN)
    client = app.test_client()
    job = client.post("/jobs", json={"count": 1, "interval": 0}).get_json()
    body = client.get(job["events_url"]).get_data()
    end_id = body.strip().split(b"\n")[-1].split(b'"')[3].decode()  # {"id":"...","event":"end"
    resp = client.get(job["events_url"], headers={"Origin": ORIGIN, "Last-Event-ID": end_id})
    assert resp.status_code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Content-Type" not in resp.headers


# -- end to end: a page on another origin, in Chromium ------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]

READ_NDJSON = """async (url) => {
  try {
    const resp = await fetch(url);
    const text = await resp.text();
    return {status: resp.status, lines: text.split("\\n").filter((l) => l.trim()).map(JSON.parse)};
  } catch (err) {
    return {error: err.name};
  }
}"""

PUBLISH = """async ([url, value]) => {
  try {
    const resp = await fetch(url, {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(value),
    });
    return {status: resp.status, body: await resp.json()};
  } catch (err) {
    return {error: err.name};
  }
}"""

# Resolves with what an EventSource saw: its messages and end events, and whether it closed for
# good (readyState CLOSED after an error: a CORS failure, or a 204 after the job's end).
EVENT_SOURCE = """([url, want]) => new Promise((resolve) => {
  const es = new EventSource(url);
  const got = [];
  const done = (how) => { es.close(); resolve({got, how}); };
  es.onmessage = (m) => { got.push(JSON.parse(m.data)); if (got.length === want) done("enough"); };
  es.addEventListener("end", (m) => { got.push({end: m.lastEventId}); });
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) done("closed"); };
  setTimeout(() => done("timeout"), 15000);
})"""


@pytest.fixture(scope="module")
def page_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A page served by a tiny static server on a port of its own: another origin."""
    root: Path = tmp_path_factory.mktemp("page")
    (root / "page.html").write_text("<!doctype html><title>other origin</title><p>page</p>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def published_between(url: str, channel: str) -> list[Any]:
    """Publish two markers around nothing and return what lies between (a check of nothing)."""
    first = requests.post(f"{url}/channels/{channel}", json="marker", timeout=5).json()["ids"][0]
    with Client(url, timeout=(5, 10)) as client:
        with client.events(f"/channels/{channel}", last_event_id=first) as s:
            requests.post(f"{url}/channels/{channel}", json="end-marker", timeout=5)
            seen = []
            for event in s:
                if event.json() == "end-marker":
                    return seen
                seen.append(event.json())
    raise AssertionError("the end marker never came")


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_page_on_another_origin_reads_and_publishes_only_when_allowed(
    browser: Browser, page_origin: str, start_service: Callable[..., Service]
) -> None:
    allowed = start_service({"STREAM_CORS_ORIGINS": page_origin})
    closed = start_service({"STREAM_CORS_ORIGINS": "http://127.0.0.1:1"})  # another origin only
    context = browser.new_context()
    try:
        page = context.new_page()
        statuses: list[tuple[str, int]] = []
        page.on("response", lambda r: statuses.append((r.url, r.status)))
        page.goto(page_origin + "/page.html")

        # fetch + NDJSON
        got = page.evaluate(READ_NDJSON, allowed.url + "/events?count=3&interval=0")
        assert got["status"] == 200
        assert [v["event_id"] for v in got["lines"]] == [0, 1, 2]
        got = page.evaluate(READ_NDJSON, closed.url + "/events?count=3&interval=0")
        assert got == {"error": "TypeError"}  # what fetch raises for a CORS refusal

        # EventSource
        got = page.evaluate(EVENT_SOURCE, [allowed.url + "/events?count=3&interval=0", 3])
        assert got["how"] == "enough"
        assert [v["event_id"] for v in got["got"]] == [0, 1, 2]
        got = page.evaluate(EVENT_SOURCE, [closed.url + "/events?count=3&interval=0", 3])
        assert got == {"got": [], "how": "closed"}

        # publishing: a JSON POST is preflighted
        channel = f"cors-{uuid.uuid4().hex[:8]}"
        got = page.evaluate(PUBLISH, [f"{allowed.url}/channels/{channel}", {"from": "page"}])
        assert got["status"] == 201 and len(got["body"]["ids"]) == 1
        got = page.evaluate(PUBLISH, [f"{closed.url}/channels/{channel}", {"from": "page"}])
        assert got == {"error": "TypeError"}
        assert published_between(closed.url, channel) == []  # the preflight stopped it

        # A job's EventSource: its events, its end, one resume answered 204, and it stops.
        job = requests.post(allowed.url + "/jobs", json={"count": 3, "interval": 0}, timeout=5)
        events_url = allowed.url + job.json()["events_url"]
        got = page.evaluate(EVENT_SOURCE, [events_url, 99])
        assert got["how"] == "closed"
        assert [v.get("event_id") for v in got["got"][:3]] == [0, 1, 2]
        assert "end" in got["got"][3]
        job_statuses = [status for url, status in statuses if url == events_url]
        assert job_statuses == [200, 204]
    finally:
        context.close()
