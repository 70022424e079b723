"""What only the requests client does (the shared behaviour is tested in ``test_clients.py``).

Closing from another thread (a blocked read cannot be cancelled, so ``close()`` wakes it), the
generator closed by dropping it after ``break`` (CPython's reference counting), and a session
passed in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import requests

from stream import errors
from stream.client import Client, DeadlineAdapter
from tests.rawserver import Hold, RawServer, Script
from tests.test_clients import script, value

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def fast() -> Iterator[Client]:
    """A client with a short read timeout and near-instant backoff."""
    with Client(timeout=(2.0, 5.0), backoff_initial=0.01, backoff_max=0.05) as client:
        yield client


def test_close_from_another_thread_ends_a_blocked_read(fast: Client) -> None:
    with RawServer([script("ndjson", value("ndjson", 1), Hold())]) as server:
        stream = fast.stream(server.url)
        items = iter(stream)
        assert next(items) == 1
        threading.Timer(0.1, stream.close).start()
        assert list(items) == []
        assert server.connections[0].client_closed.wait(5)


def test_breaking_out_of_the_loop_closes_the_connection(fast: Client) -> None:
    with RawServer([script("ndjson", value("ndjson", 1), Hold())]) as server:
        for item in fast.stream(server.url):
            assert item == 1
            break
        assert server.connections[0].client_closed.wait(5)


def test_session_is_shared_and_left_open() -> None:
    import requests

    session = requests.Session()
    with RawServer([script("ndjson", value("ndjson", 1))]) as server:
        with Client(server.url, session=session) as client:
            assert list(client.stream("/")) == [1]
        assert session.adapters  # still usable: the client did not close a session it was given
    session.close()


def test_deadline_adapter_bounds_the_headers_on_a_session_passed_in() -> None:
    session = requests.Session()
    session.mount("http://", DeadlineAdapter())
    slow = Script([b"1\n"], trickle_headers=0.05)
    with RawServer([slow]) as server, session:
        client = Client(server.url, session=session, timeout=(2.0, 0.5))
        started = time.monotonic()
        with pytest.raises(errors.StreamTimeout):
            list(client.stream("/events"))
        assert time.monotonic() - started < 3.0  # the headers alone would take 5 s
