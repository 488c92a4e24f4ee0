"""Fixtures shared by the platform's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from soko.platform.cache import RedisCache
from soko.platform.clock import Clock


@pytest.fixture
async def redis_caches(
    redis_url: str, redis_namespace: str
) -> AsyncIterator[Callable[..., RedisCache]]:
    """Caches over one Redis namespace, each with its own client, as processes would
    have; ``make(clock=..., retry_seconds=...)``. ``retry_seconds`` is also a fifth of
    the silence after which the listener asks Redis for a pong, and gives up on the
    channel when none comes: much less than production's second, and a Redis slow to
    answer on a loaded machine would have the cache drop its copies mid-test."""
    made: list[tuple[RedisCache, Redis]] = []

    def make(clock: Clock | None = None, retry_seconds: float = 1.0) -> RedisCache:
        client = Redis.from_url(redis_url, decode_responses=False)
        cache = RedisCache(
            client, namespace=redis_namespace, retry_seconds=retry_seconds, clock=clock
        )
        made.append((cache, client))
        return cache

    yield make
    for cache, client in made:
        await cache.close()
        await client.aclose()
