"""Brokers: an append-only log per key with a live tail, in process or on Redis Streams."""

from __future__ import annotations

from stream.broker.base import (
    DEFAULT_MAX_BYTES,
    Broker,
    BrokerUnavailable,
    IdTuple,
    LocalSubscription,
    MemoryBroker,
    SlowConsumer,
    Subscription,
    create_broker,
    format_id,
    parse_id,
    reset_envelope,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "Broker",
    "BrokerUnavailable",
    "IdTuple",
    "LocalSubscription",
    "MemoryBroker",
    "SlowConsumer",
    "Subscription",
    "create_broker",
    "format_id",
    "parse_id",
    "reset_envelope",
]
