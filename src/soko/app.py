"""The application factory: one FastAPI app with every domain's router mounted."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from html import escape
from importlib import import_module

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from starlette.middleware.gzip import GZipMiddleware

import soko
from soko.platform import errors, fastapi_params
from soko.platform.admission import AdmissionMiddleware
from soko.platform.config import ConfigError, Settings, ensure_secrets, load_settings
from soko.platform.docs_ui import docs_router
from soko.platform.errors import NotFound, install_problem_handlers
from soko.platform.http import (
    HeadMiddleware,
    InputGuardMiddleware,
    ProblemCORSMiddleware,
    RequestContextMiddleware,
    SecurityHeadersMiddleware,
)
from soko.platform.logging import configure_logging
from soko.platform.metrics import forget_this_process
from soko.platform.ratelimit import GlobalRateLimitMiddleware
from soko.platform.routing import build_route_handling, guard_included_routers
from soko.platform.runtime import Runtime
from soko.platform.tracing import Tracing, configure_tracing, fastapi_telemetry

API_PREFIX = "/api/v1"

# Each domain package is listed once here; its models, handlers and router are loaded
# from the conventional module names when present.
DOMAINS: tuple[str, ...] = (
    "identity",
    "notifications",
    "sellers",
    "catalog",
    "inventory",
    "cart",
    "orders",
    "payments",
    "webhooks",
)

PLATFORM_MODEL_MODULES: tuple[str, ...] = ("soko.platform.outbox", "soko.platform.idempotency")
# Platform modules that register jobs (the outbox purge).
PLATFORM_HANDLER_MODULES: tuple[str, ...] = ("soko.platform.retention",)


def load_models() -> None:
    """Import every module that declares tables, so ``Base.metadata`` is complete."""
    for module in PLATFORM_MODEL_MODULES:
        import_module(module)
    for domain in DOMAINS:
        _import_optional(f"soko.{domain}.models")


def load_handlers() -> None:
    """Import every module that registers jobs, event handlers or schedules: each
    domain's handlers and its retention (purge) jobs, and the platform's own."""
    for module in PLATFORM_HANDLER_MODULES:
        import_module(module)
    for domain in DOMAINS:
        _import_optional(f"soko.{domain}.handlers")
        _import_optional(f"soko.{domain}.retention")


def _import_optional(name: str) -> object | None:
    try:
        return import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise


def check_domain_settings(settings: Settings) -> None:
    """Settings that only a domain can judge (they name the domain's own formats)."""
    from soko.identity.public import configuration_problems

    problems = configuration_problems(settings)
    if problems:
        raise ConfigError(problems)


def _inline_code(text: str) -> str:
    """``text`` escaped for HTML, its `backquoted` spans (header names, settings, codes,
    as the descriptions write them) as ``<code>``."""
    parts = escape(text).split("`")
    if len(parts) % 2 == 0:  # an unpaired backquote: shown as it is
        return escape(text)
    return "".join(
        f"<code>{part}</code>" if index % 2 else part for index, part in enumerate(parts)
    )


def _problems_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/problems/{slug}", response_class=HTMLResponse)
    async def describe_problem(slug: str) -> HTMLResponse:
        problem = errors.REGISTRY.get(slug)
        if problem is None:
            raise NotFound(f"No problem type named {slug!r}")
        return HTMLResponse(
            f"<!doctype html><title>{escape(problem.title)}</title>"
            f"<h1>{escape(problem.title)}</h1><p>HTTP {problem.status}</p>"
            f"<p>{_inline_code(problem.description)}</p>"
        )

    return router


def _freeze_startup_heap() -> None:
    """Move every object alive after startup (modules, routes, models, compiled
    statements) out of the cyclic collector's reach.

    They live as long as the process, yet each full collection walked all of them: with
    the application loaded that took 50 to 100 ms, a pause every request in flight
    waited through, several times a minute under load. Frozen, a full collection walks
    only what was made since."""
    gc.collect()
    gc.freeze()


def create_app(
    settings: Settings | None = None,
    *,
    runtime: Runtime | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """Build the Soko application. Without ``settings``, they are read from the
    environment; without ``runtime``, one is built from the settings at startup; without
    ``tracing``, tracing is configured from the settings (off unless an OTLP endpoint)."""
    if runtime is not None:
        settings = runtime.settings
    settings = ensure_secrets(settings or load_settings())
    check_domain_settings(settings)
    configure_logging(settings)
    own_tracing = tracing is None
    tracing = tracing or configure_tracing(settings)
    load_models()
    load_handlers()
    fastapi_params.install()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_runtime = runtime is None
        active = runtime or Runtime(settings)
        app.state.runtime = active
        if tracing is not None:
            tracing.instrument_database(active.db.engine)
        if own_runtime:
            # Built now rather than on the first payment: a provider whose credentials
            # are missing stops the start, and /ready lists every provider's circuit.
            from soko.identity.public import start_password_hashing
            from soko.payments.providers.registry import providers_of

            providers_of(active)
            await active.start()
            # Hashing workers start with the server: the first sign-ins wait for none.
            await start_password_hashing(active)
            # Each domain's request handling is built now, not at its first request,
            # and frozen with the rest of the startup heap.
            build_route_handling(app)
            _freeze_startup_heap()
        try:
            yield
        finally:
            if own_runtime:
                await active.stop()
            if tracing is not None and own_tracing:
                tracing.shutdown()
            providers = getattr(app.state, "oidc_providers", None)
            if providers is not None:
                await providers.aclose()
            forget_this_process()

    app = FastAPI(
        title="Soko",
        version=soko.__version__,
        summary="Backend platform for marketplaces of goods and services",
        openapi_url=f"{API_PREFIX}/openapi.json",
        # Served by soko.platform.docs_ui, from this process rather than a CDN.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        telemetry=fastapi_telemetry(tracing),
    )
    from soko.identity.public import authenticate

    app.state.authenticator = authenticate
    if runtime is not None:
        # A test's ASGI transport runs no lifespan: wire what it would have.
        app.state.runtime = runtime
        if tracing is not None:
            tracing.instrument_database(runtime.db.engine)
    install_problem_handlers(app)

    app.include_router(_problems_router())
    app.include_router(
        docs_router(title=f"{app.title} API", openapi_url=f"{API_PREFIX}/openapi.json")
    )
    from soko.platform.health import router as health_router
    from soko.platform.metrics import router as metrics_router

    app.include_router(health_router)
    app.include_router(metrics_router)
    for domain in DOMAINS:
        module = _import_optional(f"soko.{domain}.routes")
        router = getattr(module, "router", None)
        if isinstance(router, APIRouter):
            app.include_router(router, prefix=API_PREFIX)
        root_router = getattr(module, "root_router", None)
        if isinstance(root_router, APIRouter):
            app.include_router(root_router)
    # Every router is in: let each domain's routes be skipped on paths none can match.
    guard_included_routers(app)

    # Middleware runs outermost-last-added: request context wraps everything, so even a
    # 413 or a 429 carries the request id, and an unhandled error becomes a problem.
    if settings.ratelimit_enabled:
        app.add_middleware(
            GlobalRateLimitMiddleware,
            limiter_getter=lambda: app.state.runtime.limiter,
            rate=settings.ratelimit_default,
            trusted_proxies=settings.trusted_proxies,
        )
    app.add_middleware(
        GZipMiddleware, minimum_size=settings.gzip_min_bytes, compresslevel=settings.gzip_level
    )
    app.add_middleware(InputGuardMiddleware, max_bytes=settings.max_body_bytes)
    # CORS wraps the body and rate limits so a browser can read their 413 and 429.
    if settings.cors_origins:
        app.add_middleware(
            ProblemCORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "If-Match",
                "If-None-Match",
                "X-Request-ID",
                "X-Seller-Id",
                "X-Cart-Token",
            ],
            expose_headers=[
                "ETag",
                "Idempotency-Replayed",
                "Location",
                "Retry-After",
                "RateLimit",
                "RateLimit-Policy",
                "X-Request-ID",
            ],
            allow_credentials=False,
            max_age=600,
        )
    # Inside the headers and the metrics, so a request that waited its turn is timed
    # whole and a 503 for one that waited too long carries the usual headers.
    app.add_middleware(
        AdmissionMiddleware,
        limit=settings.request_concurrency,
        queue_seconds=settings.request_queue_seconds,
    )
    app.add_middleware(SecurityHeadersMiddleware, hsts=settings.is_production)
    # HEAD runs as GET from here in; outside, metrics and logs see it as HEAD.
    app.add_middleware(HeadMiddleware)
    from soko.platform.metrics import PrometheusMiddleware

    app.add_middleware(PrometheusMiddleware)
    app.add_middleware(RequestContextMiddleware)
    return app


def create_app_from_env() -> FastAPI:
    """Entry point for ``uvicorn --factory`` (used by ``soko serve``)."""
    return create_app()
