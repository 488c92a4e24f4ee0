"""Tracing through the same wiring app.py uses: FastAPI's server spans on our provider,
SQLAlchemy statement spans, and trace ids on log lines."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import structlog
from fastapi import APIRouter, FastAPI
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import text

from soko.platform.config import Settings
from soko.platform.health import router as health_router
from soko.platform.http import RequestContextMiddleware
from soko.platform.logging import configure_logging
from soko.platform.metrics import PrometheusMiddleware
from soko.platform.runtime import Runtime
from soko.platform.tracing import (
    Tracing,
    configure_tracing,
    fastapi_telemetry,
    traces_endpoint,
)
from tests.conftest import make_settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(settings: Settings, exporter: InMemorySpanExporter) -> Tracing:
    traced = settings.model_copy(update={"otlp_endpoint": "http://127.0.0.1:4318"})
    built = configure_tracing(traced, exporter=exporter, install_global=False)
    assert built is not None
    return built


@pytest.fixture
async def traced_client(tracing: Tracing, runtime: Runtime) -> AsyncIterator[httpx2.AsyncClient]:
    app = FastAPI(telemetry=fastapi_telemetry(tracing))
    app.state.runtime = runtime
    router = APIRouter(prefix="/api/v1")
    log = structlog.get_logger("soko.test")

    @router.get("/shops/{shop_id}/items")
    async def items(shop_id: str) -> dict[str, Any]:
        async with runtime.db.engine.connect() as connection:
            value = (await connection.execute(text("SELECT 41 + 1"))).scalar_one()
        log.info("items listed", shop_id=shop_id)
        return {"shop": shop_id, "value": value}

    app.include_router(router)
    app.include_router(health_router)
    app.add_middleware(PrometheusMiddleware)
    app.add_middleware(RequestContextMiddleware)
    tracing.instrument_database(runtime.db.engine)
    tracing.instrument_database(runtime.db.engine)  # twice: still one span per statement
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client
    tracing.shutdown()


def _server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind is SpanKind.SERVER]


async def test_request_span_is_named_by_route_template_with_db_child(
    traced_client: httpx2.AsyncClient,
    exporter: InMemorySpanExporter,
    settings: Settings,
    backend: str,
) -> None:
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    response = await traced_client.get("/api/v1/shops/s-1/items?token=abc123secret&page=2")
    assert response.status_code == 200
    assert response.json()["value"] == 42

    (server,) = _server_spans(exporter)
    assert server.name == "GET /api/v1/shops/{shop_id}/items"
    attributes = dict(server.attributes or {})
    assert attributes["http.route"] == "/api/v1/shops/{shop_id}/items"
    assert attributes["http.request.method"] == "GET"
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.path"] == "/api/v1/shops/s-1/items"
    assert "abc123secret" not in attributes["url.query"]
    assert "page=2" in attributes["url.query"]
    assert server.parent is None
    assert server.resource.attributes["service.name"] == "soko"

    statements = [
        span
        for span in exporter.get_finished_spans()
        if span.kind is SpanKind.CLIENT
        and "41 + 1" in str((span.attributes or {}).get("db.query.text"))
    ]
    (statement,) = statements
    assert statement.context is not None and server.context is not None
    assert statement.context.trace_id == server.context.trace_id
    assert statement.name == f"SELECT {backend}"
    assert (statement.attributes or {})["db.system.name"] == backend

    (line,) = [
        json.loads(line)
        for line in stream.getvalue().splitlines()
        if json.loads(line)["event"] == "items listed"
    ]
    assert line["trace_id"] == format(server.context.trace_id, "032x")
    assert line["route"] == "/api/v1/shops/{shop_id}/items"


async def test_incoming_traceparent_is_continued(
    traced_client: httpx2.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    response = await traced_client.get(
        "/api/v1/shops/s-2/items",
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"},
    )
    assert response.status_code == 200
    (server,) = _server_spans(exporter)
    assert server.context is not None
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == PARENT_SPAN_ID
    assert server.parent.is_remote


async def test_unmatched_paths_and_probes(
    traced_client: httpx2.AsyncClient, exporter: InMemorySpanExporter
) -> None:
    assert (await traced_client.get("/health")).status_code == 200
    assert _server_spans(exporter) == []

    assert (await traced_client.get("/no/such/place/42")).status_code == 404
    (server,) = _server_spans(exporter)
    assert server.name == "GET"
    assert "http.route" not in (server.attributes or {})


async def test_statements_outside_a_trace_record_nothing(
    tracing: Tracing, runtime: Runtime, exporter: InMemorySpanExporter
) -> None:
    tracing.instrument_database(runtime.db.engine)
    async with runtime.db.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
    assert exporter.get_finished_spans() == ()

    with tracing.tracer.start_as_current_span("job"):
        async with runtime.db.engine.connect() as connection:
            await connection.execute(text("SELECT 2"))
    names = [span.name for span in exporter.get_finished_spans()]
    assert names[-1] == "job"
    assert any(name.startswith("SELECT") for name in names[:-1])


def test_tracing_is_off_without_an_endpoint(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert configure_tracing(settings, exporter=InMemorySpanExporter()) is None
    options = fastapi_telemetry(None)
    assert options["tracing"] is False
    assert options["metrics"] is False and options["logs"] is False


def test_traces_endpoint() -> None:
    assert traces_endpoint("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_endpoint("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_endpoint("https://otlp.example/custom/v1/traces") == (
        "https://otlp.example/custom/v1/traces"
    )
