"""OpenTelemetry tracing, switched on by ``SOKO_OTLP_ENDPOINT``.

Without an endpoint nothing here runs and nothing is imported from the SDK (it is the
optional ``otel`` extra). With one, spans go to the collector over OTLP/HTTP:

* **HTTP server spans** come from FastAPI's own OpenTelemetry support (FastAPI 0.165
  ships it): one span per request named ``"<METHOD> <route template>"`` with the
  standard ``http.*``, ``url.*`` and ``server.*`` attributes, continuing an incoming W3C
  ``traceparent``, plus child spans for dependency resolution, the endpoint and
  serialization. Pass :func:`fastapi_telemetry` to ``FastAPI(telemetry=...)``. Probes
  (``/health``, ``/ready``, ``/metrics``) are not traced: they would drown the rest.
* **Database spans** come from SQLAlchemy cursor events
  (:meth:`Tracing.instrument_database`): one client span per statement, with the
  statement text (placeholders, never parameter values), and only inside a span that
  is already being recorded, so the outbox poller's idle queries start no traces.
* **Log lines** carry ``trace_id`` and ``span_id`` (see :mod:`soko.platform.logging`).
* Attributes built from the request (``url.path``, ``url.query``) are masked like log
  lines before any exporter sees them.

``SOKO_OTLP_ENDPOINT`` is the collector's base URL (``http://otel-collector:4318``);
``/v1/traces`` is added unless the URL already has a path. Other OTLP options
(headers, timeouts, compression) are read by the exporter from the standard
``OTEL_EXPORTER_OTLP_*`` variables.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi.telemetry import TelemetryConfig
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from soko.platform.config import ConfigError, Settings
from soko.platform.http import OPERATIONAL_PATHS
from soko.platform.logging import mask_field, mask_text

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

_STATEMENT_LIMIT = 4096
_FIRST_WORD = re.compile(r"\s*([A-Za-z]+)")
_SPAN_KEY = "_soko_span"


def traces_endpoint(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a collector address given with or without a path."""
    parts = urlsplit(endpoint)
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def _is_probe(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in OPERATIONAL_PATHS


class Tracing:
    """The tracer provider of this process and what it instruments."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("soko")
        self._instrumented: set[int] = set()

    def instrument_database(self, engine: AsyncEngine | Engine) -> None:
        """Record a span for each statement ``engine`` runs; calling it twice for one
        engine does nothing the second time."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        if id(sync_engine) in self._instrumented:
            return
        self._instrumented.add(id(sync_engine))
        url = sync_engine.url
        base: dict[str, Any] = {"db.system.name": _db_system(sync_engine.dialect.name)}
        if url.database:
            base["db.namespace"] = url.database
        if url.host:
            base["server.address"] = url.host
        if url.port:
            base["server.port"] = url.port
        tracer = self.tracer

        def before(
            _conn: Any,
            _cursor: Any,
            statement: str,
            _parameters: Any,
            context: Any,
            _executemany: bool,
        ) -> None:
            if context is None or not trace.get_current_span().is_recording():
                return
            match = _FIRST_WORD.match(statement)
            operation = match.group(1).upper() if match else "QUERY"
            attributes = dict(base)
            attributes["db.operation.name"] = operation
            attributes["db.query.text"] = mask_text(statement[:_STATEMENT_LIMIT])
            span = tracer.start_span(
                f"{operation} {base['db.system.name']}",
                kind=SpanKind.CLIENT,
                attributes=attributes,
                context=otel_context.get_current(),
            )
            setattr(context, _SPAN_KEY, span)

        def after(
            _conn: Any,
            _cursor: Any,
            _statement: str,
            _parameters: Any,
            context: Any,
            _executemany: bool,
        ) -> None:
            span = getattr(context, _SPAN_KEY, None)
            if span is not None:
                setattr(context, _SPAN_KEY, None)
                span.end()

        def failed(exception_context: Any) -> None:
            context = exception_context.execution_context
            span = getattr(context, _SPAN_KEY, None)
            if span is None:
                return
            setattr(context, _SPAN_KEY, None)
            error = exception_context.original_exception
            span.set_attribute("error.type", type(error).__qualname__)
            span.set_status(StatusCode.ERROR, type(error).__qualname__)
            span.end()

        event.listen(sync_engine, "before_cursor_execute", before)
        event.listen(sync_engine, "after_cursor_execute", after)
        event.listen(sync_engine, "handle_error", failed)

    def shutdown(self) -> None:
        """Send the spans still buffered and stop exporting."""
        self.provider.shutdown()


def _db_system(dialect: str) -> str:
    return "postgresql" if dialect.startswith("postgres") else dialect


def configure_tracing(
    settings: Settings,
    *,
    exporter: SpanExporter | None = None,
    install_global: bool = True,
) -> Tracing | None:
    """Build this process's tracing from ``settings``; ``None`` when
    ``SOKO_OTLP_ENDPOINT`` is not set.

    ``exporter`` replaces the OTLP exporter (tests pass an in-memory one; spans are then
    exported as they end). With ``install_global`` the provider also becomes
    OpenTelemetry's global one, the first time only, so code elsewhere (jobs, outgoing
    HTTP clients) can ``trace.get_tracer(...)`` and join the same traces.
    """
    if not settings.otlp_endpoint:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ConfigError(
            [
                "SOKO_OTLP_ENDPOINT is set but the OpenTelemetry SDK is not installed: "
                "install soko[otel]"
            ]
        ) from None

    import soko

    resource = Resource.create(
        {
            "service.name": settings.service_name,
            "service.version": soko.__version__,
            "deployment.environment.name": settings.env.value,
        }
    )
    provider = TracerProvider(resource=resource, shutdown_on_exit=exporter is None)
    provider.add_span_processor(_masking_processor())
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_endpoint(settings.otlp_endpoint)))
        )
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if install_global and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    return Tracing(provider)


def fastapi_telemetry(tracing: Tracing | None) -> TelemetryConfig:
    """The ``telemetry=`` argument for ``FastAPI(...)``: server spans through our
    provider when tracing is on, and nothing at all otherwise. FastAPI's own metrics
    and log records stay off: Prometheus and the masked structlog chain do those."""
    return {
        "tracer_provider": tracing.provider if tracing is not None else None,
        "tracing": tracing is not None,
        "metrics": False,
        "logs": False,
        "operation_spans": True,
        "auto_configure": False,
        "exclude": _is_probe,
    }


def _masked_query(query: str) -> str:
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(key, str(mask_field(key, value))) for key, value in pairs], safe="[]*@")


def _masking_processor() -> SpanProcessor:
    from opentelemetry.sdk.trace import SpanProcessor

    class MaskingSpanProcessor(SpanProcessor):
        """Masks request-derived attributes as a span starts, before any exporter reads
        them: FastAPI records the path and query string as sent."""

        def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
            attributes = span.attributes or {}
            path = attributes.get("url.path")
            if isinstance(path, str):
                masked = mask_text(path)
                if masked != path:
                    span.set_attribute("url.path", masked)
            query = attributes.get("url.query")
            if isinstance(query, str):
                span.set_attribute("url.query", _masked_query(query))

    return MaskingSpanProcessor()
