"""FastAPI's own SSE: ``fastapi.sse.EventSourceResponse`` on a path operation that yields dicts.

The installed FastAPI has it (so sse-starlette is not used); each yielded dict is encoded by
FastAPI as ``data: <json>`` and sent through its producer/keep-alive task pair. Served like the
seed: ``uvicorn --loop uvloop --http httptools``, one process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.sse import EventSourceResponse

from bench.peers import SEED_MESSAGES

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/events", response_class=EventSourceResponse)
async def events(count: int = 4, interval: float = 0.5) -> AsyncIterator[dict[str, Any]]:
    last = count - 1
    for i in range(count):
        if i and interval:
            await asyncio.sleep(interval)
        yield {"event_id": i, "data": SEED_MESSAGES[i % 4], "is_last_event": i == last}


@app.get("/stamped", response_class=EventSourceResponse)
async def stamped(count: int = 4, interval: float = 0.025) -> AsyncIterator[dict[str, Any]]:
    last = count - 1
    for i in range(count):
        if i:
            await asyncio.sleep(interval)
        yield {
            "event_id": i,
            "data": SEED_MESSAGES[i % 4],
            "is_last_event": i == last,
            "t": time.time(),
        }
