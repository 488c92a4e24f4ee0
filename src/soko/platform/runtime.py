"""The services of one running Soko process, and the FastAPI dependencies over them.

A :class:`Runtime` is built from settings when the app (or a worker) starts and closed
when it stops. Routes reach it through the dependencies below, never through globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from soko.platform.cache import Cache, MemoryCache, log_invalidation_failure
from soko.platform.clock import Clock, SystemClock
from soko.platform.config import Backend, OutboxDispatch, Settings
from soko.platform.crypto import DataKeys
from soko.platform.db import Database, create_engine, mark_read_only
from soko.platform.errors import ProblemError
from soko.platform.jobs import Dispatcher, JobRegistry
from soko.platform.jobs import registry as default_registry
from soko.platform.metrics import serving_requests
from soko.platform.ratelimit import RateLimiter, create_memory_rate_limiter
from soko.platform.realtime import MemoryPubSub, PubSub
from soko.platform.schema import SchemaStatus, schema_state
from soko.platform.tokens import SIGNING_KEYS_FILE, KeyRing, load_or_create_keyring

log = structlog.get_logger("soko.runtime")


class Runtime:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        registry: JobRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.registry = registry or default_registry
        self.data_keys: DataKeys = DataKeys.from_config(
            master_secret=settings.secret_key.get_secret_value().encode(),
            encryption_keys=settings.encryption_keys.get_secret_value(),
            blind_index_key=settings.blind_index_key.get_secret_value(),
        )
        self.db = Database(
            create_engine(
                settings.effective_database_url,
                echo=settings.database_echo,
                pool_size=settings.database_pool_size,
                max_overflow=settings.database_max_overflow,
                statement_cache=settings.database_statement_cache,
                statement_timeout_seconds=settings.database_statement_timeout_seconds,
                idle_in_transaction_timeout_seconds=(
                    settings.database_idle_in_transaction_timeout_seconds
                ),
            ),
            clock=self.clock,
            info={"data_keys": self.data_keys},
        )
        self.signing_keys: KeyRing = load_signing_keys(settings)
        self.redis: Any = None
        if settings.redis_url:
            self.redis = redis_client(
                settings.redis_url, max_connections=settings.redis_max_connections
            )
        self.cache: Cache = self._make_cache()
        self.limiter: RateLimiter = self._make_limiter()
        self.pubsub: PubSub = self._make_pubsub()
        self.dispatcher = Dispatcher(
            db=self.db,
            settings=settings,
            clock=self.clock,
            registry=self.registry,
            services=self,
            # In an API process, jobs give way to requests; a worker serves none.
            busy=functools.partial(serving_requests, within=settings.outbox_idle_seconds),
        )
        self._dispatcher_task: asyncio.Task[None] | None = None
        # What domains attach to the runtime (a payment provider's HTTP client, say),
        # keyed by the domain's name: the platform never looks inside.
        self.extensions: dict[str, Any] = {}
        # Extra dependencies ``/ready`` reports, by name: each returns a JSON-able dict
        # with at least ``status`` ("up" or "down") and must not block on the network.
        self.readiness_checks: dict[str, Callable[[], Mapping[str, Any]]] = {}
        # Closed, newest first, when the runtime stops.
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def _make_cache(self) -> Cache:
        if self.settings.cache_backend is Backend.redis:
            from soko.platform.cache import RedisCache

            cache: Cache = RedisCache(self.redis, clock=self.clock)
            return cache
        return MemoryCache(clock=self.clock)

    def _make_limiter(self) -> RateLimiter:
        if self.settings.ratelimit_backend is Backend.redis:
            from soko.platform.ratelimit import create_redis_rate_limiter

            limiter: RateLimiter = create_redis_rate_limiter(
                self.settings.redis_url,
                clock=self.clock,
                max_connections=self.settings.redis_max_connections,
            )
            return limiter
        return create_memory_rate_limiter()

    def _make_pubsub(self) -> PubSub:
        if self.settings.pubsub_backend is Backend.redis:
            from soko.platform.realtime import RedisPubSub

            pubsub: PubSub = RedisPubSub(self.redis)
            return pubsub
        return MemoryPubSub()

    async def start(self, *, run_dispatcher: bool | None = None) -> None:
        # Changes heard from the start: near copies, and access tokens taken as issued
        # (ADR 0019), from the process's first request on.
        self.cache.listen()
        await self._report_schema()
        if run_dispatcher is None:
            run_dispatcher = self.settings.outbox_dispatch is OutboxDispatch.inprocess
        if run_dispatcher:
            self._dispatcher_task = asyncio.create_task(self.dispatcher.run(), name="outbox")

    async def _report_schema(self) -> None:
        """Say at start when the database's schema is not the one this build needs:
        requests would fail until ``soko migrate upgrade`` runs (``/ready`` says so too)."""
        try:
            state = await asyncio.wait_for(schema_state(self.db.engine), 5.0)
        except Exception as exc:  # the database down or slow: /ready reports it
            log.warning("could not read the database's schema revision", error=type(exc).__name__)
            return
        if not state.serves:
            log.error(
                "database schema not ready",
                advice=state.advice(),
                revision=state.revision,
                expected=state.expected,
            )
        elif state.status is SchemaStatus.ahead:
            log.info("database schema ahead of this build", revision=state.revision)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A transaction of its own, outside any request's, kept as a request's is: when
        the block ends it commits, then invalidates the cache tags it named and wakes the
        dispatcher for the outbox messages it wrote; on error it rolls back and runs what
        :func:`on_rollback` registered."""
        async with self.db.sessionmaker() as session:
            try:
                yield session
            except BaseException:
                await _roll_back(session)
                raise
            else:
                await _commit(self, session)

    async def invalidate(self, *tags: str) -> None:
        """Drop the cached reads of ``tags`` after a change already committed. A cache
        outage is logged, not raised: the change is made, and cached reads expire."""
        try:
            await self.cache.invalidate_tags(*tags)
        except Exception as exc:
            log_invalidation_failure(self.cache, exc, tags, "after commit")

    def on_stop(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Run ``closer`` when the runtime stops, after the dispatcher has finished."""
        self._closers.append(closer)

    async def stop(self) -> None:
        if self._dispatcher_task is not None:
            await self.dispatcher.stop(self.settings.shutdown_grace_seconds)
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher_task
            self._dispatcher_task = None
        while self._closers:
            closer = self._closers.pop()
            try:
                await closer()
            except Exception:
                log.exception("closing a runtime extension failed")
        await self.pubsub.close()
        await self.cache.close()
        await self.limiter.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.db.dispose()


def redis_client(
    url: str,
    *,
    max_connections: int,
    wait_seconds: float = 2.0,
    timeout_seconds: float = 1.0,
) -> Any:
    """The Redis client a runtime shares (cache, realtime), over a pool of at most
    ``max_connections`` connections.

    When all are in use, a command waits up to ``wait_seconds`` for one to come back.
    redis-py's default pool refuses at once instead (``MaxConnectionsError``), and a
    burst of requests past the pool's size then found the cache "unavailable" and read
    the database, each request for itself, just when the process was busiest.

    A command (and a connection) that gets no answer in ``timeout_seconds`` fails: a
    Redis that hangs instead of refusing (a stopped process, a dropped route) then costs
    a request one second, not redis-py's default of five for each command. Reads on the
    pub/sub channels pass their own timeouts.
    """
    from redis.asyncio import BlockingConnectionPool, Redis

    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait_seconds,
        decode_responses=False,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
    )
    return Redis.from_pool(pool)  # closing the client closes its pool


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def load_signing_keys(settings: Settings) -> KeyRing:
    """The access-token signing keys: configured, from a mounted file, or (development)
    generated once into the data directory with mode 0600."""
    configured = settings.token_signing_keys.get_secret_value()
    if configured.strip():
        return KeyRing.from_pem_bundle(configured)
    if settings.token_signing_keys_file is not None:
        return KeyRing.from_pem_bundle(settings.token_signing_keys_file.read_text("utf-8"))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return load_or_create_keyring(settings.data_dir / SIGNING_KEYS_FILE)


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _runtime_dependency(request: Request) -> Runtime:
    # An ``async def`` dependency: FastAPI runs a plain ``def`` one in a worker thread,
    # which costs a thread hop on every request for a simple attribute read.
    return get_runtime(request)


RuntimeDep = Annotated[Runtime, Depends(_runtime_dependency)]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One transaction per request, committed after the endpoint returns and before the
    response is sent (``scope="function"``); any error rolls it back, and a failed
    commit becomes an error response, never a 2xx.

    A :class:`ProblemError` marked ``keeping_changes()`` commits instead (a refusal that
    must leave a trace). Cache tags named with :func:`invalidate_after_commit` are
    invalidated once the commit succeeded."""
    runtime = get_runtime(request)
    async with runtime.db.sessionmaker() as session:
        if request.method in SAFE_METHODS:
            await mark_read_only(session)
        try:
            yield session
        except ProblemError as exc:
            if exc.commit_changes:
                await _commit(runtime, session)
            else:
                await _roll_back(session)
            raise
        except BaseException:
            await _roll_back(session)
            raise
        else:
            await _commit(runtime, session)


async def _commit(runtime: Runtime, session: AsyncSession) -> None:
    wrote_outbox = bool(session.info.get("outbox_written"))
    tags: list[str] = session.info.pop(INVALIDATE_TAGS_KEY, [])
    try:
        await session.commit()
    except BaseException:
        await _undo_outside(session)
        raise
    session.info.pop(ROLLBACK_CALLBACKS_KEY, None)
    if tags:
        await runtime.invalidate(*tags)
    if wrote_outbox:
        runtime.dispatcher.wake()


async def _roll_back(session: AsyncSession) -> None:
    try:
        await session.rollback()
    finally:
        await _undo_outside(session)


async def _undo_outside(session: AsyncSession) -> None:
    """Run what :func:`on_rollback` registered, in order; a failing one is logged and
    the others still run."""
    callbacks: list[Callable[[], Awaitable[None]]] = session.info.pop(ROLLBACK_CALLBACKS_KEY, [])
    for callback in callbacks:
        try:
            await callback()
        except Exception:
            log.exception("undoing work done outside a failed transaction failed")


INVALIDATE_TAGS_KEY = "invalidate_tags"
ROLLBACK_CALLBACKS_KEY = "on_rollback"


def on_rollback(session: AsyncSession, callback: Callable[[], Awaitable[None]]) -> None:
    """Await ``callback`` if this request's transaction does not commit: it rolled back,
    or its commit failed. For work committed apart from the transaction that must not
    outlive it (stock held in a transaction of its own, say). The callback runs once
    the rollback is done, in the same task; it must be safe when the commit's outcome is
    unknown (a connection lost during COMMIT), so it checks before it undoes."""
    session.info.setdefault(ROLLBACK_CALLBACKS_KEY, []).append(callback)


def invalidate_after_commit(session: AsyncSession, *tags: str) -> None:
    """Invalidate cache ``tags`` once this request's transaction has committed."""
    session.info.setdefault(INVALIDATE_TAGS_KEY, []).extend(tags)


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]
