"""Liveness (``/health``) and readiness (``/ready``).

``/health`` answers as long as the process can run a request; it calls nothing, so a
slow database never gets a live process restarted. ``/ready`` checks each configured
dependency, each with its own timeout and all at once, and answers 503 when one is down,
so a load balancer stops sending traffic until it is back:

.. code-block:: json

    {"status": "unavailable",
     "checks": {"database": {"status": "up", "backend": "postgresql", "latency_ms": 1.2},
                "redis": {"status": "down", "error": "ConnectionError", "latency_ms": 0.4},
                ...},
     "outbox": {"oldest_due_seconds": 0.0}}

``outbox.oldest_due_seconds`` is how long the oldest pending message has been due
(0 when none is): information for dashboards, never a reason to refuse traffic, since
a backlog is not cured by taking the API out of rotation. It is ``null`` when it could
not be read in time. Failures name the exception type only: no address, password or
SQL reaches the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, text

from soko.platform.outbox import MessageStatus, OutboxMessage
from soko.platform.schema import schema_state

router = APIRouter(tags=["operations"])

CHECK_TIMEOUT_SECONDS = 2.0

Check = Callable[[], Awaitable[Any]]


@router.get("/health", summary="The process is alive")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def _reason(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__


async def _timed(name: str, check: Check) -> tuple[str, dict[str, Any]]:
    began = time.perf_counter()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
    except Exception as exc:  # each dependency reports its own failure
        return name, {
            "status": "down",
            "error": _reason(exc),
            "latency_ms": round((time.perf_counter() - began) * 1000, 2),
        }
    return name, {"status": "up", "latency_ms": round((time.perf_counter() - began) * 1000, 2)}


async def _oldest_due_seconds(runtime: Any) -> float | None:
    """Seconds since the oldest pending outbox message became due; an index range scan
    on (status, available_at)."""
    now = runtime.clock.now()
    query = select(func.min(OutboxMessage.available_at)).where(
        OutboxMessage.status == MessageStatus.pending.value,
        OutboxMessage.available_at <= now,
    )

    async def read() -> Any:
        async with runtime.db.engine.connect() as connection:
            return (await connection.execute(query)).scalar()

    try:
        oldest = await asyncio.wait_for(read(), CHECK_TIMEOUT_SECONDS)
    except Exception:
        return None
    if oldest is None:
        return 0.0
    waited: float = (now - oldest).total_seconds()
    return round(max(waited, 0.0), 3)


@router.get(
    "/ready",
    summary="Every configured dependency answers",
    responses={503: {"description": "At least one dependency is down"}},
)
async def ready(request: Request) -> JSONResponse:
    """Never rate limited (a load balancer probes it), so it is bounded otherwise: an
    answer is reused for ``SOKO_READY_REUSE_SECONDS``, and probes arriving while the
    checks run share them."""
    runtime = request.app.state.runtime
    reuse = runtime.settings.ready_reuse_seconds
    state: _Readiness | None = getattr(request.app.state, "readiness", None)
    if state is None:
        state = request.app.state.readiness = _Readiness()
    now = time.monotonic()
    if state.answer is not None and now - state.answered_at < reuse:
        return _answer(state.answer)
    if state.running is None or state.running.done():  # done: a probe that left early
        state.running = asyncio.ensure_future(_check_readiness(runtime))
    running = state.running
    try:
        answer = await asyncio.shield(running)
    finally:
        if state.running is running and running.done():
            state.running = None
    if reuse:
        state.answer, state.answered_at = answer, time.monotonic()
    return _answer(answer)


@dataclass(slots=True)
class _Readiness:
    """A process's last readiness answer (its body and whether it is healthy), and the
    round of checks running now."""

    answer: tuple[dict[str, Any], bool] | None = None
    answered_at: float = 0.0
    running: asyncio.Future[tuple[dict[str, Any], bool]] | None = None


def _answer(answer: tuple[dict[str, Any], bool]) -> JSONResponse:
    body, healthy = answer
    return JSONResponse(body, status_code=200 if healthy else 503)


async def _check_readiness(runtime: Any) -> tuple[dict[str, Any], bool]:

    async def database() -> None:
        async with runtime.db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def schema() -> dict[str, Any]:
        state = await asyncio.wait_for(schema_state(runtime.db.engine), CHECK_TIMEOUT_SECONDS)
        result: dict[str, Any] = {
            "status": "up" if state.serves else "down",
            "state": state.status.value,
            "revision": state.revision,
            "expected": state.expected,
        }
        if not state.serves:
            result["error"] = state.advice()
        return result

    checks: dict[str, Check] = {"database": database}
    if runtime.redis is not None:
        checks["redis"] = runtime.redis.ping
    checks["cache"] = runtime.cache.ping
    checks["rate_limits"] = runtime.limiter.ping
    checks["pubsub"] = runtime.pubsub.ping
    outbox_age = asyncio.ensure_future(_oldest_due_seconds(runtime))
    results = dict(await asyncio.gather(*(_timed(n, c) for n, c in checks.items())))
    backends = {
        "database": runtime.db.dialect,
        "cache": runtime.settings.cache_backend.value,
        "rate_limits": runtime.settings.ratelimit_backend.value,
        "pubsub": runtime.settings.pubsub_backend.value,
    }
    for name, backend in backends.items():
        results[name]["backend"] = backend
    # Read once the database answered: with it down, the schema is unknown, not wrong.
    if results["database"]["status"] == "up":
        try:
            results["schema"] = await schema()
        except Exception as exc:  # slow or failing now: the answer says which
            results["schema"] = {"status": "down", "error": _reason(exc)}
    else:
        results["schema"] = {"status": "down", "error": "the database is down"}
    for name, extra in runtime.readiness_checks.items():
        try:
            results[name] = dict(extra())
        except Exception as exc:
            results[name] = {"status": "down", "error": type(exc).__name__}
    # A check marked "critical": False (a payment provider's circuit) is shown but does
    # not make the instance unready: pulling every instance from the load balancer
    # would turn one provider's outage into a full one.
    healthy = all(
        result["status"] == "up" or result.get("critical") is False for result in results.values()
    )
    body = {
        "status": "ready" if healthy else "unavailable",
        "checks": results,
        "outbox": {"oldest_due_seconds": await outbox_age},
    }
    return body, healthy
