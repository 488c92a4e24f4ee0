"""Realtime publish/subscribe for pushing messages to connected clients."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol


class PubSub(Protocol):
    async def publish(self, channel: str, message: dict[str, Any]) -> int: ...

    def subscribe(self, *channels: str) -> Any: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryPubSub:
    """Fan-out within one process."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = defaultdict(set)
        self.queue_size = queue_size

    async def publish(self, channel: str, message: dict[str, Any]) -> int:
        delivered = 0
        for queue in list(self._subscribers.get(channel, ())):
            try:
                queue.put_nowait({"channel": channel, "data": message})
                delivered += 1
            except asyncio.QueueFull:
                pass  # a slow consumer loses messages rather than stalling publishers
        return delivered

    @asynccontextmanager
    async def subscribe(self, *channels: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.queue_size)
        for channel in channels:
            self._subscribers[channel].add(queue)

        async def messages() -> AsyncIterator[dict[str, Any]]:
            while True:
                yield await queue.get()

        try:
            yield messages()
        finally:
            for channel in channels:
                self._subscribers[channel].discard(queue)
                if not self._subscribers[channel]:
                    del self._subscribers[channel]

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._subscribers.clear()
