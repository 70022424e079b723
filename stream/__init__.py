"""Stream JSON over HTTP from Flask under gunicorn+gevent, and read it back as a collection.

Layout, and the layering rule that ``tests/test_layering.py`` guards:

- The pure core: the standard library and orjson only, no I/O. ``wire`` (the vocabulary,
  defined once: media types, reserved event names, the error and reset payloads), ``lines``,
  ``ndjson``, ``sse``, ``jsonseq`` (decoders), ``encoders``, ``formats`` (negotiation),
  ``event``, ``errors`` (the error tree), ``protocol`` (the clients' sans-I/O driver), and the
  brokers' ``broker.base`` (what a broker is: an append-only log per key with a live tail) and
  ``broker.memory`` (the in-process broker; ``threading`` only).
- Around it, one module per framework or transport, the only one that imports it: ``server``
  (Flask: ``stream_response``), ``client`` (requests: ``Client``, used by the command line in
  ``__main__``), ``aio`` (httpx: ``AsyncClient``), ``broker.redis`` (redis-py: ``RedisBroker``),
  ``gunicorn`` (hooks for your ``gunicorn.conf.py``), ``metrics`` (prometheus-client, optional).
- Imports point inward, never in a circle: the core imports nothing around it, and
  ``broker.base`` imports neither broker (both import it). ``import stream`` and ``import
  stream.broker`` import no framework or transport: ``Client`` (requests) and
  ``stream_response`` (Flask) load when first used, ``RedisBroker`` only from
  ``stream.broker.redis`` or through ``create_broker`` with a Redis URL. A missing extra fails
  with the ``pip install`` line that brings it (``_extras``).
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
        from . import client  # without requests: an error that names the extra (client.py)

        return getattr(client, name)
    if name == "stream_response":
        from .server import stream_response

        return stream_response
    raise AttributeError(f"module 'stream' has no attribute {name!r}")
