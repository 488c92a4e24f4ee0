"""One cache interface, kept in memory or in Redis, with TTLs and tag invalidation.

Values are stored as JSON, never pickled: whoever can write to the cache must not be able
to run code in the app. Callers cache plain data (``model.model_dump(mode="json")``); any
other value is refused with ``TypeError`` on both backends alike. A value read back is the
JSON round trip of what was stored (tuples come back as lists) and is a fresh copy, so
mutating it never changes the cache; ``get_or_set`` returns that same round trip on a miss
so the first caller sees exactly what later callers will. A value that is bytes already
(a rendered answer) goes through ``get_or_set_raw``, stored and read back as those bytes:
a 20 KB page wrapped in JSON cost more to decode on every hit than the rest of the lookup.

Absence: :meth:`Cache.get` answers ``None`` for a missing key and for a cached ``None``
alike. :meth:`Cache.get_or_set` tells them apart: a factory answering ``None`` (say, "no
such listing") is cached like any other value and served without calling the factory
again until it expires or is invalidated (negative caching). Empty strings, lists and
dicts are ordinary values.

Tag invalidation uses versioned tags, not tag sets. Each tag has a current token; an
entry records the token of each of its tags when its value was *read from the source*,
and is stale as soon as any of those tokens is no longer current. Invalidating a tag
deletes its token (one ``DEL`` however many entries carry it), and the next writer mints
a fresh random one. We chose this over tag sets (a set of keys per tag, deleted on
invalidation) because:

* the race that matters is closed: ``get_or_set`` snapshots the tokens *before* calling
  the factory, so an invalidation landing while the factory runs (another process
  changed the listing) makes the result unstorable instead of caching stale data;
  with tag sets the late write would survive the invalidation;
* invalidation is O(1) and atomic across processes, and nothing grows without bound (tag
  sets accumulate keys of entries that already expired);
* it is safe under eviction: a token that disappears (evicted by Redis, pruned in
  memory) makes its entries stale, it never brings an invalidated entry back, because
  tokens are random and never reused.

The price is one extra ``GET`` per tag on each read, done inside the same Lua script as
the read, so a lookup is still one round trip. The scripts touch the tag keys they find
in an entry, so on Redis Cluster all keys of one namespace must share a hash slot
(wrap the namespace in braces: ``"{soko}:cache:"``).

``get_or_set`` is single-flight within a process: concurrent callers for one key wait
for the first one's factory instead of each calling it. If that factory fails, nothing
is cached and the next waiter calls the factory itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from prometheus_client import Counter

from soko.platform.clock import Clock, SystemClock

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("soko.cache")

CACHE_LOOKUPS = Counter("soko_cache_lookups_total", "Cache lookups by outcome", ["result"])
CACHE_UNAVAILABLE = Counter(
    "soko_cache_unavailable_total",
    "get_or_set calls that bypassed an unreachable cache and called the factory",
)


class _Missing:
    """Marks a cache miss, distinct from a cached ``None``."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

# The tokens an entry was computed under: tag -> token.
Stamp = tuple[tuple[str, str], ...]


def encode_value(value: Any) -> bytes:
    """The JSON bytes stored for ``value``; ``TypeError`` when it is not plain data."""
    try:
        return json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
    except ValueError as exc:  # NaN and infinities have no JSON form
        raise TypeError(f"cannot cache {value!r}: {exc}") from exc
    except TypeError as exc:
        raise TypeError(f"cannot cache a {type(value).__name__}: only JSON data is cached") from exc


def decode_value(raw: bytes | str) -> Any:
    return json.loads(raw)


def _check_ttl(ttl: float) -> None:
    if not ttl > 0 or math.isinf(ttl):
        raise ValueError(f"cache ttl must be a positive number of seconds, not {ttl!r}")


class Cache(Protocol):
    async def get(self, key: str) -> Any | None:
        """The cached value, or ``None`` when there is none (or ``None`` was cached)."""
        ...

    async def set(self, key: str, value: Any, ttl: float, tags: Sequence[str] = ()) -> None:
        """Store ``value`` for ``ttl`` seconds, dropped early when one of ``tags`` is
        invalidated."""
        ...

    async def delete(self, key: str) -> None: ...

    async def invalidate_tags(self, *tags: str) -> None:
        """Make every entry carrying one of ``tags`` stale, in every process."""
        ...

    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[Any]],
        ttl: float,
        tags: Sequence[str] = (),
        *,
        near: bool = False,
    ) -> Any:
        """The cached value, or ``factory()``'s, stored unless a tag moved meanwhile."""
        ...

    async def get_or_set_raw(
        self,
        key: str,
        factory: Callable[[], Awaitable[bytes]],
        ttl: float,
        tags: Sequence[str] = (),
        *,
        near: bool = False,
    ) -> bytes:
        """:meth:`get_or_set` for a value that is bytes already (a rendered answer): stored
        and returned as they are, with no JSON round trip. ``near`` also keeps a copy in
        this process (see :class:`RedisCache`) for a value read far more than written."""
        ...

    def unchanged_since(self, tags: Sequence[str], since: float) -> bool:
        """Whether this process knows that no process invalidated any of ``tags`` at or
        after ``since`` (a POSIX time). False whenever it cannot know: it was not hearing
        every invalidation then (see :class:`ChangeJournal`)."""
        ...

    def listen(self) -> None:
        """Begin hearing other processes' changes now rather than at the first near read
        or :meth:`unchanged_since` (a server calls it as it starts)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class ChangeJournal:
    """When this process last heard of each tag's invalidation, and since when it has
    heard of every invalidation by any process (:attr:`known_since`, a POSIX time;
    ``None`` while it hears nothing).

    It answers whether a value handed over with a time can be trusted as it stands: a
    value read from the source at ``since`` is still what the source holds if none of
    its tags was invalidated since then (:meth:`unchanged_since`). The answer is "no"
    whenever it cannot be "yes" for sure: before :meth:`start`, after :meth:`stop`, for
    a ``since`` before :attr:`known_since`. What it remembers is bounded, by number and
    by age; forgetting a change moves :attr:`known_since` past it, so forgetting only
    turns answers into "no" (ADR 0019)."""

    def __init__(self, *, max_entries: int = 100_000, max_seconds: float = 3_600.0) -> None:
        self.max_entries = max_entries
        self.max_seconds = max_seconds
        self.known_since: float | None = None
        self._heard: OrderedDict[str, float] = OrderedDict()  # oldest first
        self._latest = -math.inf

    def __len__(self) -> int:
        return len(self._heard)

    def start(self, now: float) -> None:
        """Every invalidation is heard from ``now`` on (a subscription just confirmed);
        whatever came before is unknown."""
        self._heard.clear()
        self._latest = now
        self.known_since = now

    def stop(self) -> None:
        """Invalidations are no longer heard (the subscription was lost)."""
        self._heard.clear()
        self.known_since = None

    def record(self, tags: Sequence[str], now: float) -> None:
        """``tags`` were invalidated, heard of at ``now``. Times never go back here (a
        clock stepped back is read as the latest time seen), so the order of the entries
        is the order of their times."""
        if self.known_since is None:
            return
        now = self._latest = max(now, self._latest)
        for tag in tags:
            self._heard.pop(tag, None)
            self._heard[tag] = now
        horizon = now - self.max_seconds
        while self._heard:
            tag, heard = next(iter(self._heard.items()))
            if len(self._heard) <= self.max_entries and heard >= horizon:
                break
            del self._heard[tag]
            # What is forgotten is no longer known: a later `since` only.
            self.known_since = max(self.known_since, math.nextafter(heard, math.inf))

    def unchanged_since(self, tags: Sequence[str], since: float) -> bool:
        known = self.known_since
        if known is None or since < known:
            return False
        heard = self._heard
        return all(heard.get(tag, -math.inf) < since for tag in tags)


class _SingleFlight:
    """One lock per key while anyone waits on it, so locks do not pile up; and which keys
    a flight stored lately, for callers whose lookup missed before that flight ended but
    who reach the lock after it: they read what it stored instead of computing again."""

    # Keys whose last stored flight is remembered: beyond that, a late caller computes
    # the value again (correct, only wasted work).
    REMEMBERED = 4096

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._sequence = 0
        self._stored: OrderedDict[str, int] = OrderedDict()

    def mark(self) -> int:
        """A point in time to compare :meth:`stored_since` with: take it before the
        lookup."""
        return self._sequence

    def stored(self, key: str) -> None:
        """A flight for ``key`` has just stored its value."""
        self._sequence += 1
        self._stored[key] = self._sequence
        self._stored.move_to_end(key)
        if len(self._stored) > self.REMEMBERED:
            self._stored.popitem(last=False)

    def stored_since(self, key: str, mark: int) -> bool:
        return self._stored.get(key, 0) > mark

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[bool]:
        """Hold ``key``'s lock; yields whether someone else held or awaited it first
        (and may have stored the value meanwhile)."""
        lock, waiters = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, waiters + 1)
        try:
            async with lock:
                yield waiters > 0
        finally:
            lock, waiters = self._locks[key]
            if waiters == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, waiters - 1)

    def __len__(self) -> int:
        return len(self._locks)


class _TaggedCache:
    """What both backends share: the public methods over four storage primitives."""

    # Errors meaning "the cache is unreachable" rather than "the caller is wrong".
    unavailable_errors: tuple[type[Exception], ...] = ()
    # After such an error, reads go straight to the source for this long (a monotonic
    # deadline in :attr:`_resting_until`), without asking the cache: a cache that hangs
    # instead of refusing would otherwise cost every read its socket timeout.
    rest_seconds: float = 0.0

    def __init__(self) -> None:
        self._resting_until = 0.0
        # Tags whose invalidation failed (the cache was unreachable after a change was
        # committed): sent again before the next read, which waits for the source until
        # they are, so an entry the change outdated is never served.
        self._unsent: set[str] = set()
        self._flights = _SingleFlight()
        # Factories running while the cache is unreachable, by key: concurrent callers
        # share one answer instead of each reading the source.
        self._bypasses: dict[str, asyncio.Future[bytes]] = {}

    async def _lookup(self, key: str) -> bytes | _Missing:
        """The stored bytes, or ``MISSING``."""
        raise NotImplementedError

    async def _stamp(self, tags: Sequence[str], ttl: float) -> Stamp:
        """The current token of each tag, minting one where a tag has none."""
        raise NotImplementedError

    async def _lookup_or_stamp(self, key: str, tags: Sequence[str], ttl: float) -> bytes | Stamp:
        """The stored bytes; when missing, the stamp of ``tags`` (as :meth:`_stamp`) to
        compute the value under. A backend may answer both in one round trip."""
        raw = await self._lookup(key)
        return await self._stamp(tags, ttl) if isinstance(raw, _Missing) else raw

    async def _store(self, key: str, raw: bytes, ttl: float, stamp: Stamp) -> bool:
        """Write the entry unless a stamped token is no longer current."""
        raise NotImplementedError

    async def _send_unsent(self) -> None:
        """Send the invalidations that failed earlier; raises while the cache is still
        unreachable."""
        tags = sorted(self._unsent)
        await self._resend_invalidation(tags)
        self._unsent.difference_update(tags)
        log.info("cache invalidations sent after an outage", tags=len(tags))

    async def _resend_invalidation(self, tags: list[str]) -> None:
        raise NotImplementedError

    async def get(self, key: str) -> Any | None:
        if self._unsent:
            await self._send_unsent()
        raw = await self._lookup(key)
        CACHE_LOOKUPS.labels("miss" if raw is MISSING else "hit").inc()
        return None if isinstance(raw, _Missing) else decode_value(raw)

    async def set(self, key: str, value: Any, ttl: float, tags: Sequence[str] = ()) -> None:
        _check_ttl(ttl)
        raw = encode_value(value)
        await self._store(key, raw, ttl, await self._stamp(tags, ttl))

    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[Any]],
        ttl: float,
        tags: Sequence[str] = (),
        *,
        near: bool = False,
    ) -> Any:
        async def encoded() -> bytes:
            return encode_value(await factory())

        return decode_value(await self.get_or_set_raw(key, encoded, ttl, tags, near=near))

    async def get_or_set_raw(
        self,
        key: str,
        factory: Callable[[], Awaitable[bytes]],
        ttl: float,
        tags: Sequence[str] = (),
        *,
        near: bool = False,
    ) -> bytes:
        _check_ttl(ttl)
        if near and (copy := self._near_get(key)) is not None:
            CACHE_LOOKUPS.labels("near").inc()
            return copy
        if self._resting_until and time.monotonic() < self._resting_until:
            CACHE_UNAVAILABLE.inc()
            return await self._bypass(key, factory, None)
        if self._unsent:
            try:
                await self._send_unsent()
            except self.unavailable_errors as exc:
                return await self._bypass(key, factory, exc)
        # Invalidations this process hears of from now on keep what it reads out of its
        # near copies: they may have been read before the invalidation took effect.
        mark = self._near_mark()
        flight_mark = self._flights.mark()
        try:
            found = await self._lookup_or_stamp(key, tags, ttl)
        except self.unavailable_errors as exc:
            return await self._bypass(key, factory, exc)
        if isinstance(found, bytes):
            CACHE_LOOKUPS.labels("hit").inc()
            if near:
                self._near_put(key, found, tags, ttl, mark)
            return found
        # The stamp was taken before the factory reads the source, so an invalidation
        # from now on makes the result unstorable.
        stamp = found
        async with self._flights.hold(key) as waited:
            if waited or self._flights.stored_since(key, flight_mark):
                # Another caller computed it meanwhile (while this one waited for the lock,
                # or between this one's lookup and the lock), most likely: read what it
                # stored.
                try:
                    raw = await self._lookup(key)
                except self.unavailable_errors as exc:
                    return await self._bypass(key, factory, exc)
                if not isinstance(raw, _Missing):
                    CACHE_LOOKUPS.labels("hit").inc()
                    if near:
                        self._near_put(key, raw, tags, ttl, mark)
                    return raw
            CACHE_LOOKUPS.labels("miss").inc()
            made = await factory()
            if not isinstance(made, bytes):
                raise TypeError(f"a raw cache value is bytes, not a {type(made).__name__}")
            try:
                stored = await self._store(key, made, ttl, stamp)
            except self.unavailable_errors as exc:
                self._report_unavailable(key, exc)
            else:
                if stored:
                    self._flights.stored(key)
                if stored and near:
                    self._near_put(key, made, tags, ttl, mark)
            return made

    # Near copies: only a shared backend keeps them (in memory, every value is near).

    def _near_get(self, key: str) -> bytes | None:
        return None

    def _near_mark(self) -> int:
        return 0

    def _near_put(self, key: str, raw: bytes, tags: Sequence[str], ttl: float, mark: int) -> None:
        return None

    def _report_unavailable(self, key: str, exc: Exception) -> None:
        log.warning(
            "cache_unavailable", key=key, error=type(exc).__name__, rest_seconds=self.rest_seconds
        )
        CACHE_UNAVAILABLE.inc()
        if self.rest_seconds:
            self._resting_until = time.monotonic() + self.rest_seconds

    async def _bypass(
        self, key: str, factory: Callable[[], Awaitable[bytes]], exc: Exception | None
    ) -> bytes:
        """Answer from the source rather than fail: a cache is an optimisation.

        Callers arriving while another one's factory runs for the same key wait for its
        answer (or its error), so an unreachable cache does not turn every request into
        a read of the source just when the process is busiest. ``exc`` is the error that
        found the cache unreachable (None while resting after one)."""
        if exc is not None:
            self._report_unavailable(key, exc)
        running = self._bypasses.get(key)
        if running is not None:
            try:
                return await asyncio.shield(running)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not running.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The caller whose factory ran was cancelled, not us: run our own.
        shared: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._bypasses[key] = shared
        try:
            raw = await factory()
        except Exception as failure:
            shared.set_exception(failure)
            shared.exception()  # retrieved, so a failure nobody waited for logs nothing
            raise
        except BaseException:
            shared.cancel()
            raise
        finally:
            if self._bypasses.get(key) is shared:
                del self._bypasses[key]
        shared.set_result(raw)
        return raw


@dataclass(slots=True)
class _MemoryEntry:
    expires_at: float
    raw: bytes
    stamp: Stamp


def log_invalidation_failure(cache: Any, exc: Exception, tags: Sequence[str], when: str) -> None:
    """Log an invalidation that failed after its change was committed: a warning when
    the cache was unreachable (it is sent again before the next read), with the
    traceback otherwise."""
    if isinstance(exc, getattr(cache, "unavailable_errors", ())):
        log.warning(
            f"cache invalidation failed {when}: sent again once the cache answers",
            tags=list(tags),
            error=type(exc).__name__,
        )
    else:
        log.exception(f"cache invalidation failed {when}", tags=list(tags))


# What one process's caches may hold, whatever their values weigh: a count alone let a
# few thousand large pages (a product with hundreds of variants, a page of 100 of them)
# take gigabytes. One value may take at most a sixteenth of the bound; a larger one is
# served but not kept.
MEMORY_CACHE_MAX_BYTES = 64 * 1024 * 1024
NEAR_COPIES_MAX_BYTES = 32 * 1024 * 1024
_LARGEST_SHARE = 16


class MemoryCache(_TaggedCache):
    """A per-process cache bounded to ``max_entries`` and to ``max_bytes`` of values
    (least recently used goes first), timed by the injectable clock."""

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        max_bytes: int = MEMORY_CACHE_MAX_BYTES,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if max_bytes < _LARGEST_SHARE:
            raise ValueError(f"max_bytes must be at least {_LARGEST_SHARE}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # the values held, in bytes
        self._clock: Clock = clock or SystemClock()
        self._entries: OrderedDict[str, _MemoryEntry] = OrderedDict()
        self._tags: dict[str, str] = {}
        # One process holds every change: it hears each one as it is made.
        self.journal = ChangeJournal()
        self.journal.start(self._now())

    def _now(self) -> float:
        return self._clock.now().timestamp()

    def __len__(self) -> int:
        return len(self._entries)

    def _is_current(self, stamp: Stamp) -> bool:
        return all(self._tags.get(tag) == token for tag, token in stamp)

    async def _lookup(self, key: str) -> bytes | _Missing:
        entry = self._entries.get(key)
        if entry is None:
            return MISSING
        if entry.expires_at <= self._now() or not self._is_current(entry.stamp):
            self._forget(key)
            return MISSING
        self._entries.move_to_end(key)
        return entry.raw

    def _forget(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= len(entry.raw)

    async def _stamp(self, tags: Sequence[str], ttl: float) -> Stamp:
        stamp = []
        for tag in dict.fromkeys(tags):
            token = self._tags.get(tag)
            if token is None:
                token = self._tags[tag] = uuid.uuid4().hex
            stamp.append((tag, token))
        return tuple(stamp)

    async def _store(self, key: str, raw: bytes, ttl: float, stamp: Stamp) -> bool:
        if not self._is_current(stamp):
            return False
        self._forget(key)
        if len(raw) > self.max_bytes // _LARGEST_SHARE:
            return False
        self._entries[key] = _MemoryEntry(self._now() + ttl, raw, stamp)
        self.bytes += len(raw)
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._forget(next(iter(self._entries)))
        if len(self._tags) > 2 * self.max_entries:
            self._prune_tags()
        return True

    def _prune_tags(self) -> None:
        # Forgetting a token only makes its entries stale (a new token is minted), so
        # keeping just the tags of live entries is always safe.
        live = {tag for entry in self._entries.values() for tag, _ in entry.stamp}
        self._tags = {tag: token for tag, token in self._tags.items() if tag in live}

    async def delete(self, key: str) -> None:
        self._forget(key)

    async def invalidate_tags(self, *tags: str) -> None:
        for tag in tags:
            self._tags.pop(tag, None)
        self.journal.record(tags, self._now())

    async def _resend_invalidation(self, tags: list[str]) -> None:
        await self.invalidate_tags(*tags)  # never fails: kept for the shared interface

    def unchanged_since(self, tags: Sequence[str], since: float) -> bool:
        return self.journal.unchanged_since(tags, since)

    def listen(self) -> None:
        return None  # it hears its own changes, the only ones there are

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0
        self._tags.clear()
        self.journal.stop()


@dataclass(slots=True)
class _NearCopy:
    expires_at: float  # time.monotonic()
    raw: bytes
    tags: tuple[str, ...]


class NearCopies:
    """A process's copies of shared entries, dropped when any process invalidates them.

    Every invalidation this process hears of (its own, and other processes' through the
    shared backend's channel) drops the copies it names and moves :attr:`mark` on; a
    value read from the shared backend is kept only if the mark has not moved since the
    read began, so a copy never outlives an invalidation that raced with its read. While
    the channel is not known to be listened to (:attr:`listening` false), nothing is
    kept and nothing is served: a message missed then could leave a stale copy. Copies
    also expire after ``max_seconds``, a bound on staleness if the channel ever lost a
    message without failing."""

    def __init__(
        self,
        *,
        max_entries: int = 1_000,
        max_bytes: int = NEAR_COPIES_MAX_BYTES,
        max_seconds: float = 5.0,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # the copies held, in bytes
        self.max_seconds = max_seconds
        self.listening = False
        self.mark = 0
        self._copies: OrderedDict[str, _NearCopy] = OrderedDict()
        self._by_tag: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._copies)

    def get(self, key: str) -> bytes | None:
        copy = self._copies.get(key)
        if copy is None or not self.listening:
            return None
        if copy.expires_at <= time.monotonic():
            self._drop(key)
            return None
        return copy.raw

    def put(self, key: str, raw: bytes, tags: Sequence[str], ttl: float, mark: int) -> None:
        if not self.listening or mark != self.mark:
            return
        self._drop(key)
        if len(raw) > self.max_bytes // _LARGEST_SHARE:
            return
        unique = tuple(dict.fromkeys(tags))
        self._copies[key] = _NearCopy(time.monotonic() + min(ttl, self.max_seconds), raw, unique)
        self.bytes += len(raw)
        for tag in unique:
            self._by_tag.setdefault(tag, set()).add(key)
        while len(self._copies) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._copies)))

    def _drop(self, key: str) -> None:
        copy = self._copies.pop(key, None)
        if copy is None:
            return
        self.bytes -= len(copy.raw)
        for tag in copy.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]

    def invalidate(self, *, tags: Sequence[str] = (), keys: Sequence[str] = ()) -> None:
        self.mark += 1
        for tag in tags:
            for key in list(self._by_tag.get(tag, ())):
                self._drop(key)
        for key in keys:
            self._drop(key)

    def clear(self) -> None:
        self.mark += 1
        self._copies.clear()
        self.bytes = 0
        self._by_tag.clear()


# The entry KEYS[1] is a hash: field "v" holds the value, every other field is a tag key
# whose token the value was computed under. Leaves the value in `value`, or false when
# missing or stale (then dropped).
_READ_ENTRY = """
local fields = redis.call('HGETALL', KEYS[1])
local value = false
for i = 1, #fields, 2 do
  if fields[i] == 'v' then
    value = fields[i + 1]
  elseif redis.call('GET', fields[i]) ~= fields[i + 1] then
    redis.call('DEL', KEYS[1])
    value = false
    break
  end
end
"""

# Appends to `tokens` the token of each tag key from KEYS[{first}] on, minting ARGV[1]
# where a tag has none; ARGV[2]: ttl in ms. A tag key lives at least as long as the
# entries that depend on it.
_MINT_TOKENS = """
local ttl = tonumber(ARGV[2])
for i = {first}, #KEYS do
  local token = redis.call('GET', KEYS[i])
  if not token then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ttl)
    token = ARGV[1]
  elseif redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  tokens[#tokens + 1] = token
end
"""

# KEYS[1]: the entry. Returns its value, or nil when missing or stale.
_LOOKUP_SCRIPT = _READ_ENTRY + "return value\n"

# KEYS: tag keys. Returns the token of each.
_STAMP_SCRIPT = "local tokens = {}\n" + _MINT_TOKENS.replace("{first}", "1") + "return tokens\n"

# KEYS[1]: the entry, KEYS[2..]: the tag keys it would be computed under. Returns {1,
# value} when the entry is there and current, else (after dropping a stale one) {0, the
# token of each tag}: a miss costs one round trip before its value is computed, not two.
_LOOKUP_OR_STAMP_SCRIPT = (
    _READ_ENTRY
    + "if value then\n  return {1, value}\nend\nlocal tokens = {0}\n"
    + _MINT_TOKENS.replace("{first}", "2")
    + "return tokens\n"
)

# KEYS[1]: the entry, KEYS[2..]: its tag keys. ARGV[1]: JSON value, ARGV[2]: ttl in ms,
# ARGV[3..]: the token each tag had when the value was read. Returns 1 when stored.
_STORE_SCRIPT = """
local ttl = tonumber(ARGV[2])
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) ~= ARGV[i + 1] then
    return 0
  end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', ARGV[1])
for i = 2, #KEYS do
  redis.call('HSET', KEYS[1], KEYS[i], ARGV[i + 1])
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""


# KEYS: what to delete. ARGV[1]: the channel, ARGV[2]: the message telling every process.
# One command rather than a pipeline of two (a third less of the caller's CPU through
# redis-py), and the deletion is done before the message goes out. In chunks: Lua's
# unpack takes a few thousand values at most, and a gathered send can carry more.
_DROP_AND_ANNOUNCE_SCRIPT = """
for i = 1, #KEYS, 1000 do
  redis.call('DEL', unpack(KEYS, i, math.min(i + 999, #KEYS)))
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class _Coalesced:
    """Tag invalidations that overlap in time, sent together (a group commit).

    :meth:`send` returns once its tags have gone out in a send that began after the
    call, so after whatever the caller committed before calling. While one send is
    under way, the tags of every call made meanwhile gather into the next, one round
    trip and one message on the channel for all of them: under load a process sends
    far fewer, and every other process hears far fewer (each message costs each
    listener its parsing). A lone call is sent at once, as before. A failed send fails
    every call it carried; a caller that goes away (cancelled) does not stop its
    invalidation, which is sent all the same."""

    def __init__(self, send: Callable[[list[str]], Awaitable[None]]) -> None:
        self._send = send
        self._pending: dict[str, None] = {}
        self._next: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None

    async def send(self, tags: Sequence[str]) -> None:
        loop = asyncio.get_running_loop()
        if self._sender is not None and self._sender.get_loop() is not loop:
            # Left over by an event loop that is gone (a test's): nothing to finish here.
            self._pending, self._next, self._sender = {}, None, None
        self._pending.update(dict.fromkeys(tags))
        if self._next is None:
            self._next = loop.create_future()
        sent = self._next
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._run(), name="cache-invalidations")
        await asyncio.shield(sent)

    async def _run(self) -> None:
        while self._pending:
            tags, self._pending = list(self._pending), {}
            sent, self._next = self._next, None
            assert sent is not None
            try:
                await self._send(tags)
            except Exception as exc:
                sent.set_exception(exc)
                sent.exception()  # retrieved: callers that went away leave no warning
            except BaseException:
                sent.cancel()
                raise
            else:
                sent.set_result(None)

    async def drain(self) -> None:
        """Wait for what is being sent, or waits to be, to go out."""
        sender = self._sender
        if sender is None or sender.done() or sender.get_loop() is not asyncio.get_running_loop():
            return
        await asyncio.shield(sender)


class RedisCache(_TaggedCache):
    """The cache shared by every process using one Redis, under ``namespace``.

    It borrows the runtime's client and does not close it. When Redis cannot be reached,
    ``get_or_set`` logs a warning, counts ``soko_cache_unavailable_total`` and answers
    from the factory; the other methods raise, since a lost ``invalidate_tags`` or
    ``delete`` would leave stale data behind once Redis is back.

    Near copies (``get_or_set(..., near=True)``): a value read far more often than it
    changes (a catalog page) is also kept in the process, for at most
    ``near_seconds``, and served without a round trip. Every ``invalidate_tags``,
    ``delete`` and ``set`` publishes what it changed on the namespace's channel, in the
    same round trip as the change and after it; each process listens there and drops
    its copies (:class:`NearCopies`). So a change is seen by the other processes as soon
    as Redis has delivered the message, typically well under a millisecond; the process
    that made it sees it at once. Tag invalidations made while one is being sent go out
    together in the next round trip and message (:class:`_Coalesced`). While the channel
    is not listened to (not yet subscribed, or the connection broke and is being
    restored) no copy is served.
    """

    def __init__(
        self,
        redis: Redis,
        namespace: str = "soko:cache:",
        *,
        near_entries: int = 1_000,
        near_seconds: float = 5.0,
        retry_seconds: float = 1.0,
        rest_seconds: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        from redis.exceptions import RedisError

        self.unavailable_errors = (RedisError, OSError)
        self.rest_seconds = rest_seconds
        self.redis = redis
        self.namespace = namespace
        self.near = NearCopies(max_entries=near_entries, max_seconds=near_seconds)
        # Started when the channel is confirmed and stopped when it is lost, with the
        # near copies: what every process changed while this one listened.
        self.journal = ChangeJournal()
        self._clock: Clock = clock or SystemClock()
        self.retry_seconds = retry_seconds
        self._listener: asyncio.Task[None] | None = None
        self._subscription: Any = None  # the listener's, while it runs
        self._lookup_script = redis.register_script(_LOOKUP_SCRIPT)
        self._stamp_script = redis.register_script(_STAMP_SCRIPT)
        self._lookup_or_stamp_script = redis.register_script(_LOOKUP_OR_STAMP_SCRIPT)
        self._store_script = redis.register_script(_STORE_SCRIPT)
        self._drop_and_announce = redis.register_script(_DROP_AND_ANNOUNCE_SCRIPT)
        self._invalidations = _Coalesced(self._send_invalidation)

    @property
    def channel(self) -> str:
        return f"{self.namespace}changes"

    # -- near copies ---------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock.now().timestamp()

    def _near_get(self, key: str) -> bytes | None:
        self._ensure_listening()
        return self.near.get(key)

    def _near_mark(self) -> int:
        return self.near.mark

    def _near_put(self, key: str, raw: bytes, tags: Sequence[str], ttl: float, mark: int) -> None:
        self.near.put(key, raw, tags, ttl, mark)

    def _ensure_listening(self) -> None:
        loop = asyncio.get_running_loop()
        listener = self._listener
        if listener is not None and not listener.done() and listener.get_loop() is loop:
            return
        self._deaf()
        self._listener = loop.create_task(self._listen(), name="cache-near-copies")

    def _deaf(self) -> None:
        """The channel is not (or no longer) listened to: no near copy is kept or
        served, and no change is vouched for."""
        self.near.listening = False
        self.near.clear()
        self.journal.stop()

    def _hearing_from_now(self) -> None:
        """Every change is heard from now on, and nothing from before is known: the
        near copies are dropped and the journal starts afresh."""
        self.near.clear()
        self.near.listening = True
        self.journal.start(self._now())

    async def _listen(self) -> None:
        """Hear every process's changes until cancelled, reconnecting after a failure."""
        while True:
            pubsub = self._subscription = self.redis.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                while True:  # Redis confirms: from here on no change goes unheard.
                    reply = await pubsub.get_message(timeout=self.retry_seconds * 5)
                    if reply is None:
                        raise TimeoutError("the cache channel was not confirmed")
                    if reply.get("type") == "subscribe":
                        break
                self._hearing_from_now()
                if self._unsent:
                    # Back after an outage: what changed meanwhile is dropped at once,
                    # not at the next read.
                    with contextlib.suppress(*self.unavailable_errors):
                        await self._send_unsent()
                silent = 0
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self.retry_seconds * 5
                    )
                    if message is None:
                        # A quiet channel is asked for a pong: a connection that went
                        # dead without closing is noticed within two silences.
                        silent += 1
                        if silent > 1:
                            raise TimeoutError("no answer on the cache channel")
                        await pubsub.ping()
                        continue
                    silent = 0
                    if message.get("type") == "message":
                        self._heard(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: forget every copy, then listen again
                log.warning("cache_channel_lost", error=type(exc).__name__)
            finally:
                self._deaf()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self.retry_seconds)

    def _heard(self, data: Any) -> None:
        try:
            change = json.loads(data)
            tags, keys = change.get("tags", []), change.get("keys", [])
            if not isinstance(tags, list) or not isinstance(keys, list):
                raise TypeError("tags and keys are lists")
        except (TypeError, ValueError, AttributeError):
            # A message we cannot read: drop everything, and know nothing before now.
            self._hearing_from_now()
            return
        tags = [str(tag) for tag in tags]
        self.near.invalidate(tags=tags, keys=[str(key) for key in keys])
        self.journal.record(tags, self._now())

    def entry_key(self, key: str) -> str:
        return f"{self.namespace}entry:{key}"

    def tag_key(self, tag: str) -> str:
        return f"{self.namespace}tag:{tag}"

    async def _lookup(self, key: str) -> bytes | _Missing:
        raw = await self._lookup_script(keys=[self.entry_key(key)])
        return MISSING if raw is None else bytes(raw)

    async def _stamp(self, tags: Sequence[str], ttl: float) -> Stamp:
        unique = list(dict.fromkeys(tags))
        if not unique:
            return ()
        # A tag that outlived the factory by a few seconds costs nothing; one that
        # expired before its entry would only make the entry stale.
        tokens = await self._stamp_script(
            keys=[self.tag_key(tag) for tag in unique],
            args=[uuid.uuid4().hex, _ms(ttl) + 60_000],
        )
        return tuple(
            (tag, token.decode() if isinstance(token, bytes) else str(token))
            for tag, token in zip(unique, tokens, strict=True)
        )

    async def _lookup_or_stamp(self, key: str, tags: Sequence[str], ttl: float) -> bytes | Stamp:
        unique = list(dict.fromkeys(tags))
        answer = await self._lookup_or_stamp_script(
            keys=[self.entry_key(key), *(self.tag_key(tag) for tag in unique)],
            args=[uuid.uuid4().hex, _ms(ttl) + 60_000],
        )
        if int(answer[0]) == 1:
            return bytes(answer[1])
        return tuple(
            (tag, token.decode() if isinstance(token, bytes) else str(token))
            for tag, token in zip(unique, answer[1:], strict=True)
        )

    async def _store(self, key: str, raw: bytes, ttl: float, stamp: Stamp) -> bool:
        stored = await self._store_script(
            keys=[self.entry_key(key), *(self.tag_key(tag) for tag, _ in stamp)],
            args=[raw, _ms(ttl), *(token for _, token in stamp)],
        )
        return bool(stored)

    async def set(self, key: str, value: Any, ttl: float, tags: Sequence[str] = ()) -> None:
        self.near.invalidate(keys=[key])
        await super().set(key, value, ttl, tags)
        await self.redis.publish(self.channel, json.dumps({"keys": [key]}))
        self.near.invalidate(keys=[key])

    async def delete(self, key: str) -> None:
        # Dropped here before and after: a read racing the change keeps nothing stale.
        self.near.invalidate(keys=[key])
        await self._drop_and_announce(
            keys=[self.entry_key(key)], args=[self.channel, json.dumps({"keys": [key]})]
        )
        self.near.invalidate(keys=[key])

    async def invalidate_tags(self, *tags: str) -> None:
        if not tags:
            return
        self.near.invalidate(tags=tags)
        # Known here at once; the listener hears the message too, later.
        self.journal.record(tags, self._now())
        try:
            await self._invalidations.send(tags)
        except self.unavailable_errors:
            self._unsent.update(tags)  # sent again before the next read
            raise
        self.near.invalidate(tags=tags)

    def unchanged_since(self, tags: Sequence[str], since: float) -> bool:
        self._ensure_listening()
        return self.journal.unchanged_since(tags, since)

    def listen(self) -> None:
        self._ensure_listening()

    async def _resend_invalidation(self, tags: list[str]) -> None:
        self.near.invalidate(tags=tags)
        await self._send_invalidation(tags)

    async def _send_invalidation(self, tags: list[str]) -> None:
        # One round trip, in order: the tokens are gone before anyone hears of it.
        await self._drop_and_announce(
            keys=[self.tag_key(tag) for tag in tags],
            args=[self.channel, json.dumps({"tags": tags})],
        )

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        """Send the invalidations still on their way and stop listening for changes; the
        client belongs to the runtime, which closes it."""
        await self._invalidations.drain()
        listener, self._listener = self._listener, None
        if listener is not None and not listener.done():
            listener.cancel()
            if listener.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
        self._deaf()
