"""Liveness (`/health`) and readiness (`/ready`) endpoints."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["operations"])

CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/health", summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


async def _timed(name: str, check: Any) -> tuple[str, dict[str, Any]]:
    began = time.perf_counter()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
    except Exception as exc:  # each dependency reports its own failure
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        return name, {
            "status": "down",
            "error": reason,
            "latency_ms": round((time.perf_counter() - began) * 1000, 2),
        }
    return name, {"status": "up", "latency_ms": round((time.perf_counter() - began) * 1000, 2)}


@router.get(
    "/ready",
    summary="Every configured dependency answers",
    responses={503: {"description": "At least one dependency is down"}},
)
async def ready(request: Request) -> JSONResponse:
    runtime = request.app.state.runtime

    async def database() -> None:
        async with runtime.db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    checks: dict[str, Any] = {"database": database}
    if runtime.redis is not None:
        checks["redis"] = runtime.redis.ping
    checks["cache"] = runtime.cache.ping
    checks["rate_limits"] = runtime.limiter.ping
    checks["pubsub"] = runtime.pubsub.ping
    results = dict(await asyncio.gather(*(_timed(n, c) for n, c in checks.items())))
    backends = {
        "database": runtime.db.dialect,
        "cache": runtime.settings.cache_backend.value,
        "rate_limits": runtime.settings.ratelimit_backend.value,
        "pubsub": runtime.settings.pubsub_backend.value,
    }
    for name, backend in backends.items():
        results[name]["backend"] = backend
    healthy = all(result["status"] == "up" for result in results.values())
    return JSONResponse(
        {"status": "ready" if healthy else "unavailable", "checks": results},
        status_code=200 if healthy else 503,
    )
