"""Near copies of shared cache entries: served without a round trip, dropped in every
process on every change, never kept across a change that raced with their read."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from structlog.testing import capture_logs

from soko.platform.cache import NearCopies, RedisCache

pytestmark = pytest.mark.redis


class Render:
    """A factory answering ``value`` and counting its calls."""

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.calls = 0

    async def __call__(self) -> bytes:
        self.calls += 1
        return self.value


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not check():
            await asyncio.sleep(0.005)


async def listening(cache: RedisCache, key: str = "warm", tags: tuple[str, ...] = ()) -> None:
    """Start the cache's listener (a near lookup does) and wait until it hears changes."""
    await cache.get_or_set_raw(key, Render(b"warm"), ttl=60, tags=tags, near=True)
    await eventually(lambda: cache.near.listening)


def read(cache: RedisCache, render: Render) -> Awaitable[bytes]:
    return cache.get_or_set_raw("page:1", render, ttl=60, tags=["catalog"], near=True)


async def test_a_near_copy_is_served_without_asking_redis(
    redis_caches: Callable[..., RedisCache],
) -> None:
    cache = redis_caches()
    await listening(cache)
    render = Render(b"page one")
    assert await read(cache, render) == b"page one"
    # Gone from Redis behind the cache's back: only the near copy can answer.
    await cache.redis.delete(cache.entry_key("page:1"))
    assert await read(cache, render) == b"page one"
    assert render.calls == 1
    # Without near, the shared entry is asked for (and is gone).
    assert await cache.get_or_set_raw("page:1", Render(b"fresh"), ttl=60) == b"fresh"


async def test_a_change_in_another_process_drops_the_copy(
    redis_caches: Callable[..., RedisCache],
) -> None:
    reader, writer = redis_caches(), redis_caches()
    await listening(reader)
    assert await read(reader, Render(b"old")) == b"old"
    heard = reader.near.mark
    await writer.invalidate_tags("catalog")
    await eventually(lambda: reader.near.mark > heard)
    assert reader.near.get("page:1") is None
    assert await read(reader, Render(b"new")) == b"new"


@pytest.mark.parametrize("change", ["delete", "set"])
async def test_deleting_or_setting_a_key_elsewhere_drops_the_copy(
    redis_caches: Callable[..., RedisCache], change: str
) -> None:
    reader, writer = redis_caches(), redis_caches()
    await listening(reader)
    assert await read(reader, Render(b"old")) == b"old"
    heard = reader.near.mark
    if change == "delete":
        await writer.delete("page:1")
    else:
        await writer.set("page:1", {"page": 2}, ttl=60)
    await eventually(lambda: reader.near.mark > heard)
    assert reader.near.get("page:1") is None


async def test_the_process_that_changes_sees_it_at_once(
    redis_caches: Callable[..., RedisCache],
) -> None:
    cache = redis_caches()
    await listening(cache)
    assert await read(cache, Render(b"old")) == b"old"
    await cache.invalidate_tags("catalog")
    assert await read(cache, Render(b"new")) == b"new"


async def test_a_copy_read_across_a_change_is_not_kept() -> None:
    near = NearCopies()
    near.listening = True
    mark = near.mark  # a read begins ...
    near.invalidate(tags=["catalog"])  # ... a change is heard before it ends
    near.put("page:1", b"maybe stale", ["catalog"], ttl=60, mark=mark)
    assert near.get("page:1") is None
    near.put("page:1", b"fresh", ["catalog"], ttl=60, mark=near.mark)
    assert near.get("page:1") == b"fresh"


async def test_nothing_is_kept_or_served_while_not_listening() -> None:
    near = NearCopies()
    near.put("page:1", b"page", ["catalog"], ttl=60, mark=near.mark)
    assert near.get("page:1") is None
    near.listening = True
    near.put("page:1", b"page", ["catalog"], ttl=60, mark=near.mark)
    near.listening = False
    assert near.get("page:1") is None


async def test_copies_expire_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("soko.platform.cache.time.monotonic", lambda: now[0])
    near = NearCopies(max_entries=2, max_seconds=5.0)
    near.listening = True
    for n in range(3):
        near.put(f"page:{n}", b"x", ["catalog", f"p{n}"], ttl=60, mark=near.mark)
    assert len(near) == 2 and near.get("page:0") is None
    assert near.get("page:2") == b"x"
    now[0] += 5.0
    assert near.get("page:2") is None
    near.invalidate(tags=["catalog"])
    assert len(near) == 0 and not near._by_tag


async def test_copies_are_bounded_by_the_bytes_they_hold() -> None:
    near = NearCopies(max_bytes=160)  # a copy may take 10 bytes
    near.listening = True
    for n in range(20):
        near.put(f"page:{n}", b"y" * 8, ["catalog"], ttl=60, mark=near.mark)
    assert near.bytes == 160 and len(near) == 20
    near.put("page:20", b"y" * 8, ["catalog"], ttl=60, mark=near.mark)
    assert near.bytes == 160 and near.get("page:0") is None and near.get("page:20")
    near.put("page:big", b"z" * 11, ["catalog"], ttl=60, mark=near.mark)
    assert near.get("page:big") is None and len(near) == 20
    near.invalidate(tags=["catalog"])
    assert near.bytes == 0 and len(near) == 0


async def test_a_lost_channel_drops_every_copy_until_it_is_back(
    redis_caches: Callable[..., RedisCache],
) -> None:
    cache = redis_caches()
    await listening(cache)
    assert await read(cache, Render(b"page")) == b"page"
    # The listener's connection dies (Redis restarted, a network cut).
    host, port = cache._subscription.connection._writer.get_extra_info("sockname")[:2]
    with capture_logs() as logs:
        await cache.redis.client_kill_filter(_type=None, addr=f"{host}:{port}")
        await eventually(lambda: not cache.near.listening or len(cache.near) == 0)
        assert cache.near.get("page:1") is None
        await eventually(lambda: cache.near.listening)
    assert any(entry["event"] == "cache_channel_lost" for entry in logs)
    # Listening again: copies are kept and served once more.
    render = Render(b"page")
    assert await read(cache, render) == b"page"
    assert cache.near.get("page:1") == b"page"


async def test_closing_stops_the_listener(redis_caches: Callable[..., RedisCache]) -> None:
    cache = redis_caches()
    await listening(cache)
    listener = cache._listener
    await cache.close()
    assert listener is not None and listener.done()
    assert not cache.near.listening and len(cache.near) == 0
