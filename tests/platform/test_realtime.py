"""Realtime pub/sub on both backends: delivery, JSON, clean unsubscribe, cross-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from soko.platform.realtime import MemoryPubSub, PubSub, RealtimeMessage, RedisPubSub

PubSubFactory = Callable[[], PubSub]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest) -> tuple[str, str] | None:
    """None for memory, or the Redis URL and this test's namespace."""
    if request.param == "memory":
        return None
    return request.getfixturevalue("redis_url"), request.getfixturevalue("redis_namespace")


@pytest.fixture
async def hubs(store: tuple[str, str] | None) -> AsyncIterator[PubSubFactory]:
    """Makes pub/subs over one shared bus: on Redis each has its own client (another
    process); in memory they are one object, since memory fan-out is per process."""
    if store is None:
        memory = MemoryPubSub()
        yield lambda: memory
        await memory.close()
        return
    redis_url, namespace = store
    made: list[tuple[Redis, RedisPubSub]] = []

    def make() -> PubSub:
        client = Redis.from_url(redis_url, decode_responses=False)
        pubsub = RedisPubSub(client, namespace=namespace, poll_seconds=0.05)
        made.append((client, pubsub))
        return pubsub

    yield make
    for client, pubsub in made:
        await pubsub.close()
        await client.aclose()


@pytest.fixture
def hub(hubs: PubSubFactory) -> PubSub:
    return hubs()


async def next_message(messages: AsyncIterator[RealtimeMessage]) -> RealtimeMessage:
    return await asyncio.wait_for(anext(messages), 5)


async def test_a_publish_reaches_the_subscriber(hub: PubSub) -> None:
    async with hub.subscribe("order:42") as messages:
        receivers = await hub.publish("order:42", {"status": "paid", "total": {"amount": 1500}})
        assert receivers == 1
        message = await next_message(messages)
    assert message == RealtimeMessage("order:42", {"status": "paid", "total": {"amount": 1500}})


async def test_a_subscriber_gets_only_its_channels_in_order(hub: PubSub) -> None:
    async with hub.subscribe("order:42", "seller:7") as messages:
        await hub.publish("order:43", {"n": 0})
        await hub.publish("order:42", {"n": 1})
        await hub.publish("seller:7", {"n": 2})
        await hub.publish("order:42", {"n": 3})
        received = [await next_message(messages) for _ in range(3)]
    assert received == [
        RealtimeMessage("order:42", {"n": 1}),
        RealtimeMessage("seller:7", {"n": 2}),
        RealtimeMessage("order:42", {"n": 3}),
    ]


async def test_every_subscriber_gets_its_own_copy(hub: PubSub) -> None:
    async with hub.subscribe("order:42") as first, hub.subscribe("order:42") as second:
        assert await hub.publish("order:42", {"items": [1]}) == 2
        one, two = await next_message(first), await next_message(second)
    one.data["items"].append(2)
    assert two.data == {"items": [1]}


async def test_publish_without_subscribers_reaches_nobody(hub: PubSub) -> None:
    assert await hub.publish("order:404", {"status": "paid"}) == 0


@pytest.mark.parametrize(
    "message", [{"at": object()}, {"ratio": float("nan")}, ["not", "a", "dict"]]
)
async def test_only_json_objects_are_published(hub: PubSub, message: Any) -> None:
    with pytest.raises(TypeError):
        await hub.publish("order:42", message)


async def test_subscribe_needs_a_channel(hub: PubSub) -> None:
    with pytest.raises(ValueError):
        async with hub.subscribe():
            pass


async def test_leaving_the_block_unsubscribes(hub: PubSub) -> None:
    async with hub.subscribe("order:42", "order:42") as messages:
        assert await hub.publish("order:42", {"n": 1}) == 1
        await next_message(messages)
    assert await hub.publish("order:42", {"n": 2}) == 0
    with pytest.raises(StopAsyncIteration):
        await next_message(messages)


async def test_an_error_in_the_block_still_unsubscribes(hub: PubSub) -> None:
    with pytest.raises(RuntimeError):
        async with hub.subscribe("order:42"):
            raise RuntimeError("socket closed")
    assert await hub.publish("order:42", {"n": 1}) == 0


async def test_subscriptions_leave_no_tasks_behind(hub: PubSub) -> None:
    before = asyncio.all_tasks()
    for _ in range(5):
        async with hub.subscribe("order:42") as messages:
            await hub.publish("order:42", {"n": 1})
            await next_message(messages)
    assert asyncio.all_tasks() == before


async def test_close_ends_every_subscription(hub: PubSub) -> None:
    async with hub.subscribe("order:42") as messages:
        received: list[RealtimeMessage] = []

        async def consume() -> None:
            async for message in messages:
                received.append(message)

        consumer = asyncio.create_task(consume())
        await hub.publish("order:42", {"n": 1})
        async with asyncio.timeout(5):
            while not received:
                await asyncio.sleep(0.01)
        await hub.close()
        await asyncio.wait_for(consumer, 5)
    assert received == [RealtimeMessage("order:42", {"n": 1})]
    with pytest.raises(RuntimeError):
        async with hub.subscribe("order:42"):
            pass


async def test_two_hubs_over_one_bus_reach_each_other(hubs: PubSubFactory) -> None:
    publisher, subscriber = hubs(), hubs()
    async with subscriber.subscribe("booking:9") as messages:
        assert await publisher.publish("booking:9", {"slot": "2030-01-01T09:00:00Z"}) == 1
        assert await next_message(messages) == RealtimeMessage(
            "booking:9", {"slot": "2030-01-01T09:00:00Z"}
        )


async def test_ping(hub: PubSub) -> None:
    await hub.ping()


async def test_memory_forgets_channels_nobody_listens_to() -> None:
    hub = MemoryPubSub()
    async with hub.subscribe("order:42", "seller:7"):
        assert hub.subscriptions == 2
    assert hub.subscriptions == 0
    assert not hub._subscribers


async def test_memory_slow_subscriber_loses_messages_not_the_publisher() -> None:
    hub = MemoryPubSub(queue_size=2)
    async with hub.subscribe("order:42") as messages:
        assert [await hub.publish("order:42", {"n": n}) for n in range(3)] == [1, 1, 0]
        assert (await next_message(messages)).data == {"n": 0}
        assert (await next_message(messages)).data == {"n": 1}


@pytest.mark.redis
async def test_redis_returns_its_connection_and_drops_the_subscription(
    redis_url: str, redis_namespace: str
) -> None:
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        hub = RedisPubSub(client, namespace=redis_namespace, poll_seconds=0.05)
        await hub.ping()
        pool = client.connection_pool
        in_use = len(pool._in_use_connections)
        channel = f"{redis_namespace}order:42"
        async with hub.subscribe("order:42"):
            assert await client.pubsub_numsub(channel) == [(channel.encode(), 1)]
            assert len(pool._in_use_connections) == in_use + 1
        assert await client.pubsub_numsub(channel) == [(channel.encode(), 0)]
        assert len(pool._in_use_connections) == in_use
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_namespaces_are_apart(redis_url: str, redis_namespace: str) -> None:
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        ours = RedisPubSub(client, namespace=redis_namespace + "a:")
        theirs = RedisPubSub(client, namespace=redis_namespace + "b:")
        async with ours.subscribe("order:42") as messages:
            assert await theirs.publish("order:42", {"from": "them"}) == 0
            assert await ours.publish("order:42", {"from": "us"}) == 1
            assert (await next_message(messages)).data == {"from": "us"}
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_redis_skips_payloads_that_are_not_json_objects(
    redis_url: str, redis_namespace: str
) -> None:
    client = Redis.from_url(redis_url, decode_responses=False)
    try:
        hub = RedisPubSub(client, namespace=redis_namespace, poll_seconds=0.05)
        channel = f"{redis_namespace}order:42"
        async with hub.subscribe("order:42") as messages:
            await client.publish(channel, b"not json")
            await client.publish(channel, b"[1, 2]")
            await hub.publish("order:42", {"n": 1})
            assert (await next_message(messages)).data == {"n": 1}
    finally:
        await client.aclose()


async def test_a_push_lost_in_an_outage_is_a_warning_and_a_bug_a_traceback() -> None:
    """A change committed while Redis is down loses its push (clients reload on
    reconnect): that is logged as a warning with no traceback, so an outage does not
    flood error alerts; any other failure keeps its traceback."""
    from structlog.testing import capture_logs

    from soko.platform.realtime import _publish_committed

    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        down = RedisPubSub(client, namespace="sokotest:down:")
        with capture_logs() as logs:
            await _publish_committed(down, "order:42", {"status": "paid"})
        [line] = [log for log in logs if log["event"] == "publish after commit failed"]
        assert line["log_level"] == "warning" and "exc_info" not in line
        assert line["error"] == "ConnectionError"

        class Broken(MemoryPubSub):
            async def publish(self, channel: str, message: Any) -> int:
                raise ValueError("a bug")

        with capture_logs() as logs:
            await _publish_committed(Broken(), "order:42", {"status": "paid"})
        [line] = [log for log in logs if log["event"] == "publish after commit failed"]
        assert line["log_level"] == "error" and line.get("exc_info")
    finally:
        await client.aclose()
