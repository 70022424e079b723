"""The page at ``GET /`` as a newcomer meets it: a stream on load, on a phone and on a desktop.

Debian's Chromium through Playwright, as in ``tests/test_page.py`` (whose browser fixture this
module shares), against the real service. Set ``STREAM_SCREENSHOTS=<dir>`` to keep screenshots.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.service import Service
from tests.test_page import WAIT_MS, browser, screenshot

__all__ = ["browser"]  # the fixture, shared with tests/test_page.py

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PHONE = 390
DESKTOP = 1280


@pytest.fixture(params=[PHONE, DESKTOP], ids=["phone", "desktop"])
def page(request: pytest.FixtureRequest, browser: Browser, service: Service) -> Iterator[Page]:
    width = int(request.param)
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(service.url + "/")
    yield page
    context.close()


#: elements whose content is wider than their box (clipped, or scrolled sideways)
OVERFLOWING = """() => {
    const out = [];
    if (document.documentElement.scrollWidth > window.innerWidth) out.push("page");
    const boxes = document.querySelectorAll("main > section, ol.log, ol.log li, ol.log span");
    for (const el of boxes) {
      if (el.scrollWidth > el.clientWidth + 1) out.push(el.id || el.className || el.tagName);
    }
    return out;
}"""


def _overflowing(page: Page) -> list[str]:
    return list(page.evaluate(OVERFLOWING))


def test_the_page_follows_events_on_load(page: Page) -> None:
    # No click: the stream starts with the page, with the form's values.
    expect(page.locator("#events-log li[data-kind=event]").first).to_be_visible()
    expect(page.locator("#events-status")).to_have_text(re.compile("streaming|done"))
    first = page.locator("#events-log li[data-kind=event] .data").first.text_content()
    assert first == '{"event_id":0,"data":"some data","is_last_event":false}'


def test_long_data_wraps_within_the_width(page: Page) -> None:
    page.fill("#events-count", "3")
    page.fill("#events-interval", "0")
    page.fill("#events-size", "2000")
    page.click("#events-start")
    expect(page.locator("#events-status")).to_have_text("done")
    expect(page.locator("#events-log li[data-kind=event]")).to_have_count(3)
    assert _overflowing(page) == []
    # every character of the value is in the row (wrapped over lines, not cut)
    texts = page.locator("#events-log li[data-kind=event] .data").all_text_contents()
    assert all(len(t) > 2000 for t in texts)
    row = page.locator("#events-log li[data-kind=event] .data").last
    box = row.bounding_box()
    assert box is not None and box["height"] > 3 * 16  # several lines
    screenshot(page, f"page-long-data-{page.viewport_size['width'] if page.viewport_size else 0}")


def test_every_section_fits_the_width(page: Page) -> None:
    width = page.viewport_size["width"] if page.viewport_size else 0
    for section in page.locator("main > section").all():
        box = section.bounding_box()
        assert box is not None
        assert box["x"] >= 0 and box["x"] + box["width"] <= width
    assert _overflowing(page) == []
