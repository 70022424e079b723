"""What every broker is: an append-only log per key with a live tail, its ids and its errors.

The protocol (``Broker``, ``Subscription``), the errors, the ids, the ``reset`` envelope and the
bounded per-subscriber queue (``LocalSubscription``) that both implementations fan out to:
``stream.broker.memory`` (in process) and ``stream.broker.redis`` (Redis Streams) import this
module, and it imports neither (nor any framework or transport).

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

import _socket
import errno
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, Protocol

import orjson

from stream.event import Envelope, SharedEnvelope
from stream.wire import RESET, ResetPayload, reset_json

__all__ = [
    "FANOUT_SLICE",
    "Broker",
    "BrokerUnavailable",
    "IdTuple",
    "LocalSubscription",
    "SlowConsumer",
    "Subscription",
    "check_limits",
    "fan_out",
    "format_id",
    "id_key",
    "parse_id",
    "reset_envelope",
]

IdTuple = tuple[int, int]
#: One batch to fan out: its entries, the ids of its first and last, and the id after which
#: entries were lost before it (None: none were; see ``LocalSubscription.push``).
FanoutBatch = tuple[Sequence[Envelope], IdTuple, IdTuple, str | None]

#: Subscribers a fan-out pushes to between two yields to the other greenlets (under gevent)
#: or threads: what bounds how long one big fan-out holds a publisher or a stream back. A
#: push either writes to the subscriber's socket (``LocalSubscription.deliver_to``) or wakes
#: the subscriber: a yield lets those 64 write before the next 64.
FANOUT_SLICE = 64
#: Between two slices a fan-out sleeps this long (s): the shortest sleep, which under gevent is
#: a timer, so the hub polls its sockets first. ``sleep(0)`` would only queue the fan-out behind
#: the ready greenlets, and gevent polls after 50 of those at the earliest: a fan-out that
#: writes to its subscribers itself (``deliver_to``) leaves no others, so the hub would not
#: look at a socket until 50 slices (3,200 subscribers) later.
_YIELD = 1e-6
#: A slice that waited longer than this (s) for a CPU, and the sleep that follows it then: more
#: runnable processes than cores (more workers than cores, or other busy processes). A fan-out
#: that keeps its core runs at most a time slice of the kernel's before waiting again behind
#: the others, and so does every request its worker serves meanwhile, once per socket it waits
#: on (a publish waits on two: its request and Redis' reply). A fan-out that sleeps between its
#: slices is woken at once, and so is its worker for a request's socket. See docs/scaling.md.
FANOUT_CONTENDED = 0.001
FANOUT_BACKOFF = 0.004


def _cores() -> int:
    if not sys.platform.startswith("linux"):
        return 0  # no abstract Unix sockets to keep slots in
    return len(os.sched_getaffinity(0))


#: Fan-outs to more than ``FANOUT_SLICE`` subscribers that run at once among the worker
#: processes of one server (the children of one parent, such as gunicorn's master): one per
#: core. With more workers than cores, the others wait their turn asleep, so their workers
#: answer requests at once instead of each waiting for a core behind the fan-outs at every
#: socket (a publish waits on two). 0: no limit. Linux only (abstract Unix sockets, released
#: by the kernel with their process); elsewhere there is no limit.
FANOUT_SLOTS = _cores()
#: How often (s) a fan-out waiting for a slot looks again.
_SLOT_POLL = 0.001

#: Redis stream ids are two unsigned 64-bit integers.
_MAX_PART = 2**64 - 1
_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")


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

    def deliver_to(self, sink: Callable[[list[Envelope]], bool] | None) -> None:
        """Hand live batches to ``sink`` while the reader waits with nothing queued (or not)."""
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


def resume_after(last_id: str | None) -> IdTuple | None:
    """The id a subscription resumes after (``None``: none given); ``ValueError`` if malformed."""
    if last_id is None:
        return None
    after = parse_id(last_id)
    if after is None:
        raise ValueError(f"not a stream id: {last_id!r}")
    return after


def format_id(value: IdTuple) -> str:
    """The string form ``"<ms>-<seq>"`` of an id tuple."""
    return f"{value[0]}-{value[1]}"


def id_key(value: str) -> IdTuple:
    """The tuple of an id a broker produced itself (no validation: the hot path)."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


def reset_envelope(last_id: str, first_retained_id: str | None) -> Envelope:
    """The ``reset`` entry that tells a subscriber the entries after ``last_id`` are gone."""
    return Envelope(last_id, RESET, reset_json(last_id, first_retained_id))


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
        "_due",
        "_tick",
        "_sink",
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
        #: when the current idle wait ends (monotonic s), and the tick ``_DEADLINES`` holds
        #: this subscription under (None: not filed; set under ``_DEADLINES``' lock)
        self._due = 0.0
        self._tick: int | None = None
        #: takes a live batch while the reader waits with nothing queued (``deliver_to``)
        self._sink: Callable[[list[Envelope]], bool] | None = None

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
                batch = [entry for entry in batch if id_key(entry.id) > previous]
            elif gap_after is not None:
                mark = format_id(previous) if previous is not None else gap_after
                batch = [reset_envelope(mark, batch[0].id), *batch]
            self._last = last
            sink = self._sink
            if sink is not None and self._waiting and not self._batches and self._replay is None:
                # The reader waits with nothing queued: the sink writes the batch for it, with
                # no wake-up (or declines: a slow peer, a stream moving on).
                if sink(batch):
                    return True
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
        """Every entry queued so far, in id order; ``[]`` after ``timeout`` s of nothing.

        An idle wait has no timer of its own: the shared ``_DEADLINES`` wakes it at most
        ``_TICK`` s after ``timeout`` (a timer per wait was a quarter of a 10,000-subscriber
        fan-out: one started and cancelled per subscriber per event).
        """
        lock = self._lock
        with lock:
            if self._batches or self._replay or self._overflowed or self._closed:
                return self._take()
            if timeout <= 0:
                return []
            self._event.clear()
            self._waiting = True
        deadline = time.monotonic() + timeout
        # Usually still filed from an earlier wait: then this is one attribute write, no lock
        # (the waker refiles it by ``_due`` when its tick comes).
        self._due = deadline
        try:
            while True:
                if self._tick is None:
                    _DEADLINES.add(self)
                self._event.wait()
                with lock:
                    if self._batches or self._replay or self._overflowed or self._closed:
                        return self._take()
                    if time.monotonic() >= deadline:
                        return []
                    # Woken for an earlier wait's deadline (a race with the waker, threads
                    # only): wait on. A push sets the event under this lock, so clearing it
                    # here loses no wake-up.
                    self._event.clear()
        finally:
            self._waiting = False

    def _take(self) -> list[Envelope]:
        """Everything queued, or the reason there is nothing more (``_lock`` held).

        One lock section per ``get`` that finds entries: a fan-out's subscribers each take
        one per publish.
        """
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

    def deliver_to(self, sink: Callable[[list[Envelope]], bool] | None) -> None:
        """Hand live batches to ``sink`` while the reader waits in ``get`` with nothing queued.

        ``sink(batch)`` returns whether it took the batch whole (the reader then never sees
        it); if not, the batch is queued and the reader woken as usual. It is called by the
        fan-out with this queue's lock held, so it must neither block nor switch. A stream
        writer sets one while its generator does nothing but yield this subscription's entries
        (a channel's follower): one write from the fan-out instead of a wake-up, a switch and
        the generator's round per subscriber. ``None`` removes it.
        """
        self._sink = sink

    def close(self) -> None:
        """Leave the fan-out and drop the queue; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._batches = []
            self._replay = None
            self._sink = None
        _DEADLINES.forget(self)
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
    def overflowed(self) -> bool:
        """Whether this subscriber fell too far behind and was cut off from the live tail."""
        return self._overflowed


#: the resolution of ``get``'s timeout (s): an idle ``get`` returns at most this much late
_TICK = 0.05


class _Deadlines:
    """One timer for every idle ``get`` in the process: subscriptions filed by deadline tick.

    A subscription is filed at most once. A later wait only writes its deadline (``_due``);
    when the tick it is filed under comes, the waker wakes it if its deadline passed while it
    waits, refiles it if the deadline is later, and forgets it otherwise (its next wait files
    it again). A fan-out's subscribers wait once per event, each with the same timeout: this
    costs about one refile per subscriber per timeout, where a timer per wait cost one timer
    start and cancel per subscriber per event. The waker is a daemon thread (a greenlet under
    gevent), started by a wait when none runs in the process; it ends when nothing is filed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buckets: dict[int, list[LocalSubscription]] = {}
        #: subscriptions filed and not closed: the waker ends when none is left, whatever
        #: closed ones its buckets still list (skipped: their ``_tick`` no longer matches)
        self._filed = 0
        self._wake = threading.Event()
        self._next: int | None = None
        #: the process whose waker runs now (0: none runs; it ends when nothing is filed)
        self._pid = 0

    def add(self, sub: LocalSubscription) -> None:
        start = False
        with self._lock:
            if self._pid != os.getpid():  # no waker runs here (or a forked child's first wait)
                if self._pid:
                    self._buckets = {}
                    self._filed = 0
                self._pid = os.getpid()
                self._next = None
                start = True
            if sub._tick is None and not sub._closed:
                tick = math.ceil(sub._due / _TICK)
                self._buckets.setdefault(tick, []).append(sub)
                sub._tick = tick
                self._filed += 1
                if self._next is None or tick < self._next:
                    self._wake.set()
        if start:  # outside the lock: starting a thread waits for it to run
            threading.Thread(target=self._run, name="stream-deadlines", daemon=True).start()

    def _run(self) -> None:
        while True:
            fire: list[LocalSubscription] = []
            with self._lock:
                now = time.monotonic()
                current = math.floor(now / _TICK)
                buckets = self._buckets
                for tick in [t for t in buckets if t <= current]:
                    for sub in buckets.pop(tick):
                        if sub._tick != tick:
                            continue  # closed meanwhile (``forget``)
                        due = sub._due
                        if due > now:
                            later = math.ceil(due / _TICK)
                            buckets.setdefault(later, []).append(sub)
                            sub._tick = later
                            continue
                        sub._tick = None
                        self._filed -= 1
                        if sub._waiting:
                            fire.append(sub)
                if not self._filed:
                    buckets.clear()
                    # Nothing filed: this thread ends, the next wait starts another, so an
                    # idle worker keeps no waker greenlet.
                    self._pid = 0
                    self._next = None
                    self._wake.clear()
                    exiting = True
                else:
                    self._next = min(buckets)
                    self._wake.clear()
                    exiting = False
                delay = None if self._next is None else max(0.0, self._next * _TICK - now)
            for sub in fire:
                sub._event.set()
            if exiting:
                return
            self._wake.wait(delay)

    def forget(self, sub: LocalSubscription) -> None:
        """A closed subscription no longer keeps the waker running (nor is it woken)."""
        with self._lock:
            if sub._tick is not None and self._pid == os.getpid():
                sub._tick = None
                self._filed -= 1
                if not self._filed:
                    self._wake.set()  # nothing left: the waker ends now, not at a far deadline


_DEADLINES = _Deadlines()


def _after(entry: Envelope, floor: IdTuple) -> bool:
    """Whether a queued entry is still news for a subscriber whose history reached ``floor``."""
    if entry.event == RESET:
        # A gap reset is about the entries before its first_retained_id: still news unless
        # the history already reached that far.
        payload: ResetPayload = orjson.loads(entry.data)
        first = payload["first_retained_id"]
        return first is not None and id_key(first) > floor
    return id_key(entry.id) > floor


def check_limits(max_len: int, max_age: float, queue_size: int) -> None:
    """Refuse limits no broker can honour (``ValueError``), the same way for every broker."""
    if max_len < 1 or max_age <= 0 or queue_size < 1:
        raise ValueError("max_len and queue_size must be >= 1 and max_age > 0")


def fan_out(
    subs: Sequence[LocalSubscription], batches: Sequence[FanoutBatch]
) -> list[LocalSubscription]:
    """Push every batch to every subscriber; returns those that overflowed (cut off).

    One list of encode-once envelopes per batch for all of them (the log keeps its own). Each
    subscriber gets every batch before it is woken up: one wake-up (and one coalesced write)
    for what piled up while it was busy; a subscriber waiting with nothing queued gets it from
    its sink, written from here. ``FANOUT_SLICE`` subscribers at a time with a yield in
    between, so 10,000 local subscribers do not hold publishers and other streams back; after
    a slice that waited for a CPU the yield is a ``FANOUT_BACKOFF`` sleep. A fan-out to more
    than one slice first waits for one of the ``FANOUT_SLOTS``.
    """
    live: list[tuple[list[Envelope], IdTuple, IdTuple, str | None]] = [
        ([SharedEnvelope(*entry) for entry in entries], first, last, gap)
        for entries, first, last, gap in batches
        if entries
    ]
    dropped: list[LocalSubscription] = []
    slot = _take_slot() if len(subs) > FANOUT_SLICE else None
    try:
        slice_start, slice_cpu = time.monotonic(), time.thread_time()
        for index, sub in enumerate(subs):
            if index and index % FANOUT_SLICE == 0:
                # Wall time minus CPU time: how long this slice waited for a core (nothing in
                # it blocks: a subscriber's lock is never held across a switch, a sink never
                # blocks).
                waited = (time.monotonic() - slice_start) - (time.thread_time() - slice_cpu)
                time.sleep(FANOUT_BACKOFF if waited > FANOUT_CONTENDED else _YIELD)
                slice_start, slice_cpu = time.monotonic(), time.thread_time()
            for envelopes, first, last, gap in live:
                if not sub.push(envelopes, first, last, gap):
                    dropped.append(sub)
                    break
    finally:
        if slot is not None:
            slot.close()
    return dropped


def _slot_group() -> str:
    """The processes that share ``FANOUT_SLOTS``: a server's workers are its master's children."""
    return f"stream-fanout-{os.getppid()}"


def _take_slot() -> _socket.socket | None:
    """One of ``FANOUT_SLOTS``, waited for: a Unix socket bound to the slot's abstract name,
    which no other socket can bind until this one is closed (or its process ends). None when
    there is no limit, or no abstract namespace to keep it in."""
    if FANOUT_SLOTS < 1:
        return None
    group = _slot_group()
    while True:
        for index in range(FANOUT_SLOTS):
            slot = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            try:
                slot.bind(f"\0{group}-{index}".encode())
            except OSError as exc:
                slot.close()
                if exc.errno != errno.EADDRINUSE:
                    return None
                continue
            return slot
        time.sleep(_SLOT_POLL)
