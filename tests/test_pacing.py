"""The pacing state machine in-process: no gunicorn, no gevent, no sockets, no clock."""

from __future__ import annotations

import pytest

from stream.encoders import encoder_for
from stream.formats import NDJSON, SSE
from stream.pacing import BURST, FIRST_BYTES_WAIT, SLOW_DRAINS, Pacer, State, Transport

PLAIN = Transport(framing="chunked", has_socket=True)


def pacer(media_type: str = SSE, heartbeat: float = 10.0) -> Pacer:
    return Pacer(encoder_for(media_type), heartbeat)


@pytest.mark.parametrize(
    ("transport", "gevent", "state"),
    [
        pytest.param(PLAIN, True, State.INLINE, id="plain-http11-inline"),
        pytest.param(Transport("close", has_socket=True), True, State.INLINE, id="http10-inline"),
        pytest.param(
            Transport("chunked", tls=True, has_socket=True), True, State.PRODUCER, id="tls"
        ),
        pytest.param(Transport(None, has_socket=True), True, State.PRODUCER, id="uwsgi"),
        pytest.param(
            Transport(None, multiplexed=True, has_socket=True), True, State.PRODUCER, id="h2"
        ),
        pytest.param(Transport("chunked"), True, State.PRODUCER, id="no-socket"),
        pytest.param(PLAIN, False, State.THREAD, id="threads"),
    ],
)
def test_start_writes_around_the_server_only_where_proven_safe(
    transport: Transport, gevent: bool, state: State
) -> None:
    p = pacer()
    assert p.start(transport, gevent=gevent, now=0.0) is state
    if gevent:
        assert transport.raw_writes is (state is State.INLINE)


def test_peer_watch_is_off_only_on_a_multiplexed_connection() -> None:
    assert Transport("chunked", tls=True, has_socket=True).watch_peer
    assert Transport(None, has_socket=True).watch_peer
    assert not Transport(None, multiplexed=True, has_socket=True).watch_peer
    assert not Transport("chunked").watch_peer


def test_keepalives_first_bytes_then_every_heartbeat() -> None:
    p = pacer(NDJSON, heartbeat=10.0)
    p.start(PLAIN, gevent=True, now=100.0)
    assert p.keepalive_in(100.0) == pytest.approx(FIRST_BYTES_WAIT)
    assert p.keepalive(100.005) == b" "  # nothing came: the first bytes are a keep-alive
    assert p.keepalive_in(100.005) == pytest.approx(10.0)
    p.wrote(105.0)  # a value
    assert p.keepalive_in(110.0) == pytest.approx(5.0)
    assert p.keepalive_in(115.0) <= 0


@pytest.mark.parametrize("waits", [[False] * BURST])
def test_a_burst_moves_inline_to_a_producer_and_slowness_brings_it_back(waits: list[bool]) -> None:
    p = pacer()
    p.start(PLAIN, gevent=True, now=0.0)
    assert not p.inline_value(waited=True)
    moved = [p.inline_value(waited=w) for w in waits]
    assert moved == [False] * (BURST - 1) + [True]
    assert p.state is State.PRODUCER
    # Drains of one value each, each waited for: after SLOW_DRAINS the producer is asked back.
    for events in range(1, SLOW_DRAINS + 1):
        assert not p.handback
        p.drained(events, waited=True, inline_capable=True)
    assert p.handback
    assert p.hand_back() and p.state is State.INLINE and not p.handback


def test_a_batch_or_an_unwaited_drain_resets_the_slow_count() -> None:
    p = pacer()
    p.start(Transport(None, has_socket=True), gevent=True, now=0.0)
    p.drained(1, waited=True, inline_capable=True)
    p.drained(50, waited=True, inline_capable=True)  # a batch: fast again
    p.drained(51, waited=True, inline_capable=True)
    p.drained(52, waited=False, inline_capable=True)
    p.drained(53, waited=True, inline_capable=True)
    assert not p.handback
    for events in range(54, 60):
        p.drained(events, waited=True, inline_capable=False)  # started as a producer: stays
    assert not p.handback


@pytest.mark.parametrize(
    ("stop", "reason", "tail"),
    [
        ("finish", "end", b""),
        ("fail", "error", b'event: error\ndata: {"error":{"code":"boom","message":"m"}}\n\n'),
        ("peer_left", "disconnect", b""),
        ("write_failed", "disconnect", b""),
        ("shut_down", "shutdown", b"retry: 4000\n\n"),
    ],
)
def test_every_stop_ends_with_its_reason_and_tail(stop: str, reason: str, tail: bytes) -> None:
    p = pacer(SSE)
    p.start(PLAIN, gevent=True, now=0.0)
    args = {"fail": ("boom", "m"), "shut_down": (4000,)}.get(stop, ())
    assert getattr(p, stop)(*args)
    assert p.state is State.ENDING and p.stopping
    assert p.tail() == tail and p.tail() == b""
    # The first reason stands: a later stop changes nothing and says so.
    assert not p.shut_down(1) and not p.peer_left() and not p.fail("x", "y")
    assert p.tail() == b""
    assert p.close() == reason and p.state is State.CLOSED


def test_stopped_before_it_started_sends_only_its_tail() -> None:
    p = pacer(SSE)
    assert p.shut_down(3000)
    assert p.start(PLAIN, gevent=True, now=0.0) is State.ENDING
    assert p.tail() == b"retry: 3000\n\n"
    assert p.close() == "shutdown"


@pytest.mark.parametrize("started", [False, True])
def test_closed_while_running_is_a_disconnect(started: bool) -> None:
    p = pacer()
    if started:
        p.start(PLAIN, gevent=True, now=0.0)
    assert p.close() == "disconnect"
    assert not p.hand_back() and not p.inline_value(waited=False)


def test_a_hand_back_that_loses_the_race_with_a_stop_is_refused() -> None:
    p = pacer()
    p.start(PLAIN, gevent=True, now=0.0)
    for _ in range(BURST):
        p.inline_value(waited=False)
    assert p.state is State.PRODUCER
    p.peer_left()
    assert not p.hand_back()
    assert p.state is State.ENDING and p.reason == "disconnect"


def test_pacing_imports_no_io() -> None:
    import subprocess
    import sys

    code = (
        "import sys, stream.pacing; "
        "bad = {'gevent', 'flask', 'socket', 'select', 'threading'} & set(sys.modules); "
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[]", out.stderr
