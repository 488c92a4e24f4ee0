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
