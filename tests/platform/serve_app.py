"""A test-only Soko app: the real one plus a route that holds its request open.

``GET /test/slow`` touches ``$SOKO_TEST_SLOW_DIR/started`` and answers only once
``$SOKO_TEST_SLOW_DIR/release`` exists (or after a bound), so a test can send a request,
know it is in flight, stop the server, and decide when the request may finish, without
guessing at timings. ``GET /test/pid`` names the process that answered, and
``GET /test/gc`` says how many objects startup froze out of the
cyclic collector's reach.

Run through soko's own serve path with ``python -m tests.platform.serve_app serve ...``,
or with ``python -m uvicorn --factory tests.platform.serve_app:create``.
"""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

from fastapi import FastAPI

from soko.app import create_app

HOLD_LIMIT_SECONDS = 30.0
POLL_SECONDS = 0.02


def create() -> FastAPI:
    app = create_app()
    slow_dir = Path(os.environ.get("SOKO_TEST_SLOW_DIR", "."))

    @app.get("/test/slow", include_in_schema=False)
    async def slow() -> dict[str, bool]:
        (slow_dir / "started").touch()
        release = slow_dir / "release"
        for _ in range(int(HOLD_LIMIT_SECONDS / POLL_SECONDS)):
            if release.exists():
                return {"finished": True, "released": True}
            await asyncio.sleep(POLL_SECONDS)
        return {"finished": True, "released": False}

    @app.get("/test/pid", include_in_schema=False)
    async def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    @app.get("/test/gc", include_in_schema=False)
    async def frozen() -> dict[str, int]:
        return {"frozen": gc.get_freeze_count()}

    return app


if __name__ == "__main__":
    import soko.cli

    soko.cli.APP_FACTORY = "tests.platform.serve_app:create"
    soko.cli.main()
