"""An async fan-out peer: channels on Starlette under uvicorn (uvloop, httptools), one process.

``POST /channels/<name>`` puts the JSON body on every subscriber's ``asyncio.Queue`` and answers
201; ``GET /channels/<name>`` streams NDJSON envelopes ``{"id","event","data"}`` from that queue,
as the project's channels do. What an asyncio service written the usual way does: one queue and
one task per subscriber, the event encoded once and the same bytes queued to each.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

_channels: dict[str, set[asyncio.Queue[bytes]]] = {}
_ids = itertools.count()


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "open_streams": sum(map(len, _channels.values()))})


async def publish(request: Request) -> Response:
    name = request.path_params["name"]
    data = orjson.dumps(orjson.loads(await request.body()))
    event_id = f"0-{next(_ids)}"
    line = b'{"id":"' + event_id.encode() + b'","event":"message","data":' + data + b"}\n"
    for queue in _channels.get(name, ()):
        queue.put_nowait(line)
    return Response(orjson.dumps({"ids": [event_id]}), 201, media_type="application/json")


async def subscribe(request: Request) -> Response:
    name = request.path_params["name"]
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    _channels.setdefault(name, set()).add(queue)

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                first = await queue.get()
                if queue.empty():
                    yield first
                    continue
                chunks = [first]  # whatever else is ready goes out in the same write
                while not queue.empty():
                    chunks.append(queue.get_nowait())
                yield b"".join(chunks)
        finally:
            _channels[name].discard(queue)

    return StreamingResponse(body(), media_type="application/x-ndjson")


app = Starlette(
    routes=[
        Route("/healthz", healthz),
        Route("/channels/{name}", publish, methods=["POST"]),
        Route("/channels/{name}", subscribe, methods=["GET"]),
    ]
)
