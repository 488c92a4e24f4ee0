"""A Soko worker process for the webhooks crash test
(``python -m tests.webhooks.crash_worker``): every domain's handlers, the runtime built
from ``SOKO_*`` variables, and the outbox dispatcher, until it is killed."""

from __future__ import annotations

import asyncio

from soko.app import load_handlers, load_models
from soko.platform.config import load_settings
from soko.platform.runtime import Runtime


async def main() -> None:
    load_models()
    load_handlers()
    runtime = Runtime(load_settings())
    try:
        await runtime.dispatcher.run()
    finally:
        await runtime.stop()


if __name__ == "__main__":
    asyncio.run(main())
