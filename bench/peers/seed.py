"""The seed's approach: FastAPI ``StreamingResponse`` of an async generator, json.dumps per event.

Served by ``uvicorn --loop uvloop --http httptools`` (one process). ``/stamped`` adds the
server's ``time.time()`` at the moment each event is yielded (scenarios 2 and 3).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from bench.peers import SEED_MESSAGES

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/events")
async def events(count: int = 4, interval: float = 0.5) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        last = count - 1
        for i in range(count):
            if i and interval:
                await asyncio.sleep(interval)
            yield (
                json.dumps(
                    {"event_id": i, "data": SEED_MESSAGES[i % 4], "is_last_event": i == last}
                )
                + "\n"
            )

    return StreamingResponse(gen(), media_type="application/x-ndjson")


@app.get("/stamped")
async def stamped(count: int = 4, interval: float = 0.025) -> StreamingResponse:
    async def gen() -> AsyncIterator[str]:
        last = count - 1
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            event = {"event_id": i, "data": SEED_MESSAGES[i % 4], "is_last_event": i == last}
            event["t"] = time.time()
            yield json.dumps(event) + "\n"

    return StreamingResponse(gen(), media_type="application/x-ndjson")
