"""What only the httpx client does (the shared behaviour is tested in ``test_clients.py``).

Plain test functions that run their coroutine with ``asyncio.run``. Waiting on the raw server's
``threading.Event``s happens in a worker thread (``asyncio.to_thread``), bounded, so the loop
keeps running meanwhile (the connection closes inside it).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest

from stream import errors
from stream.aio import AsyncClient, _timeout, _translate
from tests.rawserver import Close, Hold, RawServer, Script, Wait
from tests.test_clients import envelope, script, value

pytestmark = pytest.mark.timeout(20)


def run(test: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(test())


async def closed(event: threading.Event) -> bool:
    """Wait (bounded) for the raw server to see the client close, without blocking the loop."""
    return await asyncio.to_thread(event.wait, 5)


def fast(url: str = "", **kwargs: Any) -> AsyncClient:
    return AsyncClient(url, timeout=(2.0, 5.0), backoff_initial=0.01, backoff_max=0.05, **kwargs)


def test_a_client_passed_in_is_used_and_left_open() -> None:
    async def test() -> None:
        with RawServer([script("ndjson", value("ndjson", 1))]) as server:
            async with httpx.AsyncClient(headers={"X-Mine": "1"}) as given:
                async with AsyncClient(server.url, client=given) as client:
                    assert client.client is given
                    assert [item async for item in client.stream("/")] == [1]
                assert not given.is_closed
            assert server.requests[0].headers["x-mine"] == "1"

    run(test)


def test_aclose_closes_the_client_it_made() -> None:
    async def test() -> None:
        client = AsyncClient("http://127.0.0.1:9")
        await client.aclose()
        assert client.client.is_closed

    run(test)


def test_aclose_ends_the_stream_and_closes_the_connection() -> None:
    async def test() -> None:
        with RawServer([script("ndjson", value("ndjson", 1), Hold())]) as server:
            async with fast(server.url) as client:
                stream = client.stream("/")
                assert await stream.__anext__() == 1
                await stream.aclose()
                assert stream.response is not None and stream.response.is_closed
                assert await closed(server.connections[0].client_closed)
                assert [item async for item in stream] == []

    run(test)


def test_cancelling_the_consuming_task_closes_the_connection() -> None:
    async def test() -> None:
        with RawServer([script("ndjson", value("ndjson", 1), Hold())]) as server:
            async with fast(server.url) as client:
                stream = client.stream("/")
                first = asyncio.Event()
                seen = []

                async def consume() -> None:
                    async for item in stream:
                        seen.append(item)
                        first.set()

                task = asyncio.create_task(consume())
                await first.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert seen == [1]
                assert stream.response is not None and stream.response.is_closed
                assert await closed(server.connections[0].client_closed)
                assert [item async for item in stream] == []

    run(test)


def test_a_timeout_around_the_loop_closes_the_connection() -> None:
    async def test() -> None:
        with RawServer([script("ndjson", value("ndjson", 1), Hold())]) as server:
            async with fast(server.url) as client:
                seen = []
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.2), client.stream("/") as stream:
                        async for item in stream:
                            seen.append(item)
                assert seen == [1]
                assert await closed(server.connections[0].client_closed)

    run(test)


def test_aclose_from_another_task_ends_a_blocked_read() -> None:
    async def test() -> None:
        with RawServer([script("ndjson", value("ndjson", 1), Hold())]) as server:
            async with fast(server.url) as client:
                stream = client.stream("/")
                assert await stream.__anext__() == 1
                reader = asyncio.create_task(anext(stream, None))
                await asyncio.sleep(0)  # one turn of the loop: the reader blocks in its read
                await stream.aclose()
                assert await asyncio.wait_for(reader, 5) is None
                assert await closed(server.connections[0].client_closed)

    run(test)


def test_breaking_out_of_the_loop_closes_the_connection() -> None:
    async def test() -> None:
        with RawServer([script("ndjson", value("ndjson", 1), Hold())]) as server:
            async with fast(server.url) as client:
                async for item in client.stream("/"):
                    assert item == 1
                    break
                # The dropped generator is closed by asyncio's finalizer, in the running loop.
                gc.collect()
                assert await closed(server.connections[0].client_closed)

    run(test)


def test_events_with_resume_across_the_loop() -> None:
    go = threading.Event()
    # The service's hint before ending a stream it did not finish makes the client resume.
    first = script("sse", envelope("sse", "1", 1), Wait(go), b"retry: 10\n\n", framing="close")
    second = script("sse", envelope("sse", "2", 2), b"event: end\ndata: null\n\n")

    async def test() -> None:
        with RawServer([first, second]) as server:
            async with fast(server.url) as client:
                ids = []
                async for event in client.events("/channels/c"):
                    ids.append(event.id)
                    go.set()
                assert ids == ["1", "2"]
                assert server.requests[1].headers["last-event-id"] == "1"

    run(test)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        pytest.param(httpx.ConnectTimeout("slow"), errors.StreamTimeout, id="connect-timeout"),
        pytest.param(httpx.ReadTimeout("quiet"), errors.StreamTimeout, id="read-timeout"),
        pytest.param(httpx.PoolTimeout("busy"), errors.StreamTimeout, id="pool-timeout"),
        pytest.param(httpx.ConnectError("refused"), errors.ConnectionLost, id="connect-error"),
        pytest.param(httpx.ReadError("reset"), errors.ConnectionLost, id="read-error"),
        pytest.param(httpx.RemoteProtocolError("short"), errors.ConnectionLost, id="short-body"),
        pytest.param(httpx.UnsupportedProtocol("ftp"), errors.StreamError, id="bad-scheme"),
        pytest.param(httpx.DecodingError("gzip"), errors.StreamError, id="bad-encoding"),
    ],
)
def test_httpx_errors_are_translated(exc: Exception, kind: type[errors.StreamError]) -> None:
    assert type(_translate(exc)) is kind


def test_bad_scheme_is_a_stream_error_from_the_httpx_error() -> None:
    async def test() -> None:
        async with AsyncClient("ftp://example.invalid") as client:
            with pytest.raises(errors.StreamError) as info:
                await client.stream("/").__anext__()
            assert isinstance(info.value.__cause__, httpx.UnsupportedProtocol)

    run(test)


def test_connection_refused_chains_the_httpx_error() -> None:
    async def test() -> None:
        with RawServer([]) as server:
            url = server.url
        async with AsyncClient(url) as client:
            with pytest.raises(errors.ConnectionLost) as info:
                await client.stream("/").__anext__()
            assert isinstance(info.value.__cause__, httpx.ConnectError)

    run(test)


def test_last_event_id_replaces_one_in_the_caller_headers() -> None:
    async def test() -> None:
        with RawServer([Script([envelope("ndjson", "2", 2)], framing="close")]) as server:
            async with fast(server.url, headers={"last-event-id": "0"}) as client:
                stream = client.stream("/", last_event_id="1", reconnect=False)
                assert [item async for item in stream] == [2]
            raw = server.requests[0].raw_headers.lower()
            assert raw.count(b"last-event-id") == 1
            assert server.requests[0].headers["last-event-id"] == "1"

    run(test)


@pytest.mark.parametrize(
    ("given", "connect", "read"),
    [
        pytest.param((1.0, 2.0), 1.0, 2.0, id="pair"),
        pytest.param((1.0, None), 1.0, None, id="no-read-timeout"),
        pytest.param(3.0, 3.0, 3.0, id="float"),
        pytest.param(None, None, None, id="none"),
        pytest.param(httpx.Timeout(4.0, read=5.0), 4.0, 5.0, id="httpx"),
    ],
)
def test_timeout_maps_to_httpx(given: Any, connect: float | None, read: float | None) -> None:
    timeout = _timeout(given)
    assert (timeout.connect, timeout.read) == (connect, read)


def test_hooks_observe_bytes_responses_and_reconnections_as_in_the_sync_client() -> None:
    from stream.protocol import VALUES, Hooks

    first = script("ndjson", envelope("ndjson", "1", 1), Close())
    second = script("ndjson", envelope("ndjson", "2", 2), envelope("ndjson", "3", None, "end"))
    seen: list[Any] = []
    hooks = Hooks(
        on_bytes=lambda data: seen.append(("bytes", len(data))),
        on_response=lambda response: seen.append(("response", response.status_code)),
        on_reconnect=lambda attempt, delay, cause: seen.append(("reconnect", attempt)),
    )

    async def test() -> None:
        with RawServer([first, second]) as server:
            async with fast(server.url) as client:
                values = [v async for v in client._stream(VALUES, "/jobs/j/events", hooks=hooks)]
                assert values == [1, 2]

    run(test)
    kinds = [item[0] for item in seen]
    assert kinds[0] == "response" and "bytes" in kinds
    assert ("reconnect", 1) in seen and kinds.count("response") == 2
