"""The Redis Streams broker: many workers on many machines share one log per key.

The only module that imports ``redis``. Layout of the keys (``prefix`` is ``"stream:"``)::

    stream:log:<key>     the log, a Redis stream; entry fields ``e`` (event type), ``d`` (JSON)
    stream:meta:<key>    the metadata, a JSON string
    stream:wake:<uuid>   one per broker instance: an XADD to it interrupts the reader's XREAD

One reader per broker instance (per worker process): a daemon thread (a greenlet under gevent)
does a blocking ``XREAD`` over every key that has local subscribers, each from an explicit id it
keeps (never ``$``), and fans the entries out to the local bounded queues. Clients never get a
Redis connection of their own. When Redis is unreachable the reader logs once, backs off
(capped) and resumes from its ids when Redis is back: nothing lost, nothing twice.

Deliberate departures, so nobody "fixes" them:

- Publishing is one Lua script (atomic like MULTI, one round trip) instead of a pipeline of
  ``XADD MAXLEN ~``: Redis 7.0 does not record trimmed ids in ``max-deleted-entry-id`` (only
  XDEL does), so the script trims exactly (length, then age by the server's clock) and records
  the newest trimmed id itself with ``XSETID ... MAXDELETEDID``. That id, which lives, persists
  and expires with the stream, is what makes ``reset`` exact.
- Subscribing also runs a (read) script: it applies the same age trim first, so an idle log
  still ages out when someone reads it, and reads the history atomically with the trim marker.
- Redis-py's automatic retries are off: a retried publish whose first attempt did reach Redis
  would append twice. A failed call raises ``BrokerUnavailable`` and the caller decides.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Sequence
from typing import Any, cast

import orjson

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ReadOnlyError, RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry
except ModuleNotFoundError as exc:
    from stream._extras import missing

    raise missing("redis", exc) from exc

from stream.broker import (
    BrokerUnavailable,
    IdTuple,
    LocalSubscription,
    Subscription,
    _check_limits,
    _id_key,
    parse_id,
    reset_envelope,
)
from stream.event import Envelope

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

#: Errors that mean "Redis cannot serve us right now" (BusyLoadingError is a ConnectionError).
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError)
#: Longest pause between reconnection attempts of the reader (seconds).
_MAX_BACKOFF = 5.0
#: Entries per key per XREAD: a backlog is read in slices, not in one huge reply.
_READ_COUNT = 1000
_MAX_ID = "18446744073709551615-18446744073709551615"

_LUA_TRIM = """
local function info(key)
  local raw = redis.call('XINFO', 'STREAM', key)
  local out = {}
  for i = 1, #raw, 2 do out[raw[i]] = raw[i + 1] end
  return out
end

-- Trim to max_len entries and to entries younger than max_age_ms (by the server's clock, the
-- clock of the ids), and record the newest trimmed id as the stream's max-deleted-entry-id.
local function trim(key, max_len, max_age_ms)
  local newest = false
  local excess = redis.call('XLEN', key) - max_len
  if excess > 0 then
    local gone = redis.call('XRANGE', key, '-', '+', 'COUNT', excess)
    newest = gone[#gone][1]
    redis.call('XTRIM', key, 'MAXLEN', max_len)
  end
  local now = redis.call('TIME')
  local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - max_age_ms
  if cutoff > 0 then
    local min_id = string.format('%.0f', cutoff) .. '-0'
    local old = redis.call('XREVRANGE', key, '(' .. min_id, '-', 'COUNT', 1)
    if #old > 0 then
      newest = old[1][1]
      redis.call('XTRIM', key, 'MINID', min_id)
    end
  end
  if newest then
    redis.call('XSETID', key, info(key)['last-generated-id'], 'MAXDELETEDID', newest)
  end
end
"""

# KEYS[1] log; ARGV[1] max_len, ARGV[2] max_age_ms, then (event, data) pairs. Returns the ids.
_LUA_PUBLISH = (
    _LUA_TRIM
    + """
local key = KEYS[1]
local ids = {}
for i = 3, #ARGV, 2 do
  ids[#ids + 1] = redis.call('XADD', key, '*', 'e', ARGV[i], 'd', ARGV[i + 1])
end
trim(key, tonumber(ARGV[1]), tonumber(ARGV[2]))
return ids
"""
)

# KEYS[1] log; ARGV[1] max_len, ARGV[2] max_age_ms, ARGV[3] what to read: '' nothing, '-' all,
# else the entries after that id. Returns {exists, max-deleted-entry-id, last-generated-id,
# entries}, all read atomically after the age trim.
_LUA_READ = (
    _LUA_TRIM
    + """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return {0, false, false, {}} end
trim(key, tonumber(ARGV[1]), tonumber(ARGV[2]))
local i = info(key)
local entries = {}
if ARGV[3] == '-' then
  entries = redis.call('XRANGE', key, '-', '+')
elseif ARGV[3] ~= '' then
  entries = redis.call('XRANGE', key, '(' .. ARGV[3], '+')
end
return {1, i['max-deleted-entry-id'], i['last-generated-id'], entries}
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


def _envelope(entry_id: bytes, fields: Sequence[bytes]) -> Envelope:
    """An Envelope from an entry as a script returns it (a flat field/value list)."""
    event, data = b"message", b"null"
    for name, value in zip(fields[::2], fields[1::2], strict=True):
        if name == b"e":
            event = value
        elif name == b"d":
            data = value
    return Envelope(entry_id.decode(), event.decode(), data)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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
        _check_limits(max_len, max_age, queue_size)
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
        self._limits = (max_len, _ms(max_age))
        self._lock = threading.Lock()
        self._subs: dict[str, dict[LocalSubscription, None]] = {}
        #: per key with local subscribers: the id the reader has fanned out up to
        self._cursors: dict[str, str] = {}
        self._wake_key = f"{prefix}wake:{uuid.uuid4().hex}"
        self._wake_id = "0-0"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _log_key(self, key: str) -> str:
        return f"{self.prefix}log:{key}"

    def _meta_key(self, key: str) -> str:
        return f"{self.prefix}meta:{key}"

    # -- publishing ---------------------------------------------------------------------------

    def publish(self, key: str, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Append ``(event type, JSON bytes)`` items atomically and in order; return their ids."""
        if not items:
            return []
        if self._closed:
            raise BrokerUnavailable("the broker was closed")
        args: list[Any] = [*self._limits]
        for event, data in items:
            args += (event, data)
        try:
            ids = self._publish_script(keys=[self._log_key(key)], args=args)
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unavailable: {exc}") from exc
        return [entry_id.decode() for entry_id in cast(list[bytes], ids)]

    # -- subscribing --------------------------------------------------------------------------

    def _read(self, key: str, what: str) -> tuple[bool, str | None, str | None, list[Envelope]]:
        """Trim by age, then read atomically: exists, newest trimmed id, newest id, entries."""
        try:
            reply = self._read_script(keys=[self._log_key(key)], args=[*self._limits, what])
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unavailable: {exc}") from exc
        exists, deleted, top, entries = cast(list[Any], reply)
        return (
            bool(exists),
            None if deleted is None else deleted.decode(),
            None if top is None else top.decode(),
            [_envelope(entry_id, fields) for entry_id, fields in entries],
        )

    def subscribe(
        self, key: str, last_id: str | None = None, *, from_start: bool = False
    ) -> Subscription:
        """Follow ``key``: new entries only, the whole log (``from_start``) or after ``last_id``."""
        after = None
        if last_id is not None:
            after = parse_id(last_id)
            if after is None:
                raise ValueError(f"not a stream id: {last_id!r}")
        replaying = after is not None or from_start
        # 1. Register for the live tail first. A key new to this process needs a starting id for
        # the reader: the newest id now, read before registering, so it is <= any later history.
        while True:
            top: str | None = None
            if key not in self._cursors:
                top = self._read(key, "")[2] or "0-0"
            with self._lock:
                if self._closed:
                    raise BrokerUnavailable("the broker was closed")
                created = key not in self._cursors
                if created and top is None:
                    continue  # its last subscriber left meanwhile: read the newest id again
                if created:
                    assert top is not None
                    self._cursors[key] = top
                    self._subs[key] = {}
                floor = after if replaying else (_id_key(top) if top is not None else None)
                sub = LocalSubscription(key, self.queue_size, self._unsubscribe, floor)
                self._subs[key][sub] = None
                break
        if created:
            self._start_reader()
        # 2. Then read the history; 3. drop live entries at or below what the history reached.
        if not replaying and top is not None:
            return sub  # a channel on a new key: the newest id read above is the floor
        try:
            what = "" if not replaying else "-" if after is None else str(last_id)
            if after is not None and last_id == _MAX_ID:
                what = ""
            exists, deleted, newest, history = self._read(key, what)
        except BaseException:
            sub.close()
            raise
        replay: list[Envelope] = []
        if not replaying:
            floor = _id_key(newest) if newest is not None else None
        else:
            if after is not None and (
                not exists or (deleted is not None and after < _id_key(deleted))
            ):
                replay.append(reset_envelope(str(last_id), history[0].id if history else None))
            replay += history
            reached = [after] if after is not None else []
            if history:
                reached.append(_id_key(history[-1].id))
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
                    del self._cursors[sub.key]

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
                cursors = dict(self._cursors)
            names = {self._log_key(key): key for key in cursors}
            streams: dict[Any, Any] = {self._wake_key: self._wake_id}
            streams.update({self._log_key(key): cursor for key, cursor in cursors.items()})
            try:
                reply = self._reader_redis.xread(
                    streams, count=_READ_COUNT, block=max(1, round(self.block * 1000))
                )
                if down:
                    log.warning("Redis is reachable again; the reader resumes from its ids")
                    down = False
                delay = 0.0
                self._dispatch(reply, names, cursors)
            except Exception as exc:  # never let the one reader die: every subscriber needs it
                if self._stop.is_set():
                    break
                if not down:
                    if isinstance(exc, RedisError):
                        log.warning("Redis reader cannot read (%s); retrying with backoff", exc)
                    else:
                        log.exception("Redis reader failed; retrying with backoff")
                    down = True
                delay = min(max(delay * 2, 0.05), _MAX_BACKOFF)
                self._stop.wait(delay)

    def _dispatch(self, reply: Any, names: dict[str, str], cursors: dict[str, str]) -> None:
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
            batch = [
                Envelope(
                    entry_id.decode(),
                    fields.get(b"e", b"message").decode(),
                    fields.get(b"d", b"null"),
                )
                for entry_id, fields in entries
            ]
            first: IdTuple = _id_key(batch[0].id)
            last: IdTuple = _id_key(batch[-1].id)
            with self._lock:
                # The key's subscribers all left (and maybe came back with a new id) while we
                # read: this slice belongs to nobody, the next read starts from the new id.
                if self._cursors.get(key) != cursors[key]:
                    continue
                self._cursors[key] = batch[-1].id
                subs = self._subs[key]
                dropped = [sub for sub in subs if not sub.push(batch, first, last)]
                for sub in dropped:
                    del subs[sub]
                if not subs:
                    del self._subs[key]
                    del self._cursors[key]

    # -- metadata, expiry, lifecycle ----------------------------------------------------------

    def valid_id(self, value: str) -> bool:
        """Whether ``value`` is a Redis stream id ``"<ms>-<seq>"``."""
        return parse_id(value) is not None

    def set_meta(self, key: str, meta: dict[str, Any], ttl: float | None = None) -> None:
        """Store JSON-able metadata; ``ttl`` (s) expires key, meta and log, ``None`` keeps it."""
        data = orjson.dumps(meta)
        try:
            pipe = self._redis.pipeline(transaction=True)
            if ttl is None:
                pipe.set(self._meta_key(key), data, keepttl=True)
            else:
                pipe.set(self._meta_key(key), data, px=_ms(ttl))
                pipe.pexpire(self._log_key(key), _ms(ttl))
            pipe.execute()
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unavailable: {exc}") from exc

    def get_meta(self, key: str) -> dict[str, Any] | None:
        """The metadata stored for ``key``, or ``None``."""
        try:
            data = self._redis.get(self._meta_key(key))
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unavailable: {exc}") from exc
        if data is None:
            return None
        meta: dict[str, Any] = orjson.loads(cast(bytes, data))
        return meta

    def expire(self, key: str, ttl: float) -> None:
        """Make the log and the metadata of ``key`` disappear after ``ttl`` seconds."""
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.pexpire(self._log_key(key), _ms(ttl))
            pipe.pexpire(self._meta_key(key), _ms(ttl))
            pipe.execute()
        except _UNAVAILABLE as exc:
            raise BrokerUnavailable(f"Redis is unavailable: {exc}") from exc

    def healthy(self) -> bool:
        """Whether Redis answers a PING within about a second."""
        try:
            return bool(self._health_redis.ping())
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
            self._cursors.clear()
            thread = self._thread
        self._stop.set()
        if thread is not None:
            self._wake()
            thread.join(self.block + 2.0)
        for client in (self._redis, self._reader_redis, self._health_redis):
            client.close()
