"""Hypothesis-driven requests against every endpoint of the real service.

Whatever the query string, headers, body, name or Last-Event-ID: never a 5xx, a JSON error
body on every 4xx, and the service still answers ``/healthz`` afterwards.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.service import Service

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)

SENT = {"requests": 0}

numbers = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "0", "1", "0.0", "1e3", "0x10", " 1", "1 ", "+1", "--1", "٣", "1_0"]),
    st.text(max_size=12),
)
param_names = st.sampled_from(
    ["count", "interval", "size", "fail_after", "format", "last_event_id", "event", "x"]
)
queries = st.dictionaries(param_names, numbers, max_size=5)
header_values = st.one_of(
    # requests refuses to send values with leading or trailing white space.
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
        str.strip
    ),
    st.sampled_from(
        [
            "text/event-stream",
            "application/json-seq",
            "application/x-ndjson",
            "*/*",
            "text/html",
            "application/json;q=0",
            "0-0",
            "1700000000000-0",
            "99999999999999999999-99999999999999999999",
        ]
    ),
)
headers = st.dictionaries(
    st.sampled_from(["Accept", "Last-Event-ID", "Content-Type", "Authorization"]),
    header_values,
    max_size=4,
)
names = st.one_of(
    st.text(max_size=140),
    st.sampled_from([".", "..", "a" * 128, "a" * 129, "ok", "a:b", "a/b", "%2e%2e", "é"]),
)
bodies = st.one_of(
    st.binary(max_size=300),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=8), children, max_size=4)
        ),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
)


def check(resp: requests.Response) -> None:
    SENT["requests"] += 1
    assert resp.status_code < 500 or resp.status_code == 503, (resp.status_code, resp.text[:300])
    if 400 <= resp.status_code < 500:
        assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
        error = resp.json()["error"]
        assert isinstance(error["code"], str) and isinstance(error["message"], str)


def send(service: Service, method: str, path: str, **kwargs: Any) -> None:
    # Streams may last for ever: look at the status and headers, then leave.
    with requests.request(method, service.url + path, stream=True, timeout=10, **kwargs) as resp:
        check(resp)
        if 400 <= resp.status_code < 500:
            resp.content  # noqa: B018 - read the JSON error body


@FUZZ
@given(query=queries, hdrs=headers)
def test_events(service: Service, query: dict[str, str], hdrs: dict[str, str]) -> None:
    send(service, "GET", "/events?" + urllib.parse.urlencode(query), headers=hdrs)


@FUZZ
@given(name=names, query=queries, hdrs=headers)
def test_channel_subscribe(
    service: Service, name: str, query: dict[str, str], hdrs: dict[str, str]
) -> None:
    path = "/channels/" + urllib.parse.quote(name, safe="") + "?" + urllib.parse.urlencode(query)
    send(service, "GET", path, headers=hdrs)


@FUZZ
@given(name=names, query=queries, hdrs=headers, body=bodies)
def test_channel_publish(
    service: Service, name: str, query: dict[str, str], hdrs: dict[str, str], body: bytes
) -> None:
    path = "/channels/" + urllib.parse.quote(name, safe="") + "?" + urllib.parse.urlencode(query)
    send(service, "POST", path, headers=hdrs, data=body)


@FUZZ
@given(hdrs=headers, body=bodies)
def test_jobs_start(service: Service, hdrs: dict[str, str], body: bytes) -> None:
    send(service, "POST", "/jobs", headers=hdrs, data=body)


@FUZZ
@given(job=st.one_of(st.text(max_size=40), st.just("0" * 32)), query=queries, hdrs=headers)
def test_job_events(
    service: Service, job: str, query: dict[str, str], hdrs: dict[str, str]
) -> None:
    path = "/jobs/" + urllib.parse.quote(job, safe="") + "/events?" + urllib.parse.urlencode(query)
    send(service, "GET", path, headers=hdrs)


def test_resume_a_real_job_with_fuzzed_ids(service: Service) -> None:
    job = requests.post(service.url + "/jobs", json={"count": 3, "interval": 0}, timeout=5).json()

    @FUZZ
    @given(last=header_values)
    def inner(last: str) -> None:
        send(service, "GET", job["events_url"], headers={"Last-Event-ID": last})

    inner()


def test_still_healthy_after_fuzzing(service: Service) -> None:
    # Runs after the fuzzers of this module (pytest keeps file order).
    resp = requests.get(service.url + "/healthz", timeout=5)
    assert resp.status_code == 200 and resp.json()["status"] == "ok"
    assert "Traceback" not in service.log(), service.log()[-3000:]
    print(f"fuzzed requests sent: {SENT['requests']}")
