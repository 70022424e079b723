"""The in-process broker: one worker process, every log in memory, thread- and gevent-safe.

The protocol it implements (ids, ``reset``, bounded queues, retention) is described in
``stream.broker.base``. Use it when one process serves every stream of a key (one gunicorn
worker, a script, the tests); for several workers or machines, ``stream.broker.redis``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import orjson

from stream.broker.base import (
    BrokerUnavailable,
    IdTuple,
    LocalSubscription,
    Subscription,
    check_limits,
    fan_out,
    parse_id,
    reset_envelope,
    resume_after,
)
from stream.event import Envelope

__all__ = ["DEFAULT_MAX_BYTES", "MemoryBroker"]

#: How often the in-process broker sweeps every key for age trimming and expiry (seconds).
_SWEEP_INTERVAL = 1.0
#: What the in-process broker may retain across all its logs by default (bytes).
DEFAULT_MAX_BYTES = 256 * 2**20
#: Python's cost of one retained entry beyond its data: the id tuple and string, the
#: envelope, the deque slot (measured on CPython 3.11: about 300 bytes).
_ENTRY_OVERHEAD = 320


#: how long the fan-out thread waits for a publish before it ends (s)
_FANOUT_LINGER = 1.0
#: one publish waiting for the fan-out: its entries, first and last id, no gap (``fan_out``)
_Queued = tuple[list[Envelope], IdTuple, IdTuple, None]


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
        check_limits(max_len, max_age, queue_size)
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
        #: publishes appended but not fanned out yet, oldest first (guarded by ``_lock``)
        self._fanout: deque[tuple[_Log, list[Envelope], IdTuple, IdTuple]] = deque()
        #: set while nothing is queued or being fanned out (``subscriber_count`` waits for it)
        self._fanned = threading.Event()
        self._fanned.set()
        self._fanout_wake = threading.Event()
        #: the process whose fan-out thread runs now (0: none runs; it ends when idle)
        self._fanout_pid = 0

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, key: str, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Append ``(event type, JSON bytes)`` items atomically and in order; return their ids."""
        if not items:
            return []
        start = False
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
                # Answered once it is in the log: the fan-out runs in its own thread (greenlet),
                # so a publish costs the same for 10 subscribers as for 10,000.
                self._fanout.append((log, batch, first, last))
                self._fanned.clear()
                self._fanout_wake.set()
                if self._fanout_pid != os.getpid():  # none runs here (or a forked child)
                    self._fanout_pid = os.getpid()
                    start = True
            self._maybe_sweep(now)
        if start:  # outside the lock: starting a thread waits for it to run
            threading.Thread(target=self._run_fanout, name="stream-fanout", daemon=True).start()
        return [entry.id for entry in batch]

    def _run_fanout(self) -> None:
        """Push every queued publish to the subscribers it had, in publish order.

        The subscribers are read under the lock and pushed to outside it, ``FANOUT_SLICE`` at
        a time with a yield in between: publishers, subscribes and the streams already woken
        run meanwhile. The thread ends after ``_FANOUT_LINGER`` s with nothing queued. A
        subscriber that registers after the snapshot has a floor at the log's newest id
        (``subscribe``), so it neither misses nor repeats this publish.
        """
        while True:
            with self._lock:
                if self._closed:
                    self._fanout.clear()
                    self._fanout_pid = 0
                    self._fanned.set()
                    return
                idle = not self._fanout
                if idle:
                    self._fanned.set()
                    self._fanout_wake.clear()  # under the lock: a publish sets it after
                # Per key: its subscribers now, and every publish queued for it meanwhile.
                work: dict[int, tuple[_Log, list[LocalSubscription], list[_Queued]]] = {}
                for log, batch, first, last in self._fanout:
                    if id(log) not in work:
                        work[id(log)] = (log, list(log.subscribers), [])
                    work[id(log)][2].append((batch, first, last, None))
                self._fanout.clear()
            if idle:
                # Idle for _FANOUT_LINGER s: this thread ends, the next publish starts another,
                # so an idle worker keeps no fan-out greenlet (and a paced publisher does not
                # start a thread per publish).
                if not self._fanout_wake.wait(_FANOUT_LINGER):
                    with self._lock:
                        if not self._fanout:
                            self._fanout_pid = 0
                            return
                continue
            for log, subs, batches in work.values():
                dropped = fan_out(subs, batches)
                if dropped:
                    with self._lock:
                        for sub in dropped:
                            log.subscribers.pop(sub, None)

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
        after = resume_after(last_id)
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
            # Publishes up to the log's newest id are in the replay (or before the position
            # asked for): one still queued for the fan-out must not reach this subscriber too.
            sub = LocalSubscription(key, self.queue_size, self._unsubscribe, log.last)
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
        """How many subscriptions follow ``key`` (all keys when ``None``), once every publish
        made so far was fanned out (those a publish cut off are no longer counted)."""
        self._fanned.wait(5.0)
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
            self._fanout_wake.set()
            for log in self._logs.values():
                for sub in log.subscribers:
                    sub.abort()
            self._logs.clear()
