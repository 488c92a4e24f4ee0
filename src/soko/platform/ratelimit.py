"""Rate limits backed by the ``limits`` library, in memory or in Redis.

Use :func:`rate_limit` as a route dependency for a per-route limit, and
:class:`GlobalRateLimitMiddleware` for the per-IP default applied to every request.
Refusals are 429 problems with ``Retry-After`` and the RateLimit header fields.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request, Response
from limits import RateLimitItem, parse, parse_many
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from starlette.types import ASGIApp, Receive, Scope, Send

from soko.platform.errors import RateLimited, problem_body
from soko.platform.http import client_ip


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    allowed: bool
    limit: int
    remaining: int
    reset_after: int  # seconds until the window frees capacity
    policy: str

    def headers(self) -> dict[str, str]:
        headers = {
            "RateLimit-Policy": self.policy,
            "RateLimit": f'"{self.policy.split(";")[0].strip(chr(34))}";r={self.remaining};t={self.reset_after}',
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, self.reset_after))
        return headers


class RateLimiter:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.strategy = SlidingWindowCounterRateLimiter(storage)

    async def hit(self, item: RateLimitItem, scope: str, key: str) -> RateLimitResult:
        allowed = await self.strategy.hit(item, scope, key)
        stats = await self.strategy.get_window_stats(item, scope, key)
        reset_after = max(0, math.ceil(stats.reset_time - time.time()))
        return RateLimitResult(
            allowed=allowed,
            limit=item.amount,
            remaining=max(0, stats.remaining),
            reset_after=reset_after,
            policy=f'"{scope}";q={item.amount};w={item.get_expiry()}',
        )

    async def reset(self) -> None:
        await self.storage.reset()

    async def ping(self) -> None:
        if not await self.storage.check():
            raise ConnectionError("rate limit storage unreachable")

    async def close(self) -> None:
        return None


def create_memory_rate_limiter() -> RateLimiter:
    return RateLimiter(MemoryStorage())


def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.runtime.limiter
    return limiter


def rate_limit(
    rate: str,
    *,
    scope: str,
    key: Callable[[Request], str] | None = None,
) -> Callable[[Request, Response], object]:
    """A dependency enforcing ``rate`` (such as ``"5/minute"``) per caller for one route.

    ``key`` picks what is counted (by default the client IP).
    """
    items = parse_many(rate)

    async def dependency(request: Request, response: Response) -> None:
        limiter = _limiter(request)
        if not request.app.state.runtime.settings.ratelimit_enabled:
            return
        caller = (
            key(request)
            if key
            else client_ip(request.scope, request.app.state.runtime.settings.trusted_proxies)
        )
        tightest: RateLimitResult | None = None
        for item in items:
            result = await limiter.hit(item, scope, caller)
            if not result.allowed:
                raise RateLimited(
                    f"Rate limit of {item} for {scope} reached; retry in "
                    f"{max(1, result.reset_after)} s.",
                    headers=result.headers(),
                )
            if tightest is None or result.remaining < tightest.remaining:
                tightest = result
        if tightest is not None:
            for name, value in tightest.headers().items():
                response.headers[name] = value

    return dependency


class GlobalRateLimitMiddleware:
    """The per-IP default limit over every request except the operational endpoints."""

    exempt = ("/health", "/ready", "/metrics")

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter_getter: Callable[[], RateLimiter],
        rate: str,
        trusted_proxies: list[str],
    ) -> None:
        self.app = app
        self.limiter_getter = limiter_getter
        self.item = parse(rate)
        self.trusted_proxies = trusted_proxies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(self.exempt):
            await self.app(scope, receive, send)
            return
        ip = client_ip(scope, self.trusted_proxies)
        result = await self.limiter_getter().hit(self.item, "global", ip)
        if not result.allowed:
            request_id = scope.get("state", {}).get("request_id")
            body = json.dumps(
                problem_body(
                    RateLimited,
                    detail=f"Too many requests from this address; retry in "
                    f"{max(1, result.reset_after)} s.",
                    instance=scope.get("path"),
                    request_id=request_id,
                )
            ).encode()
            headers = [(b"content-type", b"application/problem+json")]
            headers += [(k.lower().encode(), v.encode()) for k, v in result.headers().items()]
            await send({"type": "http.response.start", "status": 429, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
