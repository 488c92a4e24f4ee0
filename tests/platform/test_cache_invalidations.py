"""Tag invalidations that overlap in time go out together: one round trip and one
message on the channel for all of them, each caller answered only once its own tags
are gone, in a send that began after its call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from soko.platform.cache import RedisCache, _Coalesced


class Sends:
    """A send that records each batch, and can be held open or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.failure: Exception | None = None

    async def __call__(self, tags: list[str]) -> None:
        self.batches.append(tags)
        self.started.set()
        await self.release.wait()
        if self.failure is not None:
            raise self.failure


async def test_calls_made_together_are_sent_together() -> None:
    sends = Sends()
    coalesced = _Coalesced(sends)
    await asyncio.gather(*(coalesced.send([f"t{i}", "shared"]) for i in range(10)))
    assert sends.batches == [["t0", "shared", *(f"t{i}" for i in range(1, 10))]]


async def sending_a() -> tuple[Sends, _Coalesced, asyncio.Task[None]]:
    """A send of tag "a" under way, held open until ``sends.release`` is set."""
    sends = Sends()
    sends.release.clear()
    coalesced = _Coalesced(sends)
    first = asyncio.create_task(coalesced.send(["a"]))
    await sends.started.wait()
    return sends, coalesced, first


async def test_a_call_made_during_a_send_waits_for_a_send_of_its_own() -> None:
    """The send under way may have begun before the caller's change was committed, so it
    cannot stand for that caller: its tags go in the next one, and it waits for it."""
    sends, coalesced, first = await sending_a()
    second = asyncio.create_task(coalesced.send(["b"]))
    third = asyncio.create_task(coalesced.send(["c", "b"]))
    await asyncio.sleep(0.01)
    assert not first.done() and not second.done()
    sends.release.set()
    await first
    await asyncio.gather(second, third)
    assert sends.batches == [["a"], ["b", "c"]]
    # A lone call afterwards is sent at once, on its own.
    await coalesced.send(["d"])
    assert sends.batches[-1] == ["d"]


async def test_a_caller_that_goes_away_is_invalidated_all_the_same() -> None:
    sends, coalesced, sending = await sending_a()
    waiting = asyncio.create_task(coalesced.send(["b"]))
    await asyncio.sleep(0)
    sending.cancel()
    waiting.cancel()
    sends.release.set()
    await coalesced.drain()
    assert sends.batches == [["a"], ["b"]]
    assert sending.cancelled() and waiting.cancelled()


async def test_a_failed_send_fails_every_call_it_carried() -> None:
    sends = Sends()
    sends.failure = ConnectionError("redis went away")
    coalesced = _Coalesced(sends)
    outcomes = await asyncio.gather(
        coalesced.send(["a"]), coalesced.send(["b"]), return_exceptions=True
    )
    assert [type(outcome) for outcome in outcomes] == [ConnectionError, ConnectionError]
    sends.failure = None
    await coalesced.send(["c"])
    assert sends.batches == [["a", "b"], ["c"]]


# -- against Redis ---------------------------------------------------------------------------------


def answer(value: dict[str, bool]) -> Callable[[], Awaitable[dict[str, bool]]]:
    async def factory() -> dict[str, bool]:
        return value

    return factory


@pytest.fixture
async def redis_cache(redis_url: str, redis_namespace: str) -> AsyncIterator[RedisCache]:
    client = Redis.from_url(redis_url, decode_responses=False)
    cache = RedisCache(client, namespace=redis_namespace)
    yield cache
    await cache.close()
    await client.aclose()


async def _heard(pubsub: Any, seconds: float) -> list[list[str]]:
    """The tags of every message on the channel for ``seconds``."""
    heard: list[list[str]] = []
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
        if message is not None:
            heard.append(json.loads(message["data"])["tags"])
    return heard


@pytest.mark.redis
async def test_overlapping_invalidations_make_one_round_trip_and_one_message(
    redis_cache: RedisCache,
) -> None:
    tags = [f"stock:{i}" for i in range(20)]
    for tag in tags:  # each tag gets a token, and an entry computed under it
        await redis_cache.get_or_set(f"page:{tag}", answer({"fresh": True}), ttl=60, tags=[tag])
    pubsub = redis_cache.redis.pubsub()
    await pubsub.subscribe(redis_cache.channel)
    async with asyncio.timeout(5):  # the subscription is confirmed
        while await pubsub.get_message(timeout=0.05) is None:
            pass

    await asyncio.gather(*(redis_cache.invalidate_tags(tag, "inventory") for tag in tags))

    # Every caller has returned: every token is gone, so every entry is stale.
    assert await redis_cache.redis.exists(*(redis_cache.tag_key(tag) for tag in tags)) == 0
    for tag in tags:
        value = await redis_cache.get_or_set(
            f"page:{tag}", answer({"fresh": False}), ttl=60, tags=[tag]
        )
        assert value == {"fresh": False}
    assert await _heard(pubsub, 0.3) == [[tags[0], "inventory", *tags[1:]]]
    await pubsub.aclose()  # type: ignore[no-untyped-call]


@pytest.mark.redis
async def test_a_send_of_thousands_of_tags_drops_them_all(redis_cache: RedisCache) -> None:
    tags = [f"stock:{i}" for i in range(9_000)]  # more than Lua unpacks at once
    for tag in tags[::500]:
        await redis_cache.get_or_set(f"page:{tag}", answer({"fresh": True}), ttl=60, tags=[tag])
    await redis_cache.redis.mset({redis_cache.tag_key(tag): "token" for tag in tags})
    await redis_cache.invalidate_tags(*tags)
    assert await redis_cache.redis.exists(*(redis_cache.tag_key(tag) for tag in tags)) == 0
    for tag in tags[::500]:
        value = await redis_cache.get_or_set(
            f"page:{tag}", answer({"fresh": False}), ttl=60, tags=[tag]
        )
        assert value == {"fresh": False}
