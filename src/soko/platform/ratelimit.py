"""Rate limits backed by the ``limits`` library (sliding window counter), in memory or
in Redis.

Use :func:`rate_limit` as a route dependency for a per-route limit, and
:class:`GlobalRateLimitMiddleware` for the per-IP default applied to every request except
``/health``, ``/ready`` and ``/metrics``. Refusals are 429 problems with ``Retry-After``
and the RateLimit header fields of the IETF draft (``RateLimit-Policy: "login";q=5;w=60``
and ``RateLimit: "login";r=0;t=42``); successful answers of a route with a limit carry
the same two fields.

The per-IP default is checked on every request, so it does not ask the storage every
time: a caller sending fast takes its hits from the storage in leases (:meth:`RateLimiter.
refusal_leased`), counted there at once and used up locally within a second. A lease
starts at one hit and doubles each time one is used up within its second, up to 1% of
the quota (at most 64): a caller sending slowly is counted hit by hit, exactly as before,
and one sending fast costs the storage a round trip every few dozen requests instead of
on each. Hits leased but not used before the lease expires still count, so a process may
refuse a busy caller up to 1% of the quota early; it never lets one through beyond the
quota. The per-route limits (sign-in, one-time codes) are counted exactly, hit by hit;
on Redis each hit reads the window it leaves (for the RateLimit fields or a refusal's
``Retry-After``) in the same script, one round trip where ``limits`` itself takes two.

When the storage is unreachable the limiter fails open: the request goes through
uncounted, a warning is logged and ``soko_ratelimit_unavailable_total`` is counted, so a
Redis outage degrades protection instead of taking the whole API down. After a failure
the limiter stops asking the storage for ``cooldown_seconds``, so a dead (or black-holed)
Redis does not add a timeout to every request. A route whose limit matters more than its
availability can pass ``fail_open=False`` to :func:`rate_limit` and answer 503 while the
storage is down; none does today, because the limits that guard accounts (the sign-in
throttle, one-time codes) are kept in the database and hold through such an outage.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from fastapi import Request, Response
from limits import RateLimitItem, WindowStats, parse, parse_many
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from prometheus_client import Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from soko.platform.clock import Clock, SystemClock
from soko.platform.errors import RateLimited, ServiceUnavailable
from soko.platform.http import OPERATIONAL_PATHS, client_ip, client_network, problem_message

log = structlog.get_logger("soko.ratelimit")

RATELIMIT_UNAVAILABLE = Counter(
    "soko_ratelimit_unavailable_total",
    "Requests let through unchecked because the rate limit storage was unreachable",
    ["scope"],
)
RATELIMIT_STORAGE_ERRORS = Counter(
    "soko_ratelimit_storage_errors_total",
    "Failed calls to the rate limit storage",
)
RATELIMIT_REFUSED = Counter(
    "soko_ratelimit_refused_total", "Requests refused by a rate limit", ["scope"]
)


def _sf_string(value: str) -> str:
    """``value`` as a structured-field string (RFC 9651): printable ASCII, quoted."""
    printable = "".join(ch if " " <= ch <= "~" else "_" for ch in value)
    return '"' + printable.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """One quota: ``quota`` requests per ``window`` seconds, named for the headers."""

    name: str
    quota: int
    window: int

    @classmethod
    def of(cls, item: RateLimitItem, name: str) -> RateLimitPolicy:
        return cls(name=name, quota=int(item.amount), window=int(item.get_expiry()))

    def field(self) -> str:
        return f"{_sf_string(self.name)};q={self.quota};w={self.window}"


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    policy: RateLimitPolicy
    allowed: bool
    remaining: int
    reset_after: int  # seconds until the window frees capacity
    degraded: bool = False  # the storage was unreachable and the hit was not counted

    def field(self) -> str:
        return f"{_sf_string(self.policy.name)};r={self.remaining};t={self.reset_after}"

    @property
    def retry_after(self) -> int:
        return max(1, self.reset_after)


def rate_limit_headers(results: Sequence[RateLimitResult]) -> dict[str, str]:
    """The RateLimit fields for the limits checked on one request.

    ``RateLimit-Policy`` lists every policy; ``RateLimit`` reports the one that decided
    (the refusing one, else the one closest to running out), and a refusal adds
    ``Retry-After``. Degraded results are left out: their counts are unknown.
    """
    known = [result for result in results if not result.degraded]
    if not known:
        return {}
    refused = [result for result in known if not result.allowed]
    deciding = (
        max(refused, key=lambda result: result.reset_after)
        if refused
        else min(known, key=lambda result: (result.remaining, -result.reset_after))
    )
    headers = {
        "RateLimit-Policy": ", ".join(result.policy.field() for result in known),
        "RateLimit": deciding.field(),
    }
    if refused:
        headers["Retry-After"] = str(deciding.retry_after)
    return headers


# Leases of the per-IP default (see the module's docstring).
LEASE_SHARE = 0.01  # of the quota, the largest lease
LEASE_MAX = 64
LEASE_SECONDS = 1.0  # a lease's hits not used by then are dropped
LEASE_KEYS = 10_000  # callers with a lease held, per process (least recently used go)


@dataclass(slots=True)
class _Lease:
    tokens: int  # hits counted in the storage, not used yet
    size: int  # the size of the last lease taken
    expires: float  # clock time after which the unused tokens are dropped
    taking: bool = False  # a lease is being taken from the storage


# KEYS[1]: the previous window's key, KEYS[2]: the current one's, as ``limits`` names them
# for its sliding window counter. ARGV: the limit, the window in seconds, the cost. Takes
# the hit exactly as ``limits``' acquire_sliding_window.lua does and answers what its
# sliding_window.lua would read right after: {taken (1 or 0), previous count, previous
# TTL in ms, current count, current TTL in ms}. One round trip where the library needs
# two to report the window (a route's RateLimit fields, a refusal's Retry-After).
_HIT_AND_READ_SCRIPT = """
local limit = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2]) * 1000
local amount = tonumber(ARGV[3])

local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
  -- The current window is over: it becomes the previous one.
  redis.call('rename', KEYS[2], KEYS[1])
  redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end
local previous_count = tonumber(redis.call('get', KEYS[1])) or 0
local previous_ttl = tonumber(redis.call('pttl', KEYS[1])) or 0
local current_count = tonumber(redis.call('get', KEYS[2])) or 0
current_ttl = tonumber(redis.call('pttl', KEYS[2])) or 0
if previous_ttl <= 0 then previous_ttl = 0 end
if current_ttl <= 0 then current_ttl = 0 end
local weighted_count = math.floor(previous_count * previous_ttl / expiry) + current_count

local taken = 0
if amount <= limit and weighted_count + amount <= limit then
  if redis.call('exists', KEYS[2]) == 1 then
    current_count = redis.call('incrby', KEYS[2], amount)
  else
    redis.call('set', KEYS[2], amount, 'PX', expiry * 2)
    current_count = amount
  end
  current_ttl = tonumber(redis.call('pttl', KEYS[2]))
  taken = 1
end
return {taken, previous_count, previous_ttl, current_count, current_ttl}
"""


def _window_stats(
    item: RateLimitItem,
    previous_count: int,
    previous_expires_in: float,
    current_count: int,
    current_expires_in: float,
) -> WindowStats:
    """What ``limits``' ``get_window_stats`` reports for a sliding window counter read as
    (previous count, seconds it lives on, current count, seconds it lives on), except at
    the exact end of a step, where its modulo says 0 s: read in the same script as the
    hit, a window just opened lives exactly twice its length, and frees up in one length,
    not now."""
    expiry = item.get_expiry()
    weighted = previous_count * previous_expires_in / expiry + current_count
    remaining = max(0, item.amount - math.floor(weighted))
    now = time.time()
    if not (previous_count or current_count):
        return WindowStats(now, remaining)
    previous_reset_in = current_reset_in = math.inf
    if previous_count:
        step = expiry / previous_count
        previous_reset_in = previous_expires_in % step or step
    if current_count:
        current_reset_in = current_expires_in % expiry or expiry
    return WindowStats(now + min(previous_reset_in, current_reset_in), remaining)


class _SlidingWindowCounter(SlidingWindowCounterRateLimiter):
    """``limits``' sliding window counter, whose hit can also read the window it leaves:
    on Redis in the same round trip (:data:`_HIT_AND_READ_SCRIPT`, over the storage's own
    keys and connections); elsewhere, where a read costs no round trip, with the
    library's two calls, the read skipped for a hit taken unless ``read_if_taken``."""

    def __init__(self, storage: Storage) -> None:
        super().__init__(storage)
        self._script: Any = None
        if isinstance(storage, RedisStorage):
            bridge: Any = storage.bridge  # redis-py's (create_redis_rate_limiter)
            self._script = bridge.get_connection().register_script(_HIT_AND_READ_SCRIPT)

    async def hit_and_read(
        self, item: RateLimitItem, *identifiers: str, cost: int = 1, read_if_taken: bool = True
    ) -> tuple[bool, WindowStats | None]:
        if self._script is None:
            taken = await self.hit(item, *identifiers, cost=cost)
            if taken and not read_if_taken:
                return taken, None
            return taken, await self.get_window_stats(item, *identifiers)
        storage: Any = self.storage
        counted = item.key_for(*identifiers)
        keys = [
            storage.bridge.prefixed_key(storage._previous_window_key(counted)),
            storage.bridge.prefixed_key(storage._current_window_key(counted)),
        ]
        taken, previous, previous_ttl, current, current_ttl = await self._script(
            keys, [item.amount, item.get_expiry(), cost]
        )
        stats = _window_stats(
            item, int(previous), int(previous_ttl) / 1000, int(current), int(current_ttl) / 1000
        )
        return bool(taken), stats


class RateLimiter:
    """Counts hits per (policy, scope, caller) in a ``limits`` storage, failing open."""

    def __init__(
        self,
        storage: Storage,
        *,
        clock: Clock | None = None,
        cooldown_seconds: float = 5.0,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.storage = storage
        self.strategy = _SlidingWindowCounter(storage)
        self.clock: Clock = clock or SystemClock()
        self.cooldown = dt.timedelta(seconds=cooldown_seconds)
        self.unavailable_until: dt.datetime | None = None
        self._on_close = on_close
        self._leases: OrderedDict[tuple[str, str, str], _Lease] = OrderedDict()
        self._unavailable_errors: tuple[type[Exception], ...] = (
            StorageError,
            OSError,
            *_redis_errors(),
        )

    @property
    def available(self) -> bool:
        """False while cooling down after a storage failure."""
        return self.unavailable_until is None or self.clock.now() >= self.unavailable_until

    async def hit(
        self, item: RateLimitItem, scope: str, key: str, *, policy_name: str | None = None
    ) -> RateLimitResult:
        """Count one request against ``item`` and report the window: allowed or not,
        what remains and when it frees up (for the RateLimit header fields)."""
        result = await self._hit(item, scope, key, policy_name, report_allowed=True)
        assert result is not None  # reported whenever asked for
        return result

    async def refusal(
        self, item: RateLimitItem, scope: str, key: str, *, policy_name: str | None = None
    ) -> RateLimitResult | None:
        """Count one request like :meth:`hit`, but read the window's figures only when
        the request is refused: ``None`` when it may go on (also when the storage is
        unreachable), which spares a round trip to the storage on every such request."""
        result = await self._hit(item, scope, key, policy_name, report_allowed=False)
        return result if result is not None and not result.allowed else None

    async def refusal_leased(
        self, item: RateLimitItem, scope: str, key: str
    ) -> RateLimitResult | None:
        """:meth:`refusal` for a caller that may send fast: its hits are taken from the
        storage in leases used up here (see the module's docstring), so a busy caller
        costs the storage a round trip every few dozen requests. A refused lease falls
        back to one exact hit, so a caller is refused only once the quota is spent (or
        leased elsewhere)."""
        largest = min(LEASE_MAX, int(item.amount * LEASE_SHARE))
        if largest <= 1:
            return await self.refusal(item, scope, key)
        lease_key = (item.key_for(), scope, key)
        now = self.clock.now().timestamp()
        lease = self._leases.get(lease_key)
        if lease is not None:
            self._leases.move_to_end(lease_key)
            if now < lease.expires and lease.tokens > 0:
                lease.tokens -= 1
                return None
            if lease.taking:
                return await self.refusal(item, scope, key)
            # The last lease was used up within its second: take a larger one.
            size = min(largest, lease.size * 2) if now < lease.expires else 1
        else:
            lease = self._leases[lease_key] = _Lease(tokens=0, size=1, expires=0.0)
            while len(self._leases) > LEASE_KEYS:
                self._leases.popitem(last=False)
            size = 1
        lease.taking = True
        try:
            result = await self._hit(item, scope, key, None, report_allowed=False, cost=size)
        finally:
            lease.taking = False
        if result is None or result.allowed:  # taken (or the storage is unreachable)
            granted = 0 if result is not None else size - 1
            lease.tokens, lease.size, lease.expires = granted, size, now + LEASE_SECONDS
            return None
        lease.tokens, lease.size = 0, 1
        return await self.refusal(item, scope, key) if size > 1 else result

    async def _hit(
        self,
        item: RateLimitItem,
        scope: str,
        key: str,
        policy_name: str | None,
        *,
        report_allowed: bool,
        cost: int = 1,
    ) -> RateLimitResult | None:
        policy = RateLimitPolicy.of(item, policy_name or scope)
        if not self.available:
            return self._degraded(policy, scope)
        try:
            allowed, stats = await self.strategy.hit_and_read(
                item, scope, key, cost=cost, read_if_taken=report_allowed
            )
        except self._unavailable_errors as exc:
            RATELIMIT_STORAGE_ERRORS.inc()
            self.unavailable_until = self.clock.now() + self.cooldown
            log.warning(
                "rate_limit_storage_unavailable",
                scope=scope,
                error=type(exc).__name__,
                cooldown_seconds=self.cooldown.total_seconds(),
            )
            return self._degraded(policy, scope)
        self.unavailable_until = None
        if (allowed and not report_allowed) or stats is None:  # taken, not to be reported
            return None
        # ``limits`` reports the reset as a wall-clock timestamp of its own.
        reset_after = max(0, math.ceil(stats.reset_time - time.time()))
        if not allowed and cost == 1:  # a refused lease is tried again as one hit
            RATELIMIT_REFUSED.labels(scope).inc()
        return RateLimitResult(
            policy=policy,
            allowed=allowed,
            remaining=max(0, int(stats.remaining)),
            reset_after=min(reset_after, policy.window),
        )

    def _degraded(self, policy: RateLimitPolicy, scope: str) -> RateLimitResult:
        RATELIMIT_UNAVAILABLE.labels(scope).inc()
        return RateLimitResult(
            policy=policy,
            allowed=True,
            remaining=policy.quota,
            reset_after=0,
            degraded=True,
        )

    async def reset(self) -> None:
        await self.storage.reset()

    async def ping(self) -> None:
        if not await self.storage.check():
            raise ConnectionError("rate limit storage unreachable")

    async def close(self) -> None:
        timer = getattr(self.storage, "timer", None)  # MemoryStorage's expiry task
        if timer is not None and not timer.done():
            timer.cancel()
        if self._on_close is not None:
            await self._on_close()


def _redis_errors() -> tuple[type[Exception], ...]:
    try:
        from redis.exceptions import RedisError
    except ImportError:  # redis is an optional extra; memory limits do without it
        return ()
    return (RedisError,)


def create_memory_rate_limiter(*, clock: Clock | None = None) -> RateLimiter:
    return RateLimiter(MemoryStorage(), clock=clock)


def create_redis_rate_limiter(
    url: str,
    namespace: str = "soko:rl:",
    *,
    timeout_seconds: float = 0.5,
    cooldown_seconds: float = 5.0,
    clock: Clock | None = None,
    max_connections: int = 64,
) -> RateLimiter:
    """Limits shared by every process using the Redis at ``url``, under ``namespace``.

    The connection pool is our own (closed by :meth:`RateLimiter.close`) with short
    timeouts and no retries: a rate limit check must answer fast or not at all. At
    ``max_connections`` checks in flight, the next one waits (at most ``timeout_seconds``)
    for a connection to come back rather than failing at once: a burst of requests is
    checked, not let through as if Redis were down.
    """
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        socket_timeout=timeout_seconds,
        retry=Retry(NoBackoff(), 0),
    )
    # limits picks its client from the URL scheme; the pool decides where it connects.
    scheme_url = (
        "async+redis+unix://" + url.removeprefix("unix://")
        if url.startswith("unix://")
        else "async+" + url
    )
    options: dict[str, Any] = {"connection_pool": pool}
    storage = RedisStorage(
        scheme_url,
        implementation="redispy",
        key_prefix=namespace.rstrip(":"),  # limits adds its own ':'
        **options,
    )
    return RateLimiter(
        storage, clock=clock, cooldown_seconds=cooldown_seconds, on_close=pool.aclose
    )


def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.runtime.limiter
    return limiter


def rate_limit(
    rate: str,
    *,
    scope: str,
    key: Callable[[Request], str] | None = None,
    fail_open: bool = True,
) -> Callable[[Request, Response], Awaitable[None]]:
    """A dependency enforcing ``rate`` per caller for one route: ``"5/minute"``, or
    several quotas at once (``"5/minute;50/day"``).

    ``scope`` names the limit (and its ``RateLimit-Policy``); ``key`` picks what is
    counted (by default the client IP). With ``fail_open=False`` the route answers 503
    rather than go unprotected while the storage is unreachable.
    """
    items = parse_many(rate)
    names = [scope] if len(items) == 1 else [f"{scope}-{item.get_expiry()}s" for item in items]

    async def dependency(request: Request, response: Response) -> None:
        runtime = request.app.state.runtime
        if not runtime.settings.ratelimit_enabled:
            return
        limiter = _limiter(request)
        caller = (
            key(request)
            if key
            else client_network(client_ip(request.scope, runtime.settings.trusted_proxies))
        )
        results: list[RateLimitResult] = []
        for item, name in zip(items, names, strict=True):
            result = await limiter.hit(item, scope, caller, policy_name=name)
            results.append(result)
            if result.degraded and not fail_open:
                raise ServiceUnavailable(
                    "Rate limiting is unavailable for this operation; retry shortly.",
                    headers={"Retry-After": str(math.ceil(limiter.cooldown.total_seconds()))},
                )
            if not result.allowed:
                raise RateLimited(
                    f"The limit of {item.amount} requests per {item.get_expiry()} s "
                    f"for {scope} was reached; retry in {result.retry_after} s.",
                    headers=rate_limit_headers(results),
                )
        response.headers.update(rate_limit_headers(results))

    return dependency


class GlobalRateLimitMiddleware:
    """The per-IP default limit over every request except the operational endpoints.

    Only refusals carry the RateLimit fields: on success, a route's own limit (the one a
    client can act on) owns them.
    """

    exempt = OPERATIONAL_PATHS
    scope_name = "global"

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

    def _is_exempt(self, path: str) -> bool:
        return path.rstrip("/") in self.exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_exempt(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        ip = client_network(client_ip(scope, self.trusted_proxies))
        result = await self.limiter_getter().refusal_leased(self.item, self.scope_name, ip)
        if result is None:
            await self.app(scope, receive, send)
            return
        start, body = problem_message(
            RateLimited,
            f"Too many requests from this address; retry in {result.retry_after} s.",
            scope.get("path", ""),
            scope.get("state", {}).get("request_id", ""),
        )
        start["headers"] += [
            (name.lower().encode(), value.encode())
            for name, value in rate_limit_headers([result]).items()
        ]
        await send(start)
        await send(body)
