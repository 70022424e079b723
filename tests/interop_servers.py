"""Streams served by software this project did not write, for the interop tests to read.

``uvicorn tests.interop_servers:app`` serves, on one FastAPI app:

- ``/sse-starlette/finite``: sse-starlette's ``EventSourceResponse``, ``count`` events with ids
  ``1..count`` and JSON data ``{"n": i}``, then a normal end. It ignores ``Last-Event-ID``, as
  most such apps do: a reader that resumes after the end gets everything again.
- ``/sse-starlette/resumable``: the same events, resumed after ``Last-Event-ID``; the first
  connection (no ``Last-Event-ID``) is cut (the body ends without its terminating chunk) after
  ``cut_after`` events, as when a proxy or the network drops it.
- ``/sse-starlette/plain``: data only, no ids; ``ping`` seconds between keep-alive comments.
- ``/fastapi/sse``: FastAPI's own SSE (``fastapi.sse.EventSourceResponse``) with ids.
- ``/fastapi/jsonl``: FastAPI's own JSON Lines (a path operation that yields,
  ``application/jsonl``).
- ``/fastapi/ndjson``: ``StreamingResponse`` of ``json.dumps(...) + "\\n"``
  (``application/x-ndjson``), the approach most hand-written FastAPI streams take.
- ``/openai/chat``: an OpenAI-style chat completion stream (``data:`` chunks, then
  ``data: [DONE]``), served by ``StreamingResponse`` as OpenAI-compatible servers do; with
  ``hold=1`` the body stays open after ``[DONE]`` (a reader must stop at the sentinel).
- ``/gz/...``: the same routes behind Starlette's ``GZipMiddleware`` (``Content-Encoding:
  gzip`` for the JSON Lines ones; it leaves ``text/event-stream`` alone).
- ``/log?key=K``: the stream requests that carried ``key=K`` (path and ``Last-Event-ID``),
  so a test can count reconnections.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse as FastAPIEventSourceResponse
from fastapi.sse import ServerSentEvent as FastAPIServerSentEvent
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.middleware.gzip import GZipMiddleware

#: stream requests by their ``key`` query parameter
LOG: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)


class Cut(Exception):
    """Raised inside a body generator: uvicorn then closes the connection mid-body."""


def _record(request: Request) -> int:
    """Log the request under its ``key``; the id to resume after (0 when none)."""
    last = request.headers.get("last-event-id")
    key = request.query_params.get("key")
    if key:
        LOG[key].append({"path": request.url.path, "last_event_id": last})
    try:
        return int(last) if last else 0
    except ValueError:
        return 0


def chat_chunks(count: int) -> list[dict[str, Any]]:
    """The chunks of an OpenAI-style chat completion stream (``chat.completion.chunk``)."""
    words = ["Hello", ",", " world", "!", " How", " can", " I", " help", "?"]
    chunks: list[dict[str, Any]] = []
    for i in range(count):
        delta: dict[str, Any] = {"content": words[i % len(words)]}
        if i == 0:
            delta["role"] = "assistant"
        chunks.append(
            {
                "id": "chatcmpl-interop",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "interop-model",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
        )
    chunks.append(
        {
            "id": "chatcmpl-interop",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "interop-model",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
    )
    return chunks


def add_routes(app: FastAPI) -> None:
    """The stream routes (shared by the plain app and the gzip one)."""

    @app.get("/sse-starlette/finite")
    async def sse_finite(
        request: Request, count: int = 5, interval: float = 0.0
    ) -> EventSourceResponse:
        _record(request)

        async def events() -> AsyncIterator[ServerSentEvent]:
            for i in range(1, count + 1):
                if i > 1 and interval:
                    await asyncio.sleep(interval)
                yield ServerSentEvent(data=json.dumps({"n": i}), id=str(i))

        return EventSourceResponse(events())

    @app.get("/sse-starlette/resumable")
    async def sse_resumable(
        request: Request, count: int = 6, cut_after: int = 3, interval: float = 0.0
    ) -> EventSourceResponse:
        after = _record(request)
        first_connection = request.headers.get("last-event-id") is None

        async def events() -> AsyncIterator[ServerSentEvent]:
            for i in range(after + 1, count + 1):
                if i > after + 1 and interval:
                    await asyncio.sleep(interval)
                yield ServerSentEvent(data=json.dumps({"n": i}), id=str(i))
                if first_connection and i == cut_after:
                    raise Cut(f"cut after event {i}")

        return EventSourceResponse(events())

    @app.get("/sse-starlette/plain")
    async def sse_plain(
        request: Request, count: int = 3, interval: float = 0.0, ping: float = 15.0
    ) -> EventSourceResponse:
        _record(request)

        async def events() -> AsyncIterator[dict[str, Any]]:
            for i in range(1, count + 1):
                if i > 1 and interval:
                    await asyncio.sleep(interval)
                yield {"data": json.dumps({"n": i})}

        return EventSourceResponse(events(), ping=ping)

    @app.get("/fastapi/sse", response_class=FastAPIEventSourceResponse)
    async def fastapi_sse(request: Request, count: int = 5) -> AsyncIterator[Any]:
        _record(request)
        for i in range(1, count + 1):
            yield FastAPIServerSentEvent(data={"n": i}, id=str(i))

    @app.get("/fastapi/jsonl")
    async def fastapi_jsonl(request: Request, count: int = 5) -> AsyncIterator[dict[str, Any]]:
        _record(request)
        for i in range(1, count + 1):
            yield {"n": i, "text": "x" * 100}

    @app.get("/fastapi/ndjson")
    async def fastapi_ndjson(request: Request, count: int = 5) -> StreamingResponse:
        _record(request)

        async def lines() -> AsyncIterator[str]:
            for i in range(1, count + 1):
                yield json.dumps({"n": i, "text": "x" * 100}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/openai/chat")
    async def openai_chat(request: Request, count: int = 4, hold: int = 0) -> StreamingResponse:
        _record(request)

        async def body() -> AsyncIterator[str]:
            for chunk in chat_chunks(count):
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            if hold:
                # A reader that does not stop at [DONE] waits here until it gives up.
                await asyncio.sleep(60)

        return StreamingResponse(body(), media_type="text/event-stream")


app = FastAPI()
add_routes(app)

gzipped = FastAPI()
add_routes(gzipped)
app.mount("/gz", GZipMiddleware(gzipped, minimum_size=1))


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/log")
async def log(key: str) -> list[dict[str, Any]]:
    return LOG[key]
