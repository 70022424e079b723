"""The ``Event`` value that ``Client.events()`` yields, shared by every decoder."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson


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
        """Decode ``data`` as JSON."""
        return orjson.loads(self.data)


class Envelope(NamedTuple):
    """One logged event on the server side: its id, its type and its data as JSON bytes.

    Brokers store and return envelopes; the stream writer encodes them in the negotiated format
    without decoding ``data`` again (it was encoded once, when it was published).
    """

    id: str
    event: str
    data: bytes
