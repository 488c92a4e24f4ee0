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
    have; ``make(clock=..., retry_seconds=...)``."""
    made: list[tuple[RedisCache, Redis]] = []

    def make(clock: Clock | None = None, retry_seconds: float = 0.05) -> RedisCache:
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
