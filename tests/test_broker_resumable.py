"""A user's own streams, resumable across machines with ``stream.broker`` (its docstring's example).

Two gunicorn services with gevent workers (two "machines") run ``tests/resumable_app.py`` on
one real redis-server: a reader starts on one, drops its connection, and resumes on the other
with ``Last-Event-ID``; it gets every token once, in order, then the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import requests

from stream import Client
from tests.service import Service

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

APP = "tests.resumable_app:app"


def test_a_stream_started_on_one_machine_resumes_on_another(
    start_service: Callable[..., Service], redis_url: str
) -> None:
    env = {"REDIS_URL": redis_url, "WEB_CONCURRENCY": "1"}
    one = start_service(env, app=APP)
    two = start_service(env, app=APP)
    key = uuid.uuid4().hex
    answer = requests.post(f"{one.url}/answers/{key}?count=60&interval=0.01", timeout=10)
    assert answer.status_code == 202
    path = answer.json()["events_url"]

    with Client(one.url, timeout=(5, 10)) as client:
        with client.stream(path) as first:
            seen = []
            for value in first:
                seen.append(value)
                if len(seen) == 20:
                    break
            last_id = first.last_event_id
    assert seen == list(range(20))
    assert last_id

    with Client(two.url, timeout=(5, 10)) as client:
        rest = list(client.stream(path, last_event_id=last_id))
    assert seen + rest == list(range(60))


def test_a_last_event_id_that_is_no_stream_id_is_a_json_400(
    start_service: Callable[..., Service], redis_url: str
) -> None:
    svc = start_service({"REDIS_URL": redis_url, "WEB_CONCURRENCY": "1"}, app=APP)
    answer = requests.get(
        f"{svc.url}/answers/x/events", headers={"Last-Event-ID": "not-an-id"}, timeout=10
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "bad_last_event_id"
