"""The ``Event`` value that ``Client.events()`` yields, shared by every decoder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from .ndjson import decode_exact


class Event(NamedTuple):
    """One dispatched event, as a browser's ``MessageEvent`` would see it.

    ``id`` is the last event ID at that point (it carries over from earlier events, ``""`` when
    none was ever set), ``event`` the type (``"message"`` by default), ``data`` the raw text, and
    ``retry`` the reconnection time in milliseconds given in this event's block, if any.
    """

    id: str
    event: str
    data: str
    retry: int | None = None

    def json(self) -> Any:
        """Decode ``data`` as JSON, exactly as ``json.loads`` would (integers of any size)."""
        return decode_exact(self.data)


class Envelope(NamedTuple):
    """One logged event on the server side: its id, its type and its data as JSON bytes.

    Brokers store and return envelopes; the stream writer encodes them in the negotiated format
    without decoding ``data`` again (it was encoded once, when it was published).
    """

    id: str
    event: str
    data: bytes

    def frame(self, media_type: str, encode: Callable[[Envelope], bytes]) -> bytes:
        """This envelope in ``media_type``'s framing: ``encode(self)`` (cached by ``Shared``)."""
        return encode(self)


class SharedEnvelope(Envelope):
    """An envelope that a broker fans out to many subscribers: encoded once per format.

    Equal to the ``Envelope`` with the same fields. The brokers hand one list of these to every
    live subscriber of a publish, so 10,000 subscribers in one format cost one encoding, not
    10,000; the bytes live as long as the list (the log keeps plain envelopes, so retained
    entries hold no encodings). No ``__slots__``: the instance dict is the cache.
    """

    def frame(self, media_type: str, encode: Callable[[Envelope], bytes]) -> bytes:
        """``encode(self)``, computed once per media type (a race encodes twice: harmless)."""
        cache = self.__dict__
        data: bytes | None = cache.get(media_type)
        if data is None:
            data = cache[media_type] = encode(self)
        return data
