"""The Redis Streams broker: many workers on many machines share one log per key.

The only module that imports ``redis`` (redis-py: the imports here are absolute, so this
module's own name does not shadow it). The protocol it implements is ``stream.broker.base``.
Layout of the keys (``prefix`` is ``"stream:"``)::

    stream:log:<key>     the log, a Redis stream (entries below)
    stream:meta:<key>    the metadata, a JSON string
    stream:wake:<uuid>   one per broker instance: an XADD to it interrupts the reader's XREAD
    stream:health:<uuid> one per broker instance: the write that ``healthy()`` probes with

A log entry holds the values of one publish, up to 4,096 of them and 64 KiB (a larger value
gets an entry of its own): ``n`` the number of values, ``e`` their event type (or ``E``, a JSON
array of one type per value), ``d`` the values' JSON texts one after the other and ``l`` their
lengths (comma-separated, when ``n`` > 1), ``c`` the key's value count up to this entry's last
value, and ``m`` when the next entry continues the same publish. The values' ids are reserved
consecutively, as ``XADD *`` would have numbered single values: an entry's id is its last
value's, its first is ``<ms>-<seq - n + 1>``. Entries written before this layout (fields ``e``
and ``d`` only) read as one value each. Packing is what bounds the work: a 1 MiB NDJSON body of
524,000 one-digit values is 128 entries, one script call of a few milliseconds, where one entry
per value held Redis for two seconds and stalled every other client.

One reader per broker instance (per worker process): a daemon thread (a greenlet under gevent)
does a blocking ``XREAD`` over every key that has local subscribers, each from an explicit id it
keeps (never ``$``), and fans the entries out to the local bounded queues. Clients never get a
Redis connection of their own. When Redis is unreachable the reader logs once, backs off
(capped) and resumes from its ids when Redis is back: nothing lost, nothing twice.

What a publish guarantees (the contract's "all or nothing, and every live subscriber gets all of
it, or a reset"):

- A publish of up to 256 entries and 8 MiB (any body the service accepts: 1 MiB) is one script
  call: no other client runs in between, so nobody, reader or replay, ever sees part of it.
  Redis does not roll a script back, but it refuses a script for memory or a read-only role
  only at its first write, and every write of this one follows its reads and checks: a refused
  publish appended nothing. Unreachable or timed out before the reply: the caller cannot know
  (``BrokerUnavailable``), as with any write to a remote store.
- A larger publish (a broker call from code, not a request) is split into several such calls,
  in order; each is atomic, together they are not: when a later call fails, the earlier ones
  stay in the log (the caller gets ``BrokerUnavailable``, readers may have delivered them).
  Entries of an unfinished split publish carry ``m``: the reader holds them back until the
  publish's last entry arrives, so live subscribers still get it as one batch.
- Live subscribers get the whole publish even when it is longer than the history: the publish
  script never removes the entries it just added. It only marks the values beyond ``max_len``
  as trimmed (``max-deleted-entry-id``, which replays respect); the next publish removes them.
  The one way a live subscriber misses values is its worker's reader falling behind that
  removal (or behind the age trim): the reader sees a jump in ``c`` and gives every subscriber
  that has not seen past it a ``reset`` envelope (``first_retained_id`` the first id it has),
  then the entries: never a silent gap.

Deliberate departures, so nobody "fixes" them:

- Publishing is one Lua script (atomic like MULTI, one round trip) instead of a pipeline of
  ``XADD MAXLEN ~``: Redis 7.0 does not record trimmed ids in ``max-deleted-entry-id`` (only
  XDEL does), so the script trims exactly (length, then age by the server's clock) and records
  the newest trimmed id itself with ``XSETID ... MAXDELETEDID``. That id, which lives, persists
  and expires with the stream, is what makes ``reset`` exact. The script also keeps
  ``entries-added`` equal to the number of values ever published (``XSETID ... ENTRIESADDED``),
  which is where ``c`` continues from, even when the log is empty.
- Subscribing also runs a (read) script: it applies the same age trim first, so an idle log
  still ages out when someone reads it, and reads the history atomically with the trim marker.
- A ``Last-Event-ID`` ahead of the log (greater than its newest id: an id from a primary lost
  in a failover whose replica's clock is behind) gets a ``reset`` and then the live tail, every
  new entry included although its id is smaller, as in process.
- Every failure that means "Redis cannot serve this now" raises ``BrokerUnavailable`` (one
  place: ``_translated``): unreachable, timed out (also paused), loading, out of memory,
  read-only (a replica), a lost primary, ``BUSY``/``TRYAGAIN``/``MISCONF``/``NOREPLICAS``.
  Other errors (a key of the wrong type) are bugs and propagate. ``healthy()`` probes with a
  tiny expiring write, so an out-of-memory or read-only Redis reports unhealthy.
- Redis-py's automatic retries are off: a retried publish whose first attempt did reach Redis
  would append twice. A failed call raises ``BrokerUnavailable`` and the caller decides.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import orjson

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import (
        BusyLoadingError,
        ClusterDownError,
        OutOfMemoryError,
        ReadOnlyError,
        RedisError,
        ResponseError,
        TryAgainError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ModuleNotFoundError as exc:
    from stream._extras import missing

    raise missing("redis", exc) from exc

from stream.broker.base import (
    BrokerUnavailable,
    LocalSubscription,
    Subscription,
    check_limits,
    fan_out,
    id_key,
    parse_id,
    reset_envelope,
    resume_after,
)
from stream.event import Envelope
from stream.wire import MESSAGE

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

#: Errors that mean "Redis cannot serve us right now": down, slow, paused, loading, out of
#: memory, read-only (a replica), a primary it lost (MasterDownError is a ClusterDownError).
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
)
#: The same, by the error code that starts a reply redis-py has no class for.
_UNAVAILABLE_CODES = frozenset(
    {"OOM", "READONLY", "LOADING", "MASTERDOWN", "BUSY", "TRYAGAIN", "MISCONF", "NOREPLICAS",
     "CLUSTERDOWN"}
)  # fmt: skip
#: Longest pause between reconnection attempts of the reader (seconds).
_MAX_BACKOFF = 5.0
#: Entries per key per XREAD: a backlog is read in slices, not in one huge reply.
_READ_COUNT = 256
#: One log entry holds up to this many values of one publish, and this many bytes of them
#: (a larger value gets an entry of its own).
_ENTRY_VALUES = 4096
_ENTRY_BYTES = 64 * 1024
#: One publish script call appends at most this many entries and bytes (a 1 MiB body of tiny
#: values is 128 entries): what bounds the time Redis spends on one call.
_CALL_ENTRIES = 256
_CALL_BYTES = 8 * 2**20
_MAX_ID = "18446744073709551615-18446744073709551615"
#: the placeholder type of an entry without ``e`` (its values carry theirs in ``E``)
_MESSAGE = MESSAGE.encode()

_LUA_COMMON = """
local function info(key)
  local raw = redis.call('XINFO', 'STREAM', key)
  local out = {}
  for i = 1, #raw, 2 do out[raw[i]] = raw[i + 1] end
  return out
end

local function fields(flat)
  local out = {}
  for i = 1, #flat, 2 do out[flat[i]] = flat[i + 1] end
  return out
end

-- Ids as (ms, seq) numbers: exact up to 2^53, far beyond what clocks and counters reach.
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function fmt(ms, seq)
  return string.format('%.0f-%.0f', ms, seq)
end

local function later(a, b)
  if not a then return b end
  if not b then return a end
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  if ams > bms or (ams == bms and aseq > bseq) then return a end
  return b
end

-- Trim entries older than max_age_ms (by the server's clock, the clock of the ids). Returns
-- the newest trimmed id, or false.
local function trim_age(key, max_age_ms)
  local now = redis.call('TIME')
  local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - max_age_ms
  if cutoff <= 0 then return false end
  local min_id = string.format('%.0f', cutoff) .. '-0'
  local old = redis.call('XREVRANGE', key, '(' .. min_id, '-', 'COUNT', 1)
  if #old == 0 then return false end
  redis.call('XTRIM', key, 'MINID', min_id)
  return old[1][1]
end
"""

# KEYS[1] log; ARGV[1] max_len, ARGV[2] max_age_ms, ARGV[3] '1' when later calls continue this
# publish, then five arguments per entry: n (values), 'e' or 'E', the event (or a JSON array
# of events), the values' lengths (comma-separated, '' for one value), the values. Returns the
# first id of this call as {ms, seq}: the values' ids are ms-seq, ms-(seq + 1), ...
_LUA_PUBLISH = (
    _LUA_COMMON
    + """
local key = KEYS[1]
local max_len, max_age_ms, more = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local top_ms, top_seq, added, deleted = 0, 0, 0, false
if redis.call('EXISTS', key) == 1 then
  local i = info(key)
  top_ms, top_seq = parse(i['last-generated-id'])
  added = i['entries-added']
  if i['max-deleted-entry-id'] ~= '0-0' then deleted = i['max-deleted-entry-id'] end
end
-- Reserve consecutive ids for every value, in one millisecond, as XADD * would number them.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ms, seq = now_ms, 0
if now_ms <= top_ms then ms, seq = top_ms, top_seq + 1 end
local first_seq, first_pos = seq, added + 1
local entries = (#ARGV - 3) / 5
local pos, last_id = added, false
for k = 0, entries - 1 do
  local b = 4 + k * 5
  local n = tonumber(ARGV[b])
  seq = seq + n
  pos = pos + n
  last_id = fmt(ms, seq - 1)
  local f = {'n', ARGV[b], 'c', pos, ARGV[b + 1], ARGV[b + 2], 'd', ARGV[b + 4]}
  if n > 1 then f[#f + 1] = 'l'; f[#f + 1] = ARGV[b + 3] end
  if k < entries - 1 or more == '1' then f[#f + 1] = 'm'; f[#f + 1] = '1' end
  redis.call('XADD', key, last_id, unpack(f))
end
-- Length: positions up to `target` are out of the history. Entries of this publish are never
-- removed here, only marked (max-deleted-entry-id): the per-worker readers have not read them
-- yet, and live subscribers get a publish whole. Older entries go, at most 1024 per call.
local target = pos - max_len
if target > 0 then
  if target >= first_pos then
    deleted = later(deleted, fmt(ms, first_seq + target - first_pos))
  end
  local old = redis.call('XRANGE', key, '-', '(' .. fmt(ms, first_seq), 'COUNT', 1025)
  local keep = fmt(ms, first_seq)
  local gone = false
  local length = redis.call('XLEN', key)
  for idx, e in ipairs(old) do
    local f = fields(e[2])
    local c, n = tonumber(f['c'] or '0'), tonumber(f['n'] or '1')
    if not f['c'] then
      -- An entry from before positions were recorded (one value, older than every entry
      -- that has one): it goes only while more than max_len entries, so values, stay.
      c = target + 1
      if length - (idx - 1) > max_len then c = target end
    end
    if idx > 1024 or c > target then
      keep = e[1]
      if c - n < target then  -- the entry holds the boundary: mark the values before it
        local ems, eseq = parse(e[1])
        deleted = later(deleted, fmt(ems, eseq - (c - target)))
      end
      break
    end
    gone = e[1]
  end
  if gone then
    redis.call('XTRIM', key, 'MINID', keep)
    deleted = later(deleted, gone)
  end
end
deleted = later(deleted, trim_age(key, max_age_ms))
local setid = {'XSETID', key, last_id, 'ENTRIESADDED', pos}
if deleted then setid[#setid + 1] = 'MAXDELETEDID'; setid[#setid + 1] = deleted end
redis.call(unpack(setid))
return {string.format('%.0f', ms), string.format('%.0f', first_seq)}
"""
)

# KEYS[1] log; ARGV[1] max_age_ms, ARGV[2] what to read: '' nothing, '-' all, else the entries
# after that id. Returns {exists, max-deleted-entry-id, last-generated-id, entries-added,
# entries}, all read atomically after the age trim.
_LUA_READ = (
    _LUA_COMMON
    + """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return {0, false, false, 0, {}} end
local gone = trim_age(key, tonumber(ARGV[1]))
local i = info(key)
if gone then
  local deleted = i['max-deleted-entry-id']
  if deleted == '0-0' then deleted = false end
  deleted = later(deleted, gone)
  redis.call('XSETID', key, i['last-generated-id'], 'MAXDELETEDID', deleted)
  i['max-deleted-entry-id'] = deleted
end
local entries = {}
if ARGV[2] == '-' then
  entries = redis.call('XRANGE', key, '-', '+')
elseif ARGV[2] ~= '' then
  entries = redis.call('XRANGE', key, '(' .. ARGV[2], '+')
end
return {1, i['max-deleted-entry-id'], i['last-generated-id'], i['entries-added'], entries}
"""
)


#: Redis connections one worker opens at most; more concurrent callers wait for a free one.
MAX_CONNECTIONS = 64


def _client(url: str, socket_timeout: float, connect_timeout: float) -> redis.Redis:
    # A bounded, blocking pool: a burst of subscribes (a thousand clients reconnecting after a
    # deploy) would otherwise open a connection each and be refused by Redis' limits.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),
        protocol=2,
    )
    return redis.Redis(connection_pool=pool)


def _unavailable(exc: RedisError) -> bool:
    """Whether a Redis error means "cannot serve this now" rather than a bug in the call."""
    if isinstance(exc, _UNAVAILABLE):
        return True
    if isinstance(exc, ResponseError):
        # redis-py strips the codes it knows into status_code; others stay in the message.
        code = exc.status_code or str(exc).partition(" ")[0]
        return code in _UNAVAILABLE_CODES
    return False


@contextmanager
def _translated() -> Iterator[None]:
    """Turn every "Redis cannot serve this now" error into ``BrokerUnavailable``."""
    try:
        yield
    except RedisError as exc:
        if _unavailable(exc):
            raise BrokerUnavailable(f"Redis cannot serve this now: {exc}") from exc
        raise


def _pack(items: Sequence[tuple[str, bytes]]) -> list[list[Any]]:
    """The publish script's arguments for ``items``, split into calls of bounded size."""
    calls: list[list[Any]] = []
    call: list[Any] = []
    call_bytes = 0
    start, total = 0, len(items)
    while start < total:
        # One entry: up to _ENTRY_VALUES values and _ENTRY_BYTES bytes (at least one value).
        end = min(start + _ENTRY_VALUES, total)
        size = 0
        for index in range(start, end):
            size += len(items[index][1])
            if size > _ENTRY_BYTES and index > start:
                end = index
                size -= len(items[index][1])
                break
        group = items[start:end]
        start = end
        if call and (len(call) // 5 >= _CALL_ENTRIES or call_bytes + size > _CALL_BYTES):
            calls.append(call)
            call, call_bytes = [], 0
        event = group[0][0]
        if all(e == event for e, _ in group):
            call += (len(group), "e", event)
        else:
            call += (len(group), "E", orjson.dumps([e for e, _ in group]))
        if len(group) == 1:
            call += ("", group[0][1])
        else:
            call += (",".join([str(len(d)) for _, d in group]), b"".join([d for _, d in group]))
        call_bytes += size
    calls.append(call)
    return calls


def _unpack(entry_id: str, fields: dict[bytes, bytes]) -> list[Envelope]:
    """The envelopes of one log entry (one value, or many whose ids end at the entry's)."""
    data = fields.get(b"d", b"null")
    raw_events = fields.get(b"E")
    event = fields.get(b"e", _MESSAGE).decode()
    n = int(fields.get(b"n", b"1"))
    if n == 1:
        if raw_events is not None:
            event = orjson.loads(raw_events)[0]
        return [Envelope(entry_id, event, data)]
    ms, _, seq = entry_id.partition("-")
    first = int(seq) - n + 1
    prefix = ms + "-"
    events: list[str] = orjson.loads(raw_events) if raw_events is not None else [event] * n
    out: list[Envelope] = []
    offset = 0
    for index, length in enumerate(fields[b"l"].split(b",")):
        end = offset + int(length)
        out.append(Envelope(f"{prefix}{first + index}", events[index], data[offset:end]))
        offset = end
    return out


def _position(fields: dict[bytes, bytes]) -> tuple[int, int] | None:
    """(values before this entry, values up to its end) in the key's history, if recorded."""
    c = fields.get(b"c")
    if c is None:
        return None  # an entry from before positions were recorded: no gap check
    end = int(c)
    return end - int(fields.get(b"n", b"1")), end


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class _Follow:
    """What the reader knows of one key with local subscribers."""

    __slots__ = ("cursor", "position", "partial", "partial_gap")

    def __init__(self, cursor: str, position: int | None) -> None:
        #: the newest entry id read
        self.cursor = cursor
        #: how many values the key had up to ``cursor`` (None: unknown, no gap check)
        self.position = position
        #: the read entries of a publish whose last entry is still to come
        self.partial: list[Envelope] = []
        #: the cursor before a gap that precedes ``partial``, if one does
        self.partial_gap: str | None = None


class RedisBroker:
    """Logs on Redis Streams, one shared reader thread per instance, local bounded queues."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        max_len: int = 10_000,
        max_age: float = 3600.0,
        queue_size: int = 10_000,
        prefix: str = "stream:",
        block: float = 1.0,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
    ) -> None:
        check_limits(max_len, max_age, queue_size)
        self.max_len = max_len
        self.max_age = max_age
        self.queue_size = queue_size
        self.prefix = prefix
        self.block = block
        self._redis = _client(url, socket_timeout, connect_timeout)
        # The reader's socket timeout must outlast its BLOCK, or every quiet read would fail.
        self._reader_redis = _client(url, block + socket_timeout, connect_timeout)
        self._health_redis = _client(url, 1.0, 1.0)
        self._publish_script = self._redis.register_script(_LUA_PUBLISH)
        self._read_script = self._redis.register_script(_LUA_READ)
        self._max_age_ms = _ms(max_age)
        self._lock = threading.Lock()
        self._subs: dict[str, dict[LocalSubscription, None]] = {}
        #: per key with local subscribers: how far the reader has fanned out
        self._follows: dict[str, _Follow] = {}
        self._wake_key = f"{prefix}wake:{uuid.uuid4().hex}"
        self._wake_id = "0-0"
        self._health_key = f"{prefix}health:{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _log_key(self, key: str) -> str:
        return f"{self.prefix}log:{key}"

    def _meta_key(self, key: str) -> str:
        return f"{self.prefix}meta:{key}"

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, key: str, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Append ``(event type, JSON bytes)`` items in order; return their ids.

        Atomic up to ``_CALL_ENTRIES`` entries and ``_CALL_BYTES`` bytes (any 1 MiB body);
        see the module docstring for larger ones.
        """
        if not items:
            return []
        if self._closed:
            raise BrokerUnavailable("the broker was closed")
        calls = _pack(items)
        ids: list[str] = []
        log_key = self._log_key(key)
        for number, call in enumerate(calls, 1):
            more = "1" if number < len(calls) else ""
            with _translated():
                reply = self._publish_script(
                    keys=[log_key], args=[self.max_len, self._max_age_ms, more, *call]
                )
            ms, seq = (part.decode() for part in cast(list[bytes], reply))
            first = int(seq)
            values = sum(cast(int, n) for n in call[::5])
            ids += [f"{ms}-{first + i}" for i in range(values)]
        return ids

    # -- subscribing --------------------------------------------------------------------------

    def _read(self, key: str, what: str) -> tuple[bool, str | None, str | None, int, list[Any]]:
        """Trim by age, then read atomically: exists, newest trimmed id, newest id, values
        added so far, entries (id, fields)."""
        with _translated():
            reply = self._read_script(keys=[self._log_key(key)], args=[self._max_age_ms, what])
        exists, deleted, top, added, entries = cast(list[Any], reply)
        if deleted == b"0-0":
            deleted = None
        return (
            bool(exists),
            None if deleted is None else deleted.decode(),
            None if top is None else top.decode(),
            int(added),
            [
                (entry_id.decode(), dict(zip(flat[::2], flat[1::2], strict=True)))
                for entry_id, flat in entries
            ],
        )

    def subscribe(
        self, key: str, last_id: str | None = None, *, from_start: bool = False
    ) -> Subscription:
        """Follow ``key``: new entries only, the whole log (``from_start``) or after ``last_id``."""
        after = resume_after(last_id)
        replaying = after is not None or from_start
        # 1. Register for the live tail first. A key new to this process needs a starting id for
        # the reader: the newest id now, read before registering, so it is <= any later history.
        while True:
            start: _Follow | None = None
            if key not in self._follows:
                _, _, newest_id, added, _ = self._read(key, "")
                start = _Follow(newest_id or "0-0", added)
            with self._lock:
                if self._closed:
                    raise BrokerUnavailable("the broker was closed")
                created = key not in self._follows
                if created and start is None:
                    continue  # its last subscriber left meanwhile: read the newest id again
                if created:
                    assert start is not None
                    self._follows[key] = start
                    self._subs[key] = {}
                # A replaying subscriber takes every live entry until its history is read: a
                # resume id ahead of the log must not hide the entries published meanwhile.
                floor = None if replaying or start is None else id_key(start.cursor)
                sub = LocalSubscription(key, self.queue_size, self._unsubscribe, floor)
                self._subs[key][sub] = None
                break
        if created:
            self._start_reader()
        # 2. Then read the history; 3. drop live entries at or below what the history reached.
        if not replaying and start is not None:
            return sub  # a channel on a new key: the newest id read above is the floor
        try:
            what = "" if not replaying else "-" if after is None else str(last_id)
            if after is not None and last_id == _MAX_ID:
                what = ""  # nothing can follow it, and "(<max>" is not a valid range start
            exists, deleted, newest, _, history = self._read(key, what)
        except BaseException:
            sub.close()
            raise
        replay: list[Envelope] = []
        top = id_key(newest) if newest is not None else None
        if not replaying:
            floor = top
        else:
            bound = id_key(deleted) if deleted is not None else None
            if after is not None and (bound is None or after > bound):
                bound = after
            for entry_id, fields in history:
                values = _unpack(entry_id, fields)
                if bound is not None and id_key(values[0].id) <= bound:
                    values = [v for v in values if id_key(v.id) > bound]
                replay += values
            if after is not None:
                if not exists or (deleted is not None and after < id_key(deleted)):
                    replay.insert(0, reset_envelope(str(last_id), replay[0].id if replay else None))
                elif top is not None and after > top:
                    # Ahead of the log: say so, then every new entry, whatever its id.
                    replay.insert(0, reset_envelope(str(last_id), None))
            # The floor for live entries: what the history reached. Not an id beyond the log
            # (ahead, or a key that does not exist): new entries may come below it.
            reached = [top] if top is not None else []
            if after is not None and top is not None and after <= top:
                reached.append(after)
            floor = max(reached) if reached else None
        with self._lock:
            sub.start(replay, floor)
        return sub

    def _unsubscribe(self, sub: LocalSubscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.key)
            if subs is not None:
                subs.pop(sub, None)
                if not subs:
                    del self._subs[sub.key]
                    del self._follows[sub.key]

    def subscriber_count(self, key: str | None = None) -> int:
        """How many local subscriptions follow ``key`` (all keys when ``None``) right now."""
        with self._lock:
            if key is None:
                return sum(len(subs) for subs in self._subs.values())
            return len(self._subs.get(key, ()))

    # -- the reader ---------------------------------------------------------------------------

    def _start_reader(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(
                        target=self._run, name="stream-redis-reader", daemon=True
                    )
                    self._thread.start()
        # A new key must not wait for the current XREAD's BLOCK to run out.
        self._wake()

    def _wake(self) -> None:
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1, approximate=False)
            pipe.pexpire(self._wake_key, 60_000)
            pipe.execute()
        except RedisError:
            pass  # the reader picks the key up at its next read anyway, within `block` s

    def _run(self) -> None:
        """The reader: XREAD every subscribed key from its id, fan out, survive outages."""
        delay = 0.0
        down = False
        while not self._stop.is_set():
            with self._lock:
                follows = dict(self._follows)
            names = {self._log_key(key): key for key in follows}
            streams: dict[Any, Any] = {self._wake_key: self._wake_id}
            streams.update({self._log_key(key): f.cursor for key, f in follows.items()})
            try:
                reply = self._reader_redis.xread(
                    streams, count=_READ_COUNT, block=max(1, round(self.block * 1000))
                )
                if down:
                    log.warning("Redis is reachable again; the reader resumes from its ids")
                    down = False
                delay = 0.0
                self._dispatch(reply, names, follows)
            except Exception as exc:  # never let the one reader die: every subscriber needs it
                if self._stop.is_set():
                    break
                if isinstance(exc, RedisError) and _unavailable(exc):
                    # An outage: said once, and once when it is over.
                    if not down:
                        log.warning("Redis reader cannot read (%s); retrying with backoff", exc)
                        down = True
                else:
                    # A bug or a wrong key (WRONGTYPE...): each time, with its traceback, so it
                    # is not hidden behind an earlier outage (the backoff bounds the rate).
                    log.exception("Redis reader failed; retrying with backoff")
                delay = min(max(delay * 2, 0.05), _MAX_BACKOFF)
                self._stop.wait(delay)

    def _dispatch(self, reply: Any, names: dict[str, str], follows: dict[str, _Follow]) -> None:
        """Fan one XREAD reply out to the local queues and advance the cursors."""
        if not reply:
            return
        pairs = reply.items() if isinstance(reply, dict) else reply
        for raw_name, entries in pairs:
            if not entries:
                continue
            name = raw_name.decode()
            if name == self._wake_key:
                self._wake_id = entries[-1][0].decode()
                continue
            key = names.get(name)
            if key is None:
                continue
            follow = follows[key]
            # Split the slice at gaps: values the publish script or the age trim removed
            # before this reader got to them. Subscribers get a reset there, never silence.
            segments: list[tuple[list[Envelope], str | None]] = []
            batch, gap_after = follow.partial, follow.partial_gap
            position, cursor = follow.position, follow.cursor
            complete = 0  # how many envelopes of `batch` end a publish
            for raw_id, fields in entries:
                entry_id = raw_id.decode()
                where = _position(fields)
                if where is not None and position is not None and where[0] != position:
                    if batch:
                        segments.append((batch, gap_after))
                    batch, gap_after, complete = [], cursor, 0
                batch += _unpack(entry_id, fields)
                if b"m" not in fields:
                    complete = len(batch)
                position = None if where is None else where[1]
                cursor = entry_id
            # Values of a publish whose last entry is not read yet wait for it: a subscriber
            # gets a publish in one batch (it counts once against its queue).
            partial, partial_gap = batch[complete:], gap_after
            if complete:
                segments.append((batch[:complete], gap_after))
                partial_gap = None
            with self._lock:
                # The key's subscribers all left (and maybe came back with a new id) while we
                # read: this slice belongs to nobody, the next read starts from the new id.
                if self._follows.get(key) is not follow:
                    continue
                follow.cursor, follow.position = cursor, position
                follow.partial, follow.partial_gap = partial, partial_gap
                subs = list(self._subs[key])
            # Pushed outside the lock (fan_out yields between slices). One that subscribes
            # meanwhile reads its history after the cursor moved past this slice: it is in
            # that history (or before the position it asked for).
            dropped = fan_out(
                subs,
                [
                    (segment, id_key(segment[0].id), id_key(segment[-1].id), gap)
                    for segment, gap in segments
                    if segment
                ],
            )
            if dropped:
                with self._lock:
                    current = self._subs.get(key)
                    if current is not None and self._follows.get(key) is follow:
                        for sub in dropped:
                            current.pop(sub, None)
                        if not current:
                            del self._subs[key]
                            del self._follows[key]

    # -- metadata, expiry, lifecycle ----------------------------------------------------------

    def valid_id(self, value: str) -> bool:
        """Whether ``value`` is a Redis stream id ``"<ms>-<seq>"``."""
        return parse_id(value) is not None

    def set_meta(self, key: str, meta: dict[str, Any], ttl: float | None = None) -> None:
        """Store JSON-able metadata; ``ttl`` (s) expires key, meta and log, ``None`` keeps it."""
        data = orjson.dumps(meta)
        with _translated():
            pipe = self._redis.pipeline(transaction=True)
            if ttl is None:
                pipe.set(self._meta_key(key), data, keepttl=True)
            else:
                pipe.set(self._meta_key(key), data, px=_ms(ttl))
                pipe.pexpire(self._log_key(key), _ms(ttl))
            pipe.execute()

    def get_meta(self, key: str) -> dict[str, Any] | None:
        """The metadata stored for ``key``, or ``None``."""
        with _translated():
            data = self._redis.get(self._meta_key(key))
        if data is None:
            return None
        meta: dict[str, Any] = orjson.loads(cast(bytes, data))
        return meta

    def expire(self, key: str, ttl: float) -> None:
        """Make the log and the metadata of ``key`` disappear after ``ttl`` seconds."""
        with _translated():
            pipe = self._redis.pipeline(transaction=True)
            pipe.pexpire(self._log_key(key), _ms(ttl))
            pipe.pexpire(self._meta_key(key), _ms(ttl))
            pipe.execute()

    def healthy(self) -> bool:
        """Whether Redis accepts a small write within about a second.

        A write, not a PING: an out-of-memory or read-only Redis answers PING but refuses
        every publish. The probe key is this instance's own and expires by itself.
        """
        try:
            return bool(self._health_redis.set(self._health_key, b"1", px=10_000))
        except RedisError:
            return False

    def close(self) -> None:
        """Stop the reader, end every subscription (their ``get`` raises), drop connections."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for subs in self._subs.values():
                for sub in subs:
                    sub.abort()
            self._subs.clear()
            self._follows.clear()
            thread = self._thread
        self._stop.set()
        if thread is not None:
            self._wake()
            thread.join(self.block + 2.0)
        for client in (self._redis, self._reader_redis, self._health_redis):
            client.close()
