"""End to end: the page at ``GET /`` in a real Chromium, against the real gunicorn+gevent service.

The browser is Debian's Chromium (``/usr/bin/chromium``) driven by Playwright's sync API; nothing
is downloaded. Every wait is a bounded Playwright ``expect``/``wait_for_function`` or the
fixtures' ``wait_for``, never a fixed sleep. Set ``STREAM_SCREENSHOTS=<dir>`` to keep screenshots
of the page for a look by eye.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.service import Service, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SEED = ["some data", "some more data", "and more", "finally the end"]
#: how long a Playwright expectation waits by default (events come every 0.1 s or so)
WAIT_MS = 10_000


#: what Chromium's network stack logs (as a console error) for a connection refused
REFUSED = "Failed to load resource: net::ERR_CONNECTION_REFUSED"
#: ... and for a request the server answered with a 400
STATUS_400 = "Failed to load resource: the server responded with a status of 400 (BAD REQUEST)"


@dataclass
class Tab:
    """A page on the service, with what the browser reported while the test drove it."""

    page: Page
    origin: str
    #: console errors as (text, url of the source); uncaught exceptions as ("pageerror: ...", "")
    errors: list[tuple[str, str]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append((message.text, message.location.get("url", "")))

    def assert_clean(self, *, refused: str | None = None, answered_400: str | None = None) -> None:
        """No console errors or uncaught exceptions; nothing loaded from outside the service.

        ``refused``: a stream path whose reconnection attempts found the service down (a restart).
        ``answered_400``: the one request the test made the service refuse on purpose.
        """
        errors = self.errors
        if refused is not None:
            # While the service restarts, EventSource's own reconnection attempts find the port
            # closed, and Chromium logs each refused attempt as a console error of its network
            # stack (the page's script sees only the error event it handles). That is the
            # reconnection the test wants to see: only that exact message, for that stream, goes.
            errors = [e for e in errors if e != (REFUSED, self.origin + refused)]
        expected = [] if answered_400 is None else [(STATUS_400, self.origin + answered_400)]
        # A 400 the page shows as the server's JSON error is logged once by the network stack.
        assert errors == expected
        outside = [u for u in self.requests if not u.startswith(self.origin + "/")]
        assert outside == []


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium, launched once per module."""
    with sync_playwright() as pw:
        # launch() gives the browser a fresh temporary profile of its own (a persistent context
        # would need a user-data-dir; none is needed here) and removes it on close.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[[str], Tab]]:
    """Open the page of a service in a fresh browser context; closed at the test's end."""
    contexts = []

    def open_(url: str) -> Tab:
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        tab = Tab(page, url)
        page.on("console", tab.on_console)
        page.on("pageerror", lambda exc: tab.errors.append((f"pageerror: {exc}", "")))
        page.on("request", lambda req: tab.requests.append(req.url))
        response = page.goto(url + "/")
        assert response is not None and response.status == 200
        expect(page).to_have_title(re.compile("stream"))
        return tab

    yield open_
    for context in contexts:
        context.close()


def screenshot(page: Page, name: str) -> None:
    """Keep a screenshot when ``STREAM_SCREENSHOTS`` names a directory (for a look by eye)."""
    directory = os.environ.get("STREAM_SCREENSHOTS")
    if directory:
        page.screenshot(path=str(Path(directory) / f"{name}.png"), full_page=True)


def row_values(page: Page, log: str) -> list[object]:
    """The decoded data of a log's event rows, in page order."""
    texts = page.locator(f"#{log} li[data-kind=event] .data").all_text_contents()
    return [json.loads(t) for t in texts]


def row_seconds(page: Page, log: str) -> list[float]:
    """When each event row of a log arrived, in seconds since its stream started."""
    texts = page.locator(f"#{log} li[data-kind=event] .t").all_text_contents()
    return [float(t.strip("+s")) for t in texts]


def subscribe(page: Page, channel: str) -> None:
    page.fill("#channel-name", channel)
    page.click("#channel-subscribe")
    expect(page.locator("#channel-state")).to_have_text("open")


def publish(service: Service, channel: str, value: object) -> str:
    resp = requests.post(service.url_for(f"/channels/{channel}"), json=value, timeout=5)
    assert resp.status_code == 201, resp.text
    (event_id,) = resp.json()["ids"]
    return str(event_id)


# -- (a) GET /events over fetch() ----------------------------------------------------------------


def test_events_arrive_live_in_order(service: Service, open_page: Callable[[str], Tab]) -> None:
    tab = open_page(service.url)
    page = tab.page
    page.fill("#events-count", "5")
    page.fill("#events-interval", "0.1")
    page.click("#events-start")

    expect(page.locator("#events-log li[data-kind=event]")).to_have_count(5)
    expect(page.locator("#events-status")).to_have_text("done")
    assert row_values(page, "events-log") == [
        {"event_id": i, "data": SEED[i % 4], "is_last_event": i == 4} for i in range(5)
    ]
    expect(page.locator("#events-received")).to_have_text("5")
    # Shown as they arrived, about 0.1 s apart, not all at once when the body ended.
    seconds = row_seconds(page, "events-log")
    assert seconds[-1] - seconds[0] >= 0.3
    assert float(page.locator("#events-rate").text_content() or "0") > 0
    assert page.locator("#events-log li[data-kind=error]").count() == 0
    tab.assert_clean()


@pytest.mark.parametrize("fmt", ["ndjson", "json-seq", "sse"])
def test_events_keepalives_skipped_and_error_shown(
    service: Service, open_page: Callable[[str], Tab], fmt: str
) -> None:
    tab = open_page(service.url)
    page = tab.page
    # 1.2 s between events, above the service's 1 s heartbeat: a keep-alive comes in between
    # (an empty line, a ":" comment, a lone RS) and must not show up as an event.
    page.fill("#events-count", "4")
    page.fill("#events-interval", "1.2")
    page.fill("#events-fail-after", "2")
    page.select_option("#events-format", fmt)
    page.click("#events-start")

    expect(page.locator("#events-status")).to_have_text("error")
    assert [v["event_id"] for v in row_values(page, "events-log")] == [0, 1]  # type: ignore[index]
    expect(page.locator("#events-log li[data-kind=error]")).to_have_text(
        re.compile("failed_on_purpose: the stream failed after 2 events")
    )
    tab.assert_clean()


def test_events_bad_parameters_show_the_json_error(
    service: Service, open_page: Callable[[str], Tab]
) -> None:
    tab = open_page(service.url)
    page = tab.page
    # fail_after above count: the form lets it through, the service refuses it.
    page.fill("#events-count", "2")
    page.fill("#events-fail-after", "3")
    page.click("#events-start")
    expect(page.locator("#events-status")).to_have_text("error")
    expect(page.locator("#events-log li[data-kind=error]")).to_have_text(
        re.compile(r"400 bad_fail_after: fail_after must be")
    )
    tab.assert_clean(answered_400="/events?count=2&interval=0.2&size=0&fail_after=3&format=ndjson")


def test_stop_aborts_the_stream(service: Service, open_page: Callable[[str], Tab]) -> None:
    tab = open_page(service.url)
    page = tab.page
    page.fill("#events-count", "1000")
    page.fill("#events-interval", "0.05")
    page.click("#events-start")
    expect(page.locator("#events-log li[data-kind=event]").first).to_be_visible()
    page.click("#events-stop")
    expect(page.locator("#events-status")).to_have_text("stopped")
    assert page.locator("#events-log li[data-kind=event]").count() < 1000
    tab.assert_clean()


# -- (b) publishing from the page arrives in the EventSource view -------------------------------


def test_publish_from_the_page_arrives_in_the_channel(
    service: Service, open_page: Callable[[str], Tab]
) -> None:
    tab = open_page(service.url)
    page = tab.page
    subscribe(page, "page-publish")

    page.fill("#publish-body", '{"hello": "from the page", "markup": "<b>not bold</b>"}')
    page.click("#publish-button")
    result = page.locator("#publish-result")
    expect(result).to_have_text(re.compile(r"^201 published, ids: \S+$"))
    event_id = (result.text_content() or "").rsplit(" ", 1)[1]

    row = page.locator("#channel-log li[data-kind=event]")
    expect(row).to_have_count(1)
    expect(row).to_have_attribute("data-id", event_id)
    expect(row).to_have_attribute("data-type", "message")
    assert row_values(page, "channel-log") == [
        {"hello": "from the page", "markup": "<b>not bold</b>"}
    ]
    # Server text is shown as text: the markup was not parsed into an element.
    assert page.locator("#channel-log b").count() == 0
    expect(page.locator("#channel-last-id")).to_have_text(event_id)

    # A custom event type arrives when the page listens to it.
    page.click("#channel-unsubscribe")
    page.fill("#channel-types", "alert")
    subscribe(page, "page-publish")
    page.fill("#publish-event", "alert")
    page.fill("#publish-body", "[1, 2]")
    page.click("#publish-button")
    row = page.locator("#channel-log li[data-kind=event]")
    expect(row).to_have_attribute("data-type", "alert")
    assert row_values(page, "channel-log") == [[1, 2]]
    tab.assert_clean()


def test_publish_shows_the_json_error(service: Service, open_page: Callable[[str], Tab]) -> None:
    tab = open_page(service.url)
    page = tab.page
    page.fill("#channel-name", "page-errors")
    page.fill("#publish-body", "{not json")
    page.click("#publish-button")
    result = page.locator("#publish-result")
    expect(result).to_have_text(re.compile(r"^400 bad_json: "))
    expect(result).to_have_attribute("data-ok", "false")
    tab.assert_clean(answered_400="/channels/page-errors")


# -- (c) a server restart is survived without missing events ------------------------------------


def test_channel_survives_a_server_restart(
    start_service: Callable[..., Service], open_page: Callable[[str], Tab]
) -> None:
    first = start_service()
    tab = open_page(first.url)
    page = tab.page
    rows = page.locator("#channel-log li[data-kind=event]")
    subscribe(page, "restart")

    ids = [publish(first, "restart", {"n": n}) for n in range(3)]
    expect(rows).to_have_count(3)
    expect(page.locator("#channel-last-id")).to_have_text(ids[-1])

    first.stop()  # SIGTERM: the stream ends with a retry: hint, EventSource comes back by itself
    expect(page.locator("#channel-state")).to_have_text("reconnecting")
    second = start_service(port=first.port)
    # The in-process broker forgets everything on restart: publish only once the page's stream
    # is open on the new service. The page alone cannot tell: while the old worker shuts down it
    # may still take one reconnection, answer 200 and end it at once with another retry: hint.
    wait_for(lambda: requests.get(second.url_for("/healthz"), timeout=2).json()["open_streams"])
    expect(page.locator("#channel-state")).to_have_text("open")
    expect(page.locator("#channel-reconnects")).not_to_have_text("0")
    resumed = page.locator("#channel-log li[data-kind=info]", has_text="reconnected").last
    expect(resumed).to_have_text(re.compile(f"resumed after id {re.escape(ids[-1])}$"))

    for n in range(3, 6):
        publish(second, "restart", {"n": n})
    expect(rows).to_have_count(6)
    assert row_values(page, "channel-log") == [{"n": n} for n in range(6)]
    screenshot(page, "restart")
    tab.assert_clean(refused="/channels/restart?format=sse")


# -- (d) a job, followed to its end -------------------------------------------------------------

#: Records every EventSource the page makes, so the test can see that the page closed it.
TRACK_EVENT_SOURCES = """
(() => {
  const Original = window.EventSource;
  window.__sources = [];
  window.EventSource = class extends Original {
    constructor(...args) { super(...args); window.__sources.push(this); }
  };
})();
"""


def test_job_is_followed_to_its_end(service: Service, open_page: Callable[[str], Tab]) -> None:
    tab = open_page(service.url)
    page = tab.page
    page.add_init_script(TRACK_EVENT_SOURCES)
    page.reload()
    page.fill("#job-count", "6")
    page.fill("#job-interval", "0.05")
    page.fill("#job-size", "20")
    page.click("#job-start")

    expect(page.locator("#job-state")).to_have_text("done")
    assert row_values(page, "job-log") == [
        {"event_id": i, "data": (SEED[i % 4] + " " + "." * 20)[:20], "is_last_event": i == 5}
        for i in range(6)
    ]
    expect(page.locator("#job-log li[data-kind=end]")).to_have_count(1)
    expect(page.locator("#job-received")).to_have_text("6")
    expect(page.locator("#job-id")).to_have_text(re.compile("^[0-9a-f]{32}$"))
    ids = page.locator("#job-log li[data-kind=event]").evaluate_all(
        "rows => rows.map(r => r.dataset.id)"
    )
    assert all(ids) and len(set(ids)) == 6
    # After event: end the page closed its EventSource: the browser will not reconnect (an
    # EventSource left open would go back to CONNECTING once the server ends the body).
    page.wait_for_function(
        "window.__sources.length === 1 && window.__sources[0].readyState === EventSource.CLOSED"
    )
    expect(page.locator("#job-reconnects")).to_have_text("0")
    screenshot(page, "job")
    tab.assert_clean()


def test_job_error_event_is_shown(service: Service, open_page: Callable[[str], Tab]) -> None:
    """``event: error`` on a job's stream is shown as an error, and the page stops following.

    The service sends it only when a shutdown interrupts a job, racing with the end of the
    stream; the browser is given that stream directly, so the page's handling is tested exactly.
    """
    tab = open_page(service.url)
    page = tab.page
    page.add_init_script(TRACK_EVENT_SOURCES)
    page.reload()
    body = (
        'id: 1-0\ndata: {"event_id":0,"data":"some data","is_last_event":false}\n\n'
        ":\n\n"
        "id: 2-0\nevent: error\n"
        'data: {"error":{"code":"interrupted","message":"the server stopped this job"}}\n\n'
    )
    page.route(
        "**/jobs/*/events",
        lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=body
        ),
    )
    page.fill("#job-count", "100")
    page.click("#job-start")

    expect(page.locator("#job-state")).to_have_text("error")
    expect(page.locator("#job-log li[data-kind=error]")).to_have_text(
        re.compile("interrupted: the server stopped this job$")
    )
    assert row_values(page, "job-log") == [
        {"event_id": 0, "data": "some data", "is_last_event": False}
    ]
    page.wait_for_function("window.__sources[0].readyState === EventSource.CLOSED")
    tab.assert_clean()
