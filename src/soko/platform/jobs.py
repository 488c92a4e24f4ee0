"""Background jobs, event handlers and scheduled jobs run from the outbox.

(Scaffolding: the dispatcher is being written; see docs/architecture.md.)
"""

from __future__ import annotations

import asyncio
from typing import Any


class JobRegistry:
    def __init__(self) -> None:
        self.jobs: dict[str, Any] = {}


registry = JobRegistry()


class Dispatcher:
    def __init__(
        self,
        *,
        db: Any,
        settings: Any,
        clock: Any,
        registry: JobRegistry,
        services: Any = None,
        worker_id: str | None = None,
    ) -> None:
        self._stopped = asyncio.Event()

    def wake(self) -> None:
        return None

    async def run(self) -> None:
        await self._stopped.wait()

    async def stop(self, grace: float | None = None) -> None:
        self._stopped.set()
