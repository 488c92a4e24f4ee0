"""One cache interface, kept in memory or in Redis, with TTLs and tag invalidation."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol


class Cache(Protocol):
    async def get(self, key: str) -> Any | None: ...

    async def set(self, key: str, value: Any, ttl: float, tags: Sequence[str] = ()) -> None: ...

    async def delete(self, key: str) -> None: ...

    async def invalidate_tags(self, *tags: str) -> None: ...

    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[Any]],
        ttl: float,
        tags: Sequence[str] = (),
    ) -> Any: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """A per-process cache. Tag invalidation bumps a tag version; entries remember the
    versions they were stored under and are stale once any of them moved."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: dict[str, tuple[float, Any, tuple[tuple[str, int], ...]]] = {}
        self._tag_versions: dict[str, int] = {}
        self.max_entries = max_entries

    async def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value, tags = entry
        if expires < time.monotonic() or any(
            self._tag_versions.get(tag, 0) != version for tag, version in tags
        ):
            self._entries.pop(key, None)
            return None
        return value

    async def set(self, key: str, value: Any, ttl: float, tags: Sequence[str] = ()) -> None:
        if len(self._entries) >= self.max_entries and key not in self._entries:
            self._entries.pop(next(iter(self._entries)))
        stamped = tuple((tag, self._tag_versions.get(tag, 0)) for tag in tags)
        self._entries[key] = (time.monotonic() + ttl, value, stamped)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)

    async def invalidate_tags(self, *tags: str) -> None:
        for tag in tags:
            self._tag_versions[tag] = self._tag_versions.get(tag, 0) + 1

    async def get_or_set(
        self,
        key: str,
        factory: Callable[[], Awaitable[Any]],
        ttl: float,
        tags: Sequence[str] = (),
    ) -> Any:
        value = await self.get(key)
        if value is None:
            value = await factory()
            await self.set(key, value, ttl, tags)
        return value

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
