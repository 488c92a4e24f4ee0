"""The cache on both backends: JSON values, TTLs, tags, single-flight get_or_set."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from soko.platform.cache import Cache, MemoryCache, RedisCache, _SingleFlight
from soko.platform.clock import ManualClock

CacheFactory = Callable[[], Cache]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """None for memory, or the Redis URL and this test's namespace."""
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_namespace")


@pytest.fixture
async def caches(store: tuple[str, str] | None, clock: ManualClock) -> AsyncIterator[CacheFactory]:
    """Makes caches over one shared store: on Redis each has its own client, as two
    processes would; in memory they are one object, since a memory cache is per process."""
    if store is None:
        memory = MemoryCache(clock=clock)
        yield lambda: memory
        return
    redis_url, namespace = store
    clients: list[Redis] = []
    made: list[RedisCache] = []

    def make() -> Cache:
        client = Redis.from_url(redis_url, decode_responses=False)
        clients.append(client)
        made.append(RedisCache(client, namespace=namespace))
        return made[-1]

    yield make
    for cache in made:
        await cache.close()
    for client in clients:
        await client.aclose()


@pytest.fixture
def cache(caches: CacheFactory) -> Cache:
    return caches()


class Counting:
    """A factory that counts its calls."""

    def __init__(self, value: Any = None) -> None:
        self.value = value
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        return self.value


async def test_values_round_trip_as_json(cache: Cache) -> None:
    value = {
        "title": "Kikoi wrap",
        "price": {"amount": 250000, "currency": "KES"},
        "tags": ["cotton"],
    }
    await cache.set("listing:1", value, ttl=60)
    assert await cache.get("listing:1") == value
    await cache.set("pair", (1, "two"), ttl=60)
    assert await cache.get("pair") == [1, "two"]  # the JSON round trip, on both backends


async def test_a_read_value_is_a_copy(cache: Cache) -> None:
    await cache.set("listing:1", {"stock": 3}, ttl=60)
    first = await cache.get("listing:1")
    first["stock"] = 0
    assert await cache.get("listing:1") == {"stock": 3}


@pytest.mark.parametrize(
    "value", [object(), {1, 2}, b"bytes", float("nan"), {"at": dt.date(2030, 1, 1)}]
)
async def test_only_json_data_is_cached(cache: Cache, value: Any) -> None:
    with pytest.raises(TypeError):
        await cache.set("odd", value, ttl=60)
    assert await cache.get("odd") is None


async def test_missing_keys_answer_none(cache: Cache) -> None:
    assert await cache.get("nothing-here") is None


async def test_delete(cache: Cache) -> None:
    await cache.set("listing:1", {"id": 1}, ttl=60)
    await cache.delete("listing:1")
    await cache.delete("never-set")
    assert await cache.get("listing:1") is None


async def test_ttl_must_be_positive(cache: Cache) -> None:
    for ttl in (0, -1, float("inf")):
        with pytest.raises(ValueError):
            await cache.set("listing:1", 1, ttl=ttl)
        with pytest.raises(ValueError):
            await cache.get_or_set("listing:1", Counting(1), ttl=ttl)


async def test_invalidating_a_tag_drops_only_its_entries(cache: Cache) -> None:
    await cache.set("listing:1", {"id": 1}, ttl=60, tags=["seller:7", "listing:1"])
    await cache.set("listing:2", {"id": 2}, ttl=60, tags=["seller:7"])
    await cache.set("listing:3", {"id": 3}, ttl=60, tags=["seller:8"])
    await cache.set("home", {"featured": []}, ttl=60)

    await cache.invalidate_tags("seller:7")

    assert await cache.get("listing:1") is None
    assert await cache.get("listing:2") is None
    assert await cache.get("listing:3") == {"id": 3}
    assert await cache.get("home") == {"featured": []}


async def test_an_entry_written_after_invalidation_is_fresh(cache: Cache) -> None:
    await cache.set("listing:1", {"v": 1}, ttl=60, tags=["seller:7"])
    await cache.invalidate_tags("seller:7", "never-used")
    await cache.set("listing:1", {"v": 2}, ttl=60, tags=["seller:7"])
    assert await cache.get("listing:1") == {"v": 2}
    await cache.invalidate_tags("seller:7")
    assert await cache.get("listing:1") is None


async def test_get_or_set_calls_the_factory_once_then_serves_the_cache(cache: Cache) -> None:
    factory = Counting({"id": 1, "pair": (1, 2)})
    first = await cache.get_or_set("listing:1", factory, ttl=60, tags=["seller:7"])
    second = await cache.get_or_set("listing:1", factory, ttl=60, tags=["seller:7"])
    assert first == second == {"id": 1, "pair": [1, 2]}
    assert factory.calls == 1
    await cache.invalidate_tags("seller:7")
    await cache.get_or_set("listing:1", factory, ttl=60, tags=["seller:7"])
    assert factory.calls == 2


async def test_concurrent_get_or_set_runs_one_factory_per_key(cache: Cache) -> None:
    release = asyncio.Event()
    calls = {"listing:1": 0, "listing:2": 0}

    def factory_for(key: str) -> Callable[[], Any]:
        async def factory() -> dict[str, str]:
            calls[key] += 1
            await release.wait()
            return {"key": key}

        return factory

    waiters = [
        asyncio.create_task(cache.get_or_set(key, factory_for(key), ttl=60))
        for key in ["listing:1", "listing:2"] * 10
    ]
    while sum(calls.values()) < 2:
        await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters)
    assert calls == {"listing:1": 1, "listing:2": 1}
    assert results == [{"key": "listing:1"}, {"key": "listing:2"}] * 10


async def test_a_caller_whose_lookup_missed_before_a_flight_stored_reads_its_value(
    cache: Cache,
) -> None:
    # A caller's lookup misses, but its answer arrives (a slow round trip) only after
    # another caller computed and stored the value: it must read that value rather than
    # compute it again.
    assert isinstance(cache, MemoryCache | RedisCache)
    lookup = cache._lookup_or_stamp
    first_stored = asyncio.Event()
    lookups = 0

    async def slow_first_lookup(key: str, tags: Sequence[str], ttl: float) -> Any:
        nonlocal lookups
        lookups += 1
        late = lookups == 1
        found = await lookup(key, tags, ttl)
        if late:
            await first_stored.wait()
        return found

    cache._lookup_or_stamp = slow_first_lookup  # type: ignore[method-assign]
    factory = Counting({"id": 7})
    late = asyncio.create_task(cache.get_or_set("listing:1", factory, ttl=60))
    while lookups < 1:
        await asyncio.sleep(0)
    assert await cache.get_or_set("listing:1", factory, ttl=60) == {"id": 7}
    first_stored.set()
    assert await late == {"id": 7}
    assert factory.calls == 1


def test_single_flight_remembers_a_bounded_number_of_stored_keys() -> None:
    flights = _SingleFlight()
    mark = flights.mark()
    for number in range(_SingleFlight.REMEMBERED + 10):
        flights.stored(f"key:{number}")
    assert len(flights._stored) == _SingleFlight.REMEMBERED
    assert not flights.stored_since("key:0", mark)  # forgotten, oldest first
    assert flights.stored_since(f"key:{_SingleFlight.REMEMBERED + 9}", mark)
    assert not flights.stored_since("key:never", mark)
    assert not flights.stored_since(f"key:{_SingleFlight.REMEMBERED + 9}", flights.mark())


async def test_a_failing_factory_caches_nothing_and_the_next_caller_retries(cache: Cache) -> None:
    async def broken() -> Any:
        raise RuntimeError("catalog unavailable")

    with pytest.raises(RuntimeError):
        await cache.get_or_set("listing:1", broken, ttl=60)
    factory = Counting({"id": 1})
    assert await cache.get_or_set("listing:1", factory, ttl=60) == {"id": 1}
    assert factory.calls == 1


async def test_a_cached_none_is_a_hit_for_get_or_set(cache: Cache) -> None:
    factory = Counting(None)
    assert await cache.get_or_set("listing:404", factory, ttl=60) is None
    assert await cache.get_or_set("listing:404", factory, ttl=60) is None
    assert factory.calls == 1
    assert await cache.get("listing:404") is None  # get cannot tell it from a miss


@pytest.mark.parametrize("empty", ["", [], {}, 0, False])
async def test_empty_values_are_hits(cache: Cache, empty: Any) -> None:
    factory = Counting(empty)
    await cache.get_or_set("search:none", factory, ttl=60)
    assert await cache.get_or_set("search:none", factory, ttl=60) == empty
    assert factory.calls == 1


async def test_a_value_read_across_an_invalidation_is_not_stored(cache: Cache) -> None:
    async def racing_factory() -> dict[str, int]:
        # The listing changes (and its tag is invalidated) while we read it.
        await cache.invalidate_tags("listing:1")
        return {"price": 100}

    assert await cache.get_or_set("listing:1", racing_factory, ttl=60, tags=["listing:1"]) == {
        "price": 100
    }
    fresh = Counting({"price": 120})
    assert await cache.get_or_set("listing:1", fresh, ttl=60, tags=["listing:1"]) == {"price": 120}
    assert fresh.calls == 1


async def test_two_caches_over_one_store_share_entries_and_invalidations(
    caches: CacheFactory,
) -> None:
    first, second = caches(), caches()
    await first.set("listing:1", {"id": 1}, ttl=60, tags=["seller:7"])
    assert await second.get("listing:1") == {"id": 1}
    factory = Counting({"id": 1})
    await second.get_or_set("listing:1", factory, ttl=60, tags=["seller:7"])
    assert factory.calls == 0

    await second.invalidate_tags("seller:7")
    assert await first.get("listing:1") is None
    await first.set("listing:1", {"id": 1, "v": 2}, ttl=60, tags=["seller:7"])
    await second.delete("listing:1")
    assert await first.get("listing:1") is None


async def test_raw_values_are_stored_and_served_as_their_bytes(cache: Cache) -> None:
    page = b'W/"e1"\n{"items": ["\xc3\xa9\\u00e9", "\\"quoted\\""]}\x00\xff'
    calls = 0

    async def render() -> bytes:
        nonlocal calls
        calls += 1
        return page

    assert await cache.get_or_set_raw("page:1", render, ttl=60, tags=["catalog"]) == page
    assert await cache.get_or_set_raw("page:1", render, ttl=60, tags=["catalog"]) == page
    assert calls == 1
    await cache.invalidate_tags("catalog")
    assert await cache.get_or_set_raw("page:1", render, ttl=60, tags=["catalog"]) == page
    assert calls == 2
    empty = Counting(b"")
    assert await cache.get_or_set_raw("page:404", empty, ttl=60) == b""
    assert await cache.get_or_set_raw("page:404", empty, ttl=60) == b""
    assert empty.calls == 1


async def test_a_raw_factory_must_answer_bytes(cache: Cache) -> None:
    async def text() -> Any:
        return "not bytes"

    with pytest.raises(TypeError, match="bytes"):
        await cache.get_or_set_raw("page:1", text, ttl=60)
    assert await cache.get("page:1") is None


async def test_a_raw_value_read_across_an_invalidation_is_not_stored(cache: Cache) -> None:
    async def racing() -> bytes:
        await cache.invalidate_tags("catalog")
        return b"old"

    assert await cache.get_or_set_raw("page:1", racing, ttl=60, tags=["catalog"]) == b"old"
    fresh = Counting(b"new")
    assert await cache.get_or_set_raw("page:1", fresh, ttl=60, tags=["catalog"]) == b"new"
    assert fresh.calls == 1


async def test_ping(cache: Cache) -> None:
    await cache.ping()


# Memory only: time comes from the injectable clock, capacity is bounded.


async def test_memory_entries_expire_by_the_clock(clock: ManualClock) -> None:
    cache = MemoryCache(clock=clock)
    factory = Counting({"id": 1})
    await cache.get_or_set("listing:1", factory, ttl=30)
    clock.advance(29.9)
    assert await cache.get("listing:1") == {"id": 1}
    clock.advance(0.1)
    assert await cache.get("listing:1") is None
    await cache.get_or_set("listing:1", factory, ttl=30)
    assert factory.calls == 2


async def test_memory_cache_evicts_the_least_recently_used(clock: ManualClock) -> None:
    cache = MemoryCache(max_entries=2, clock=clock)
    await cache.set("a", 1, ttl=60)
    await cache.set("b", 2, ttl=60)
    assert await cache.get("a") == 1  # "b" is now the least recently used
    await cache.set("c", 3, ttl=60)
    assert len(cache) == 2
    assert await cache.get("b") is None
    assert await cache.get("a") == 1
    assert await cache.get("c") == 3


async def test_memory_cache_is_bounded_by_the_bytes_it_holds(clock: ManualClock) -> None:
    cache = MemoryCache(max_bytes=1600, clock=clock)  # a value may take 100 bytes
    pages = {f"page:{n}": bytes([n]) * 80 for n in range(40)}
    for key, page in pages.items():
        assert await cache.get_or_set_raw(key, Counting(page), ttl=60) == page
    assert cache.bytes == sum(len(entry.raw) for entry in cache._entries.values())
    assert cache.bytes <= 1600 and len(cache) == 20  # the 20 most recent pages
    assert (
        await cache.get_or_set_raw("page:39", Counting(b"recomputed"), ttl=60) == pages["page:39"]
    )
    assert await cache.get_or_set_raw("page:0", Counting(b"recomputed"), ttl=60) == b"recomputed"
    # A value over its share is served, not kept, and evicts nothing.
    big = Counting(b"x" * 101)
    assert await cache.get_or_set_raw("big", big, ttl=60) == b"x" * 101
    assert await cache.get_or_set_raw("big", big, ttl=60) == b"x" * 101
    assert big.calls == 2 and len(cache) == 20
    # Replacing, expiring and deleting entries give their bytes back.
    await cache.set("page:39", "short", ttl=60)
    clock.advance(61)
    for key in list(cache._entries):
        await cache.get(key)
    assert len(cache) == 0 and cache.bytes == 0
    await cache.set("a", "value", ttl=60)
    await cache.delete("a")
    assert cache.bytes == 0


async def test_memory_tag_table_stays_bounded(clock: ManualClock) -> None:
    cache = MemoryCache(max_entries=3, clock=clock)
    for n in range(100):
        await cache.set(f"listing:{n}", n, ttl=60, tags=[f"listing:{n}"])
    assert len(cache._tags) <= 2 * cache.max_entries + 1
    assert await cache.get("listing:99") == 99
    await cache.invalidate_tags("listing:99")
    assert await cache.get("listing:99") is None


async def test_memory_single_flight_forgets_finished_keys(clock: ManualClock) -> None:
    cache = MemoryCache(clock=clock)
    await asyncio.gather(*(cache.get_or_set(f"k{n % 3}", Counting(n), ttl=60) for n in range(9)))
    assert len(cache._flights) == 0


# Redis only: what lives on the server.


@pytest.mark.redis
async def test_redis_stores_json_with_a_server_side_ttl(
    redis_url: str, redis_namespace: str
) -> None:
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        cache = RedisCache(client, namespace=redis_namespace)
        await cache.set("listing:1", {"title": "Kikoi"}, ttl=30, tags=["seller:7"])
        key = f"{redis_namespace}entry:listing:1"
        assert json.loads(await client.hget(key, "v")) == {"title": "Kikoi"}
        assert 0 < await client.pttl(key) <= 30_000
        # The tag outlives the entries that depend on it.
        assert await client.pttl(f"{redis_namespace}tag:seller:7") >= await client.pttl(key)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_entries_expire_on_the_server(redis_url: str, redis_namespace: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        cache = RedisCache(client, namespace=redis_namespace)
        await cache.set("flash-sale", {"on": True}, ttl=0.02)
        for _ in range(500):  # Redis' clock, not ours: wait until it has expired the key
            if await cache.get("flash-sale") is None:
                break
            await asyncio.sleep(0.01)
        assert await cache.get("flash-sale") is None
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_lost_tag_makes_entries_stale(redis_url: str, redis_namespace: str) -> None:
    """An evicted tag key must never resurrect an invalidated entry."""
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        cache = RedisCache(client, namespace=redis_namespace)
        await cache.set("listing:1", {"v": 1}, ttl=60, tags=["seller:7"])
        await client.delete(f"{redis_namespace}tag:seller:7")  # as maxmemory eviction would
        assert await cache.get("listing:1") is None
        await cache.set("listing:2", {"v": 2}, ttl=60, tags=["seller:7"])
        assert await cache.get("listing:1") is None
        assert await cache.get("listing:2") == {"v": 2}
    finally:
        await client.aclose()


class _Cable:
    """A TCP relay to Redis that can be cut and mended, as a network would."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = True
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.mark.redis
async def test_an_invalidation_lost_in_an_outage_is_sent_before_the_next_read(
    redis_url: str, redis_namespace: str
) -> None:
    """A change committed while Redis was unreachable: its invalidation failed, and the
    entry it outdated is still in Redis when Redis is back. It is never served."""
    from urllib.parse import urlsplit

    from soko.platform.runtime import redis_client

    parts = urlsplit(redis_url)
    cable = _Cable((parts.hostname or "127.0.0.1", parts.port or 6379))
    port = await cable.start()
    database = parts.path.lstrip("/") or "0"
    ours_client = redis_client(f"redis://127.0.0.1:{port}/{database}", max_connections=4)
    theirs_client = Redis.from_url(redis_url, decode_responses=False)
    try:
        ours = RedisCache(ours_client, namespace=redis_namespace, rest_seconds=0)
        theirs = RedisCache(theirs_client, namespace=redis_namespace)  # another process
        await ours.set("listing:1", {"price": 100}, ttl=60, tags=["product:1"])

        cable.cut()  # the change is committed; its invalidation cannot be sent
        with pytest.raises((RedisConnectionError, OSError)):
            await ours.invalidate_tags("product:1")
        assert await theirs.get("listing:1") == {"price": 100}  # still in Redis
        fresh = Counting({"price": 120})
        assert await ours.get_or_set("listing:1", fresh, ttl=60) == {"price": 120}

        cable.up = True  # back: the next read sends the invalidation first
        assert await ours.get_or_set("listing:1", fresh, ttl=60) == {"price": 120}
        assert fresh.calls == 2 and not ours._unsent
        assert await theirs.get("listing:1") == {"price": 120}  # what ours stored since
        assert await ours.get_or_set("listing:1", fresh, ttl=60) == {"price": 120}
        assert fresh.calls == 2  # cached again
    finally:
        await ours_client.aclose()
        await theirs_client.aclose()
        await cable.stop()


@pytest.mark.redis
async def test_redis_namespaces_are_apart(redis_url: str, redis_namespace: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        ours = RedisCache(client, namespace=redis_namespace + "a:")
        theirs = RedisCache(client, namespace=redis_namespace + "b:")
        await ours.set("listing:1", 1, ttl=60, tags=["seller:7"])
        await theirs.set("listing:1", 2, ttl=60, tags=["seller:7"])
        await theirs.invalidate_tags("seller:7")
        assert await ours.get("listing:1") == 1
        assert await theirs.get("listing:1") is None
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_unreachable_redis_serves_from_the_factory_but_refuses_invalidation() -> None:
    client = Redis.from_url(
        "redis://127.0.0.1:1/0", decode_responses=False, socket_connect_timeout=1
    )
    try:
        cache = RedisCache(client, namespace="sokotest:unreachable:")
        before = REGISTRY.get_sample_value("soko_cache_unavailable_total") or 0
        factory = Counting({"id": 1})
        assert await cache.get_or_set("listing:1", factory, ttl=60) == {"id": 1}
        assert factory.calls == 1
        assert REGISTRY.get_sample_value("soko_cache_unavailable_total") == before + 1
        with pytest.raises(RedisConnectionError):
            await cache.invalidate_tags("seller:7")
        with pytest.raises(RedisConnectionError):
            await cache.ping()
    finally:
        await client.aclose()


async def test_a_hanging_redis_costs_one_timeout_then_is_left_alone_for_a_while() -> None:
    """A Redis that accepts and never answers (a stopped process, a dropped route): the
    first read waits for the client's timeout, then reads go to the source without
    asking Redis until the rest is over."""
    from soko.platform.runtime import redis_client

    commands: list[bytes] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            commands.append(chunk)  # read, never answered

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = redis_client(f"redis://127.0.0.1:{port}/0", max_connections=4, timeout_seconds=0.2)
    try:
        cache = RedisCache(client, namespace="sokotest:hanging:", rest_seconds=60)
        factory = Counting({"id": 1})
        assert await cache.get_or_set("listing:1", factory, ttl=60) == {"id": 1}
        asked = len(commands)
        assert asked >= 1
        for _ in range(5):
            assert await cache.get_or_set("listing:1", factory, ttl=60) == {"id": 1}
        assert factory.calls == 6
        assert len(commands) == asked  # resting: Redis was not asked again
        cache._resting_until = 0.0  # the rest is over: Redis is asked again
        assert await cache.get_or_set("listing:1", factory, ttl=60) == {"id": 1}
        assert len(commands) > asked
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_an_unreachable_cache_runs_one_factory_for_concurrent_callers() -> None:
    """While Redis is down every caller bypasses the cache, but concurrent callers of
    one key share one read of the source, its answer or its error."""
    client = Redis.from_url("redis://127.0.0.1:1/0", decode_responses=False)
    cache = RedisCache(client, namespace="sokotest:unreachable:")
    calls = 0
    release = asyncio.Event()

    async def factory() -> dict[str, int]:
        nonlocal calls
        calls += 1
        await release.wait()
        return {"page": calls}

    unavailable = REGISTRY.get_sample_value("soko_cache_unavailable_total") or 0
    try:
        waiting = [asyncio.create_task(cache.get_or_set("k", factory, 30)) for _ in range(25)]
        # Each caller counts the cache unavailable, then at once joins the read under way
        # or starts it: once all 25 have counted, all are waiting for the one read.
        async with asyncio.timeout(10):
            while (REGISTRY.get_sample_value("soko_cache_unavailable_total") or 0) < (
                unavailable + 25
            ):
                await asyncio.sleep(0.005)
        release.set()
        assert await asyncio.gather(*waiting) == [{"page": 1}] * 25
        assert calls == 1
        # Nothing was cached: the next caller reads the source again.
        assert await cache.get_or_set("k", factory, 30) == {"page": 2}

        async def broken() -> Any:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.05)
            raise RuntimeError("source down")

        calls = 0
        failing = await asyncio.gather(
            *(cache.get_or_set("k", broken, 30) for _ in range(5)), return_exceptions=True
        )
        assert calls == 1
        assert all(isinstance(outcome, RuntimeError) for outcome in failing)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_a_burst_beyond_the_pool_is_served_from_the_cache(
    redis_url: str, redis_namespace: str
) -> None:
    """More lookups in flight than the runtime's pool has connections: they wait for a
    connection and hit the cache; none finds it "unavailable" and reads the source."""
    from soko.platform.runtime import redis_client

    client = redis_client(redis_url, max_connections=2)
    cache = RedisCache(client, namespace=redis_namespace)
    calls = 0

    async def factory() -> dict[str, str]:
        nonlocal calls
        calls += 1
        return {"page": "rendered"}

    try:
        await cache.get_or_set("page", factory, 30, tags=["catalog"])
        with capture_logs() as logs:
            answers = await asyncio.gather(
                *(cache.get_or_set("page", factory, 30, tags=["catalog"]) for _ in range(80))
            )
        assert answers == [{"page": "rendered"}] * 80
        assert calls == 1
        assert not [entry for entry in logs if entry["event"] == "cache_unavailable"]
    finally:
        await client.aclose()
