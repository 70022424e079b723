"""The reference service: ``create_app(config=None)`` builds the Flask app (``wsgi.py`` serves it).

It uses the library (``stream/``) the way a user's own app would; nothing in ``stream/`` imports
it. Modules: ``settings`` (the environment, read once), ``edges`` (errors, authorization, request
bodies, CORS), ``params`` (query and body values), ``demo`` (the seed's stream), ``jobs`` (the
expensive requests, and how to write one), ``queue`` (jobs on Dramatiq with ``REDIS_URL``),
``worker`` (what ``dramatiq service.worker`` runs), ``logs`` (a job's or a channel's log as a
stream), ``app`` (the routes).

Configuration comes from the environment in ``service.settings`` and nowhere else
(``gunicorn.conf.py`` reads the server's own settings); ``config`` overrides it, which is how the
tests build apps.

The edges, where a request meets the service before any stream starts:

- Request bodies are read here, not by Werkzeug: at most ``MAX_CONTENT_LENGTH`` bytes are kept
  (413 above, with or without a ``Content-Length``; a chunked body over the limit is refused
  whole, never cut), and the whole body must arrive within ``STREAM_BODY_TIMEOUT`` seconds (408,
  and the connection is closed). A body the service does not want (a refusal before reading it)
  is read and thrown away within the same bounds, so the answer reaches the client instead of a
  reset; past those bounds the connection is closed instead.
- Publishing and starting jobs need the same authorization (``authorize``): the bearer token
  when ``STREAM_PUBLISH_TOKEN`` is set, else a loopback client that no proxy relayed.
- Jobs hold a lease on their status (``service.jobs``): a job that dies without an end and that
  no worker takes up again leaves a status that expires, and its readers end with an error
  event instead of waiting forever. With ``REDIS_URL`` they run in job workers, never in the
  web processes (``service.queue``).
- ``STREAM_CORS_ORIGINS`` lets pages of other origins read streams and publish.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    # ``import service.settings`` (gunicorn.conf.py, in the master) must not import Flask, the
    # library's server side or gevent: the app is built in the workers.
    if name == "create_app":
        from service.app import create_app

        return create_app
    raise AttributeError(f"module 'service' has no attribute {name!r}")
