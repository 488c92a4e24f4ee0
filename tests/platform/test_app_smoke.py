from __future__ import annotations

import httpx2


async def test_health_and_unknown_path(client: httpx2.AsyncClient) -> None:
    response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}

    missing = await client.get("/no/such/place", headers={"X-Request-ID": "abc-123"})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.headers["x-request-id"] == "abc-123"
    body = missing.json()
    assert body["type"] == "/problems/not-found"
    assert body["request_id"] == "abc-123"


async def test_ready_lists_dependencies(client: httpx2.AsyncClient, backend: str) -> None:
    response = await client.get("/ready")
    assert response.status_code == 200
    checks = response.json()["checks"]
    assert checks["database"]["status"] == "up"
    assert checks["database"]["backend"] == backend


async def test_sqlite_reader_does_not_queue_behind_a_writer(tmp_path: object) -> None:
    """A read-only session starts deferred on SQLite, so an open write transaction (an
    outbox handler, a checkout) does not hold up GET requests."""
    import asyncio
    from pathlib import Path

    from sqlalchemy import text

    from soko.platform.db import Database, create_engine

    assert isinstance(tmp_path, Path)
    db = Database(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"))
    try:
        async with db.transaction() as setup:
            await setup.execute(text("CREATE TABLE shelf (item TEXT)"))
            await setup.execute(text("INSERT INTO shelf VALUES ('mango')"))
        async with db.transaction() as writer:
            await writer.execute(text("INSERT INTO shelf VALUES ('pawpaw')"))

            async def read() -> list[str]:
                async with db.transaction(read_only=True) as reader:
                    rows = await reader.execute(text("SELECT item FROM shelf"))
                    return [row[0] for row in rows]

            # The writer has not committed: the reader sees the committed snapshot at once
            # instead of waiting out the 30 s busy timeout for the write lock.
            assert await asyncio.wait_for(read(), timeout=10) == ["mango"]
    finally:
        await db.dispose()


def test_every_domain_job_is_registered_by_load_handlers() -> None:
    """An API process imports only soko.app: its in-process dispatcher must know every
    domain's jobs, or a job queued by another process would fail until dead."""
    import subprocess
    import sys

    script = (
        "from soko.app import load_handlers, load_models\n"
        "from soko.platform.jobs import registry\n"
        "load_models(); load_handlers()\n"
        "print(sorted(registry.jobs))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert "identity.reencrypt" in result.stdout
    assert "notifications.deliver_sms" in result.stdout
