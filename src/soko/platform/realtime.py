"""Realtime publish/subscribe for pushing messages to connected clients.

``await pubsub.publish("order:42", {"status": "paid"})`` sends a JSON object to every
current subscriber of the channel, and::

    async with pubsub.subscribe("order:42", "seller:7") as messages:
        async for message in messages:
            ...  # message.channel, message.data

receives them until the block is left (or the pub/sub is closed, which ends every
iteration). Delivery is at most once, to subscribers connected at publish time: a
subscriber that is slow (its queue full in memory, its output buffer over Redis'
``client-output-buffer-limit pubsub``) or briefly disconnected misses messages, so
clients reload state on reconnect and durable work goes through the outbox.

Messages are JSON on both backends, so a publisher learns at once (``TypeError``) that a
payload would not survive Redis, and each subscriber gets its own copy.

:func:`publish_after_commit` publishes once a database transaction has committed, and
not at all if it rolls back: a push about a row never goes out before the row exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.client import PubSub as RedisClientPubSub

log = structlog.get_logger("soko.realtime")


@dataclass(frozen=True, slots=True)
class RealtimeMessage:
    channel: str
    data: dict[str, Any]


def encode_message(message: Mapping[str, Any]) -> bytes:
    if not isinstance(message, Mapping):
        raise TypeError(f"a realtime message is a JSON object, not a {type(message).__name__}")
    try:
        return json.dumps(dict(message), separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise TypeError(f"cannot publish {message!r}: {exc}") from exc


# What publish_after_commit queued on a session: (pub/sub, channel, message).
_AFTER_COMMIT = "soko.realtime.after_commit"
# Publishes started after a commit, referenced until done (a task nobody holds can be
# collected before it runs).
_STARTED: set[asyncio.Task[None]] = set()


def publish_after_commit(
    session: AsyncSession, pubsub: PubSub, channel: str, message: Mapping[str, Any]
) -> None:
    """Publish ``message`` on ``channel`` once ``session``'s transaction has committed;
    never if it rolls back. At most once, like every publish: a process that stops
    between the commit and the publish loses the push, and clients reload on reconnect.
    A message that could not be published raises here, inside the transaction. Queue it
    outside a savepoint: one rolled back on its own does not withdraw the push."""
    encode_message(message)
    session.info.setdefault(_AFTER_COMMIT, []).append((pubsub, channel, dict(message)))


async def _publish_committed(pubsub: PubSub, channel: str, message: dict[str, Any]) -> None:
    try:
        await pubsub.publish(channel, message)
    except Exception as exc:  # the change is committed; a lost push is reloaded on reconnect
        if _is_unreachable(exc):
            # An outage (/ready and the metrics say so), not a bug: no traceback.
            log.warning("publish after commit failed", channel=channel, error=type(exc).__name__)
        else:
            log.exception("publish after commit failed", channel=channel)


def _is_unreachable(exc: Exception) -> bool:
    """Whether ``exc`` says the broker cannot be reached (a socket error, or Redis's
    connection and timeout errors)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return isinstance(exc, (OSError, RedisConnectionError, RedisTimeoutError))


@event.listens_for(Session, "after_commit")
def _start_committed_publishes(session: Session) -> None:
    queued = session.info.pop(_AFTER_COMMIT, None)
    if not queued:
        return
    loop = asyncio.get_running_loop()
    for pubsub, channel, message in queued:
        task = loop.create_task(_publish_committed(pubsub, channel, message))
        _STARTED.add(task)
        task.add_done_callback(_STARTED.discard)


@event.listens_for(Session, "after_rollback")
def _drop_rolled_back_publishes(session: Session) -> None:
    session.info.pop(_AFTER_COMMIT, None)


class PubSub(Protocol):
    async def publish(self, channel: str, message: Mapping[str, Any]) -> int:
        """Send ``message`` to the channel's subscribers; answers how many got it."""
        ...

    def subscribe(
        self, *channels: str
    ) -> AbstractAsyncContextManager[AsyncIterator[RealtimeMessage]]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def _channels(channels: tuple[str, ...]) -> list[str]:
    if not channels:
        raise ValueError("subscribe to at least one channel")
    return list(dict.fromkeys(channels))


class _MemoryMessages:
    """A subscription's iterator: ends when the subscription or the pub/sub closes."""

    def __init__(self, queue: asyncio.Queue[RealtimeMessage | None]) -> None:
        self._queue = queue
        self.closed = False

    def __aiter__(self) -> _MemoryMessages:
        return self

    async def __anext__(self) -> RealtimeMessage:
        if self.closed:
            raise StopAsyncIteration
        message = await self._queue.get()
        if message is None:
            self.closed = True
            raise StopAsyncIteration
        return message

    def offer(self, message: RealtimeMessage) -> bool:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            return False
        return True

    def end(self) -> None:
        self.closed = True
        if self._queue.full():
            self._queue.get_nowait()  # make room for the end marker
        self._queue.put_nowait(None)


class MemoryPubSub:
    """Fan-out within one process."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._subscribers: dict[str, set[_MemoryMessages]] = defaultdict(set)
        self.queue_size = queue_size
        self.closed = False

    @property
    def subscriptions(self) -> int:
        return sum(len(subscribers) for subscribers in self._subscribers.values())

    async def publish(self, channel: str, message: Mapping[str, Any]) -> int:
        raw = encode_message(message)
        delivered = 0
        for subscriber in list(self._subscribers.get(channel, ())):
            if subscriber.offer(RealtimeMessage(channel, json.loads(raw))):
                delivered += 1
            else:
                # A slow consumer loses messages rather than stalling publishers.
                log.warning("realtime_subscriber_lagging", channel=channel)
        return delivered

    @asynccontextmanager
    async def subscribe(self, *channels: str) -> AsyncIterator[AsyncIterator[RealtimeMessage]]:
        names = _channels(channels)
        if self.closed:
            raise RuntimeError("this pub/sub is closed")
        messages = _MemoryMessages(asyncio.Queue(self.queue_size))
        for channel in names:
            self._subscribers[channel].add(messages)
        try:
            yield messages
        finally:
            messages.closed = True
            for channel in names:
                subscribers = self._subscribers.get(channel)
                if subscribers is not None:
                    subscribers.discard(messages)
                    if not subscribers:
                        del self._subscribers[channel]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self.closed = True
        for subscribers in list(self._subscribers.values()):
            for messages in subscribers:
                messages.end()
        self._subscribers.clear()


class _RedisMessages:
    """Reads one Redis subscription. It polls every ``poll_seconds`` (a local socket
    timeout, no traffic) only to notice that the pub/sub was closed."""

    def __init__(self, owner: RedisPubSub, pubsub: RedisClientPubSub) -> None:
        self._owner = owner
        self._pubsub = pubsub
        self.closed = False

    def __aiter__(self) -> _RedisMessages:
        return self

    async def __anext__(self) -> RealtimeMessage:
        while not (self.closed or self._owner.closed):
            raw = await self._pubsub.get_message(
                ignore_subscribe_messages=True, timeout=self._owner.poll_seconds
            )
            if raw is None or raw.get("type") != "message":
                continue
            channel = raw["channel"]
            channel = channel.decode() if isinstance(channel, bytes) else str(channel)
            try:
                data = json.loads(raw["data"])
            except ValueError:
                log.warning("realtime_message_not_json", channel=channel)
                continue
            if not isinstance(data, dict):
                log.warning("realtime_message_not_an_object", channel=channel)
                continue
            return RealtimeMessage(channel.removeprefix(self._owner.namespace), data)
        raise StopAsyncIteration


class RedisPubSub:
    """Fan-out across every process using one Redis, under ``namespace``.

    Each subscription holds its own connection from the runtime's pool for as long as
    its block runs, and gives it back on exit. The client belongs to the runtime.
    """

    def __init__(
        self,
        redis: Redis,
        namespace: str = "soko:rt:",
        *,
        poll_seconds: float = 1.0,
        handshake_seconds: float = 5.0,
    ) -> None:
        self.redis = redis
        self.namespace = namespace
        self.poll_seconds = poll_seconds
        self.handshake_seconds = handshake_seconds
        self.closed = False
        from redis.exceptions import RedisError

        self._connection_errors: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)

    def channel_key(self, channel: str) -> str:
        return f"{self.namespace}{channel}"

    async def publish(self, channel: str, message: Mapping[str, Any]) -> int:
        receivers = await self.redis.publish(self.channel_key(channel), encode_message(message))
        return int(receivers)

    @asynccontextmanager
    async def subscribe(self, *channels: str) -> AsyncIterator[AsyncIterator[RealtimeMessage]]:
        names = [self.channel_key(channel) for channel in _channels(channels)]
        if self.closed:
            raise RuntimeError("this pub/sub is closed")
        pubsub = self.redis.pubsub()
        messages = _RedisMessages(self, pubsub)
        try:
            await pubsub.subscribe(*names)
            # Wait for Redis to confirm, so a publish made once the block is entered
            # reaches this subscriber.
            await self._await_replies(pubsub, "subscribe", len(names), self.handshake_seconds)
            yield messages
        finally:
            messages.closed = True
            await self._release(pubsub, len(names))

    async def _await_replies(
        self, pubsub: RedisClientPubSub, kind: str, count: int, within: float
    ) -> None:
        async with asyncio.timeout(within):
            while count:
                reply = await pubsub.get_message(timeout=within)
                if reply is not None and reply.get("type") == kind:
                    count -= 1

    async def _release(self, pubsub: RedisClientPubSub, count: int) -> None:
        # Unsubscribing before closing means Redis has dropped the subscription by the
        # time the block is left; on a broken connection, closing the socket is enough.
        with contextlib.suppress(*self._connection_errors):
            # redis-py types ``connection`` as always None; it is set once subscribed.
            if getattr(pubsub, "connection", None) is not None:
                await pubsub.unsubscribe()
                await self._await_replies(
                    pubsub, "unsubscribe", count, min(1.0, self.handshake_seconds)
                )
        await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def ping(self) -> None:
        await self.redis.ping()

    async def close(self) -> None:
        """End every subscription's iteration (within ``poll_seconds``)."""
        self.closed = True
