"""Stream JSON over HTTP from Flask under gunicorn+gevent, and read it back as a collection.

Layering (``tests/test_layering.py`` guards it): the pure core (``lines``, ``ndjson``, ``sse``,
``jsonseq``, ``formats``, ``encoders``, ``protocol``, ``event``, ``errors``) uses the standard
library and orjson only, no I/O. Around it, one module per framework or transport, each the
only one importing it: ``server`` (Flask), ``client`` (requests), ``aio`` (httpx),
``redis_broker`` (redis). Importing ``stream`` imports only the core: ``Client`` (requests) and
``stream_response`` (Flask) are imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import errors
from ._version import __version__ as __version__
from .event import Envelope, Event

if TYPE_CHECKING:
    from .client import Client, Stream
    from .server import stream_response

__all__ = ["Client", "Envelope", "Event", "Stream", "errors", "stream_response"]


def __getattr__(name: str) -> Any:
    # Importing a pure module (stream.sse, say) runs this package first: keep requests and Flask
    # out of it until they are asked for.
    if name in ("Client", "Stream"):
        try:
            from . import client
        except ModuleNotFoundError as exc:
            from ._extras import missing

            raise missing("client", exc) from exc

        return getattr(client, name)
    if name == "stream_response":
        from .server import stream_response

        return stream_response
    raise AttributeError(f"module 'stream' has no attribute {name!r}")
