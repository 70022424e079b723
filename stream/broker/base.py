"""Brokers: an append-only log per key with a live tail, in process or on Redis Streams.

Jobs and channels are logs. Publishing appends ``(event type, JSON bytes)`` items and returns
their ids; subscribing replays what the caller has not seen yet (everything, or everything after
a ``Last-Event-ID``) and then follows the live tail, with no gap and no duplicate between the
two. A publish is all or nothing: its entries are appended together or not at all, and every
live subscriber receives all of them, in one batch, whatever their number (or a ``reset``, on
Redis, when the per-worker reader fell behind the trim; see ``stream.broker.redis``).

Each subscriber has its own bounded queue: a reader that falls ``queue_size`` entries behind is
cut off (``SlowConsumer``) instead of slowing the publisher or the other readers. "Behind"
does not count the largest publish it has pending, so a reader that keeps up accepts a publish
larger than its queue whole; its memory stays below ``queue_size`` entries plus one publish.

Ids are Redis's own form ``"<ms>-<seq>"`` for both brokers, so they are totally ordered
(``parse_id`` gives the tuple to compare) and an id survives a switch between brokers.

Retention is bounded (``max_len`` entries and ``max_age`` seconds per key; in process also
``max_bytes`` across all keys, oldest entries first, whatever their key). A subscriber whose
``last_id`` lies before what is retained gets, first, a ``reset`` envelope::

    Envelope(id=last_id, event="reset",
             data=b'{"last_event_id": "<last_id>", "first_retained_id": "<id>" | null}')

and then the retained entries. A ``last_id`` ahead of the log (greater than any id the key
ever had: an id from a primary that was lost in a failover, or from a clock that went back)
gets a ``reset`` with ``first_retained_id`` null and then the live tail, every new entry
included even though its id is smaller than ``last_id``. Nothing of the log is replayed there:
the caller's position is unknown, so neither a replay nor a silent wait would be right.
Deliberate choices, so nobody "fixes" them:

- ``from_start`` replays the retained log without a ``reset`` even when its oldest entries were
  trimmed: the caller asked for "whatever there is", not for a position.
- The in-process broker answers ``reset`` for any ``last_id`` older than its own start (the
  entries after it lived in a previous process) and for a key it has no log for (expired, or
  never published here). Redis knows what it trimmed, so it only resets when something after
  ``last_id`` was really trimmed, or when the key is gone.
- Fan-out never blocks a publisher: a subscriber's queue is a deque that the publisher appends
  to while holding the broker's lock; the reader drains it without that lock (``popleft`` is
  atomic) and is woken through an ``Event`` only when it is actually waiting.

Threads: everything here uses ``threading`` primitives; under gunicorn's gevent worker they are
monkey-patched into their cooperative equivalents, so the same code serves greenlets.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, Protocol

import orjson

from stream.event import Envelope

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "LocalSubscription",
    "MemoryBroker",
    "SlowConsumer",
    "Subscription",
    "create_broker",
    "format_id",
    "parse_id",
    "reset_envelope",
]

IdTuple = tuple[int, int]

#: Redis stream ids are two unsigned 64-bit integers.
_MAX_PART = 2**64 - 1
_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
#: How often the in-process broker sweeps every key for age trimming and expiry (seconds).
_SWEEP_INTERVAL = 1.0
#: What the in-process broker may retain across all its logs by default (bytes).
DEFAULT_MAX_BYTES = 256 * 2**20
#: Python's cost of one retained entry beyond its data: the id tuple and string, the
#: envelope, the deque slot (measured on CPython 3.11: about 300 bytes).
_ENTRY_OVERHEAD = 320


class BrokerUnavailable(Exception):
    """The backend (Redis) cannot be reached, or the broker was closed; publishers answer 503."""


class SlowConsumer(Exception):
    """This subscriber's bounded queue overflowed; it was cut off from the live tail."""


class Subscription(Protocol):
    """One subscriber's view of a log: a replay batch, then the live tail."""

    def get(self, timeout: float) -> list[Envelope]:
        """Every entry queued so far in id order; ``[]`` after ``timeout`` s of nothing.

        The list may be shared with other subscribers of the same publish: read it, do not
        modify it.
        """
        ...

    def close(self) -> None:
        """Release the queue and the fan-out registration (idempotent)."""
        ...

    @property
    def overflowed(self) -> bool:
        """Whether the subscriber fell too far behind and was cut off from the live tail."""
        ...


class Broker(Protocol):
    """An append-only log per key with retention, a live tail, and small metadata."""

    kind: str

    def publish(self, key: str, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Append ``(event type, JSON bytes)`` items atomically and in order; return their ids."""
        ...

    def subscribe(
        self, key: str, last_id: str | None = None, *, from_start: bool = False
    ) -> Subscription:
        """Follow ``key``: new entries only, the whole log (``from_start``) or after ``last_id``."""
        ...

    def valid_id(self, value: str) -> bool:
        """Whether ``value`` has this broker's id syntax."""
        ...

    def set_meta(self, key: str, meta: dict[str, Any], ttl: float | None = None) -> None:
        """Store small JSON-able metadata for ``key``; ``ttl`` expires key, meta and log."""
        ...

    def get_meta(self, key: str) -> dict[str, Any] | None:
        """The metadata stored for ``key``, or ``None``."""
        ...

    def expire(self, key: str, ttl: float) -> None:
        """Make the log and the metadata of ``key`` disappear after ``ttl`` seconds."""
        ...

    def healthy(self) -> bool:
        """Whether the backend is reachable and accepts writes (cheap: ``/healthz`` polls it)."""
        ...

    def close(self) -> None:
        """Stop background work and end every subscription (their ``get`` raises)."""
        ...


def parse_id(value: str) -> IdTuple | None:
    """The ``(ms, seq)`` tuple of an id ``"<ms>-<seq>"``, or ``None`` if it is not one."""
    match = _ID_RE.fullmatch(value)
    if match is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    if ms > _MAX_PART or seq > _MAX_PART:
        return None
    return ms, seq


def format_id(value: IdTuple) -> str:
    """The string form ``"<ms>-<seq>"`` of an id tuple."""
    return f"{value[0]}-{value[1]}"


def _id_key(value: str) -> IdTuple:
    # Only for ids a broker produced itself: no validation on this path.
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


def reset_envelope(last_id: str, first_retained_id: str | None) -> Envelope:
    """The ``reset`` entry that tells a subscriber the entries after ``last_id`` are gone."""
    data = orjson.dumps({"last_event_id": last_id, "first_retained_id": first_retained_id})
    return Envelope(last_id, "reset", data)


class LocalSubscription:
    """A subscriber's bounded queue in this process (shared by both brokers' fan-out).

    The broker appends live batches with ``push`` while holding its fan-out lock; ``get`` is
    called by the one greenlet or thread that serves this subscriber. The queue holds whole
    batches (one per publish), so a publish of any size costs each subscriber one append.

    Overflow counts what the reader fell behind by, not the size of a publish: it is cut off
    when the entries it has not taken yet, apart from its largest pending batch, exceed
    ``limit``. A reader that keeps up (an empty queue) therefore accepts any single publish
    whole, and its memory stays below ``limit`` plus one publish.
    """

    __slots__ = (
        "key",
        "_lock",
        "_batches",
        "_pending",
        "_largest",
        "_replay",
        "_event",
        "_waiting",
        "_overflowed",
        "_closed",
        "_broker_closed",
        "_limit",
        "_last",
        "_on_close",
    )

    def __init__(
        self,
        key: str,
        limit: int,
        on_close: Callable[[LocalSubscription], None],
        last: IdTuple | None = None,
    ) -> None:
        self.key = key
        # Guards the queue between the publisher (or Redis reader) and this subscriber's
        # reader; never held while taking the broker's lock, so it cannot deadlock with it.
        self._lock = threading.Lock()
        self._batches: list[list[Envelope]] = []
        self._pending = 0
        self._largest = 0
        self._replay: list[Envelope] | None = None
        self._event = threading.Event()
        self._waiting = False
        self._overflowed = False
        self._closed = False
        self._broker_closed = False
        self._limit = limit
        #: newest id queued so far: live entries at or below it are duplicates and dropped
        self._last = last
        self._on_close = on_close

    def push(
        self, batch: list[Envelope], first: IdTuple, last: IdTuple, gap_after: str | None = None
    ) -> bool:
        """Queue a live batch in id order (fan-out lock held); ``False`` if this overflowed.

        ``gap_after`` says that entries after that id and before ``first`` were lost before
        they could be fanned out: a subscriber that has not seen past them gets a ``reset``
        ahead of the batch instead of a silent gap.
        """
        with self._lock:
            if self._closed or self._overflowed:
                return not self._overflowed
            previous = self._last
            if previous is not None and first <= previous:
                if last <= previous:
                    return True
                batch = [entry for entry in batch if _id_key(entry.id) > previous]
            elif gap_after is not None:
                mark = format_id(previous) if previous is not None else gap_after
                batch = [reset_envelope(mark, batch[0].id), *batch]
            self._last = last
            self._batches.append(batch)
            self._pending += len(batch)
            self._largest = max(self._largest, len(batch))
            if self._pending - self._largest > self._limit:
                self._overflowed = True
                self._batches.clear()
                self._event.set()
                return False
            if self._waiting:
                self._event.set()
            return True

    def get(self, timeout: float) -> list[Envelope]:
        """Every entry queued so far, in id order; ``[]`` after ``timeout`` s of nothing."""
        with self._lock:
            idle = not (self._batches or self._replay or self._overflowed or self._closed)
            if idle:
                self._event.clear()
                self._waiting = True
        if idle:
            try:
                self._event.wait(max(timeout, 0.0))
            finally:
                self._waiting = False
        with self._lock:
            if self._overflowed:
                self._replay = None
                raise SlowConsumer(
                    f"subscriber of {self.key!r} fell more than {self._limit} entries behind"
                )
            if self._closed:
                if self._broker_closed:
                    raise BrokerUnavailable("the broker was closed")
                return []
            batches = self._batches
            self._batches = []
            self._pending = self._largest = 0
            out = self._replay
            self._replay = None
        if out is None:
            if len(batches) == 1:
                return batches[0]
            out = []
        for batch in batches:
            out += batch
        return out

    def close(self) -> None:
        """Leave the fan-out and drop the queue; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._batches = []
            self._replay = None
        self._on_close(self)
        self._event.set()

    def abort(self) -> None:
        """End this subscription because the broker closed (fan-out lock held)."""
        with self._lock:
            self._closed = True
            self._broker_closed = True
            self._batches = []
            self._replay = None
        self._event.set()

    def start(self, replay: list[Envelope], floor: IdTuple | None) -> None:
        """Set the replay batch and drop queued live entries at or below ``floor`` (lock held)."""
        with self._lock:
            if floor is not None:
                if self._batches:
                    kept = [entry for entry in chain(*self._batches) if _after(entry, floor)]
                    self._batches = [kept] if kept else []
                    self._pending = self._largest = len(kept)
                if self._last is None or floor > self._last:
                    self._last = floor
            self._replay = replay or None
            if self._waiting:
                self._event.set()

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called or the broker closed."""
        return self._closed

    @property
    def overflowed(self) -> bool:
        """Whether this subscriber fell too far behind and was cut off from the live tail."""
        return self._overflowed


def _after(entry: Envelope, floor: IdTuple) -> bool:
    """Whether a queued entry is still news for a subscriber whose history reached ``floor``."""
    if entry.event == "reset":
        # A gap reset is about the entries before its first_retained_id: still news unless
        # the history already reached that far.
        first = orjson.loads(entry.data).get("first_retained_id")
        return first is not None and _id_key(first) > floor
    return _id_key(entry.id) > floor


class _Log:
    """One key in the in-process broker: its entries, subscribers, metadata and expiry."""

    __slots__ = (
        "entries",
        "batches",
        "subscribers",
        "trimmed",
        "last",
        "exists",
        "meta",
        "deadline",
    )

    def __init__(self) -> None:
        self.entries: deque[tuple[IdTuple, Envelope]] = deque()
        #: (token, newest id) of each publish that still has entries here, oldest first
        self.batches: deque[tuple[int, IdTuple]] = deque()
        self.subscribers: dict[LocalSubscription, None] = {}
        #: newest id trimmed from this log (a resume from before it gets a reset)
        self.trimmed: IdTuple | None = None
        #: newest id ever appended (a resume from after it is ahead of the log: a reset)
        self.last: IdTuple | None = None
        #: whether anything was ever published since the key was created or expired
        self.exists = False
        self.meta: bytes | None = None
        self.deadline: float | None = None

    def idle(self) -> bool:
        return not (self.subscribers or self.exists or self.meta is not None)


class MemoryBroker:
    """The in-process broker: one worker process, logs in memory, thread- and gevent-safe.

    ``max_bytes`` bounds all logs together: each entry counts its data's length plus
    ``_ENTRY_OVERHEAD``, which matches what CPython really holds within a few per cent for
    data stored as exact-size bytes (``stream.encoders.dumps_compact``; orjson's own results
    keep a larger allocation that no length shows). Above the bound the oldest entries go
    first, whatever their key, and resuming from them gets a ``reset``.
    """

    kind = "memory"

    def __init__(
        self,
        *,
        max_len: int = 10_000,
        max_age: float = 3600.0,
        queue_size: int = 10_000,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        _check_limits(max_len, max_age, queue_size)
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_len = max_len
        self.max_age = max_age
        self.queue_size = queue_size
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._logs: dict[str, _Log] = {}
        #: what every log holds, by the estimate of ``_entry_size``
        self._bytes = 0
        #: every publish that still has entries in some log, oldest first: where the byte
        #: bound evicts from (ids grow across keys, so this is also the order of the ids)
        self._batches: OrderedDict[int, _Log] = OrderedDict()
        self._token = 0
        now_ms = int(time.time() * 1000)
        #: ids below this may have been issued by a previous process: resuming from them resets
        self._start: IdTuple = (now_ms, 0)
        self._newest: IdTuple = (now_ms, -1)
        self._next_sweep = time.monotonic() + _SWEEP_INTERVAL
        self._closed = False

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, key: str, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Append ``(event type, JSON bytes)`` items atomically and in order; return their ids."""
        if not items:
            return []
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("the broker was closed")
            now = time.time()
            log = self._log(key, now, create=True)
            assert log is not None
            ms = int(now * 1000)
            # Monotonic across keys even if the clock steps back, as Redis does per stream.
            seq = self._newest[1] + 1 if ms <= self._newest[0] else 0
            ms = max(ms, self._newest[0])
            batch = [
                Envelope(f"{ms}-{seq + i}", event, data) for i, (event, data) in enumerate(items)
            ]
            first: IdTuple = (ms, seq)
            last: IdTuple = (ms, seq + len(batch) - 1)
            self._newest = last
            entries = log.entries
            entries.extend(((ms, seq + i), entry) for i, entry in enumerate(batch))
            log.exists = True
            log.last = last
            token = self._token = self._token + 1
            self._batches[token] = log
            log.batches.append((token, last))
            self._bytes += sum(len(data) for _, data in items) + _ENTRY_OVERHEAD * len(batch)
            self._trim(log, now)
            self._evict()
            if log.subscribers:
                dropped = [sub for sub in log.subscribers if not sub.push(batch, first, last)]
                for sub in dropped:
                    del log.subscribers[sub]
            self._maybe_sweep(now)
        return [entry.id for entry in batch]

    def _trim(self, log: _Log, now: float) -> None:
        entries = log.entries
        trimmed = None
        while len(entries) > self.max_len:
            trimmed = self._pop_oldest(log)
        cutoff = int((now - self.max_age) * 1000)
        while entries and entries[0][0][0] < cutoff:
            trimmed = self._pop_oldest(log)
        if trimmed is not None:
            log.trimmed = trimmed

    def _pop_oldest(self, log: _Log) -> IdTuple:
        """Remove the oldest entry of ``log`` and account for it; returns its id."""
        entry_id, entry = log.entries.popleft()
        self._bytes -= len(entry.data) + _ENTRY_OVERHEAD
        batches = log.batches
        while batches and batches[0][1] <= entry_id:  # that publish has nothing left here
            del self._batches[batches.popleft()[0]]
        return entry_id

    def _evict(self) -> None:
        """Above ``max_bytes``, drop the oldest entries of all logs, whatever their key."""
        while self._bytes > self.max_bytes and self._batches:
            log = next(iter(self._batches.values()))
            if log.entries:
                log.trimmed = self._pop_oldest(log)
            else:  # defensive: a batch record must never outlive its entries
                self._batches.popitem(last=False)

    def _log(self, key: str, now: float, *, create: bool) -> _Log | None:
        """The live log of ``key`` (expiring it first if due); created on demand."""
        log = self._logs.get(key)
        if log is not None and log.deadline is not None and now >= log.deadline:
            self._drop(key, log)
            log = self._logs.get(key)
        if log is None and create:
            log = self._logs[key] = _Log()
        return log

    def _drop(self, key: str, log: _Log) -> None:
        """Forget the log and meta of ``key``; its subscribers stay and see a missing key."""
        while log.entries:
            self._pop_oldest(log)
        log.trimmed = None
        log.last = None
        log.exists = False
        log.meta = None
        log.deadline = None
        if log.idle():
            del self._logs[key]

    def _maybe_sweep(self, now: float) -> None:
        # Periodic age trimming and expiry, piggybacked on traffic instead of a timer thread:
        # without traffic nothing grows, and there is no thread to start or stop.
        tick = time.monotonic()
        if tick < self._next_sweep:
            return
        self._next_sweep = tick + _SWEEP_INTERVAL
        for key, log in list(self._logs.items()):
            if log.deadline is not None and now >= log.deadline:
                self._drop(key, log)
            else:
                self._trim(log, now)

    # -- subscribing --------------------------------------------------------------------------

    def subscribe(
        self, key: str, last_id: str | None = None, *, from_start: bool = False
    ) -> Subscription:
        """Follow ``key``: new entries only, the whole log (``from_start``) or after ``last_id``."""
        after = None
        if last_id is not None:
            after = parse_id(last_id)
            if after is None:
                raise ValueError(f"not a stream id: {last_id!r}")
        with self._lock:
            if self._closed:
                raise BrokerUnavailable("the broker was closed")
            now = time.time()
            log = self._log(key, now, create=True)
            assert log is not None
            self._trim(log, now)
            replay: list[Envelope] = []
            entries = log.entries
            if after is not None:
                lost = (
                    not log.exists
                    or after < self._start
                    or (log.trimmed is not None and after < log.trimmed)
                )
                if lost:
                    replay.append(
                        reset_envelope(str(last_id), entries[0][1].id if entries else None)
                    )
                elif log.last is not None and after > log.last:
                    # Ahead of the log (an id from a lost primary, a clock that went back):
                    # say so; every new entry follows even though its id is smaller.
                    replay.append(reset_envelope(str(last_id), None))
                # Resumes are usually near the tail: walk back from the newest entry.
                tail: list[Envelope] = []
                for entry_id, entry in reversed(entries):
                    if entry_id <= after:
                        break
                    tail.append(entry)
                tail.reverse()
                replay.extend(tail)
            elif from_start:
                replay.extend(entry for _, entry in entries)
            sub = LocalSubscription(key, self.queue_size, self._unsubscribe)
            sub.start(replay, None)
            log.subscribers[sub] = None
            self._maybe_sweep(now)
        return sub

    def _unsubscribe(self, sub: LocalSubscription) -> None:
        with self._lock:
            log = self._logs.get(sub.key)
            if log is not None:
                log.subscribers.pop(sub, None)
                if log.idle():
                    del self._logs[sub.key]

    def subscriber_count(self, key: str | None = None) -> int:
        """How many subscriptions follow ``key`` (all keys when ``None``) right now."""
        with self._lock:
            if key is None:
                return sum(len(log.subscribers) for log in self._logs.values())
            log = self._logs.get(key)
            return 0 if log is None else len(log.subscribers)

    # -- metadata, expiry, lifecycle ----------------------------------------------------------

    def valid_id(self, value: str) -> bool:
        """Whether ``value`` has the id syntax ``"<ms>-<seq>"``."""
        return parse_id(value) is not None

    def set_meta(self, key: str, meta: dict[str, Any], ttl: float | None = None) -> None:
        """Store JSON-able metadata; ``ttl`` (s) expires key, meta and log, ``None`` keeps it."""
        data = orjson.dumps(meta)
        with self._lock:
            now = time.time()
            log = self._log(key, now, create=True)
            assert log is not None
            log.meta = data
            if ttl is not None:
                log.deadline = now + ttl

    def get_meta(self, key: str) -> dict[str, Any] | None:
        """The metadata stored for ``key`` (a fresh copy), or ``None``."""
        with self._lock:
            log = self._log(key, time.time(), create=False)
            data = None if log is None else log.meta
        if data is None:
            return None
        meta: dict[str, Any] = orjson.loads(data)
        return meta

    def expire(self, key: str, ttl: float) -> None:
        """Make the log and the metadata of ``key`` disappear after ``ttl`` seconds."""
        with self._lock:
            now = time.time()
            log = self._log(key, now, create=False)
            if log is not None:
                log.deadline = now + ttl
                if ttl <= 0:
                    self._drop(key, log)

    def healthy(self) -> bool:
        """Always reachable while open: it lives in this process."""
        return not self._closed

    def close(self) -> None:
        """End every subscription (their ``get`` raises ``BrokerUnavailable``) and forget all."""
        with self._lock:
            self._closed = True
            for log in self._logs.values():
                for sub in log.subscribers:
                    sub.abort()
            self._logs.clear()


def _check_limits(max_len: int, max_age: float, queue_size: int) -> None:
    if max_len < 1 or max_age <= 0 or queue_size < 1:
        raise ValueError("max_len and queue_size must be >= 1 and max_age > 0")


def create_broker(
    redis_url: str | None,
    *,
    max_len: int = 10_000,
    max_age: float = 3600.0,
    queue_size: int = 10_000,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Broker:
    """The in-process broker when ``redis_url`` is ``None``, else the Redis Streams one.

    ``max_bytes`` bounds the in-process broker's memory across all logs; on Redis the
    server's own ``maxmemory`` does (a full Redis makes publishes ``BrokerUnavailable``).
    """
    if redis_url is None:
        return MemoryBroker(
            max_len=max_len, max_age=max_age, queue_size=queue_size, max_bytes=max_bytes
        )
    from stream.broker.redis import RedisBroker  # imports redis: only when asked for

    return RedisBroker(redis_url, max_len=max_len, max_age=max_age, queue_size=queue_size)
