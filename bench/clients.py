"""Each side's natural client, run in a process of its own: ``python -m bench.clients KIND URL``.

Prints one JSON object: ``events`` (values decoded), ``seconds`` (request sent to last value
decoded, interpreter start-up excluded) and, with ``--stamped``, ``lags_ms``: arrival time minus
the server's ``"t"`` of each event.

Kinds:
  requests      the seed's client: ``requests.get(stream=True)`` + ``iter_lines()`` + ``json.loads``
  httpx-sse     FastAPI SSE's: httpx + httpx-sse ``aconnect_sse`` / ``aiter_sse`` + ``json.loads``
  project       this project's ``stream.client.Client(...).stream(url)`` (NDJSON)
  project-sse   the same with ``format="sse"``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any


def _run_requests(url: str, on_value: Callable[[Any], None]) -> None:
    import requests

    with requests.get(url, stream=True, timeout=(10, 120)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line:
                on_value(json.loads(line))


def _run_httpx_sse(url: str, on_value: Callable[[Any], None]) -> None:
    import httpx
    from httpx_sse import aconnect_sse

    async def main() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
            async with aconnect_sse(client, "GET", url) as source:
                async for sse in source.aiter_sse():
                    on_value(json.loads(sse.data))

    asyncio.run(main())


def _run_project(url: str, on_value: Callable[[Any], None], fmt: str | None) -> None:
    # ``from stream import Client`` is not exported yet; the module is.
    from stream.client import Client

    with Client(timeout=(10.0, 120.0)) as client:
        values: Iterable[Any] = client.stream(url, format=fmt)
        for value in values:
            on_value(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["requests", "httpx-sse", "project", "project-sse"])
    parser.add_argument("url")
    parser.add_argument("--stamped", action="store_true")
    args = parser.parse_args(argv)

    count = 0
    lags: list[float] = []
    now = time.time

    if args.stamped:

        def on_value(value: Any) -> None:
            nonlocal count
            lags.append((now() - value["t"]) * 1000.0)
            count += 1
    else:

        def on_value(value: Any) -> None:
            nonlocal count
            count += 1

    # Import each client's libraries before the clock starts: the figure is the transfer.
    if args.kind == "requests":
        import requests  # noqa: F401
    elif args.kind == "httpx-sse":
        import httpx  # noqa: F401
        import httpx_sse  # noqa: F401
    else:
        import stream.client  # noqa: F401
    start = time.perf_counter()
    if args.kind == "requests":
        _run_requests(args.url, on_value)
    elif args.kind == "httpx-sse":
        _run_httpx_sse(args.url, on_value)
    else:
        _run_project(args.url, on_value, "sse" if args.kind == "project-sse" else None)
    seconds = time.perf_counter() - start
    json.dump({"events": count, "seconds": seconds, "lags_ms": lags}, sys.stdout)


if __name__ == "__main__":
    main()
