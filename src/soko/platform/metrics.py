"""Prometheus metrics for HTTP traffic, served at ``/metrics``.

Series are labelled by the matched route *template* (``/problems/{slug}``), never the
raw path, and every path that matches no route shares the single label
``<unmatched>``: a caller probing random URLs cannot create new series.

Several processes (``soko serve`` with ``SOKO_WORKERS`` > 1, or ``uvicorn --workers``)
each hold their own counters, and a scrape reaches only one of them. To add them up,
use prometheus_client's multiprocess mode:

* set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory that every process can write,
  in the environment of the process that starts the workers, so it is there before any
  of them imports ``prometheus_client`` (the value store is chosen at import);
* empty that directory before each start (a file left by an earlier run would be added
  to the new counts);
* call :func:`forget_this_process` when a worker stops, so the in-flight gauge of a
  dead process no longer counts.

``/metrics`` then reads every process's files and answers with their sums (gauges use
``livesum``: the sum over live processes). Counters and histograms of processes that
have stopped keep counting, which is what Prometheus expects of a counter.

Job metrics live with the jobs in :mod:`soko.platform.jobs`.
"""

from __future__ import annotations

import math
import os
import time

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from soko.platform.http import route_template
from soko.platform.logging import UNMATCHED_ROUTE, bind_request_context, request_scope

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

HTTP_REQUESTS = Counter(
    "soko_http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "soko_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HTTP_IN_FLIGHT = Gauge(
    "soko_http_requests_in_flight",
    "HTTP requests being answered right now",
    multiprocess_mode="livesum",
)

# This process's requests whose answer has not started yet (the gauge above counts them
# until their body is sent): what its in-process job dispatcher gives way to. A streamed
# body, or a background task after the answer, does not make the process look busy.
_computing = 0
# When this process last began or finished working out an answer (time.monotonic()).
_last_computed = -math.inf


def requests_in_flight() -> int:
    """HTTP requests this process has begun and not yet started answering."""
    return _computing


def serving_requests(within: float = 0.0) -> bool:
    """Whether this process is working out an answer to an HTTP request right now, or
    was less than ``within`` seconds ago: requests come in streams, and the gap between
    two of them is not an idle moment."""
    if _computing > 0:
        return True
    return within > 0 and time.monotonic() - _last_computed < within


# Methods outside this set are counted as "OTHER": the method is a label too, and a
# client may send any token there.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

router = APIRouter(include_in_schema=False)

# The series of each label set, looked up once: ``labels()`` converts and checks its
# values and takes a lock every time. Bounded as the series are (route templates, known
# methods, statuses).
_ANSWERED: dict[tuple[str, str, int], Counter] = {}
_TIMED: dict[tuple[str, str], Histogram] = {}


def _answered(method: str, route: str, status: int) -> Counter:
    series = _ANSWERED.get((method, route, status))
    if series is None:
        series = _ANSWERED[(method, route, status)] = HTTP_REQUESTS.labels(
            method, route, str(status)
        )
    return series


def _timed(method: str, route: str) -> Histogram:
    series = _TIMED.get((method, route))
    if series is None:
        series = _TIMED[(method, route)] = HTTP_LATENCY.labels(method, route)
    return series


def multiprocess_directory() -> str | None:
    return os.environ.get(MULTIPROCESS_ENV) or None


def render_metrics() -> bytes:
    """Every metric in the Prometheus text format, summed over processes when
    multiprocess mode is on."""
    if multiprocess_directory():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def forget_this_process() -> None:
    """Drop this process's live gauges from the multiprocess directory; call it when a
    worker stops. Does nothing outside multiprocess mode."""
    if multiprocess_directory():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


@router.get("/metrics")
async def metrics() -> Response:
    return Response(render_metrics(), media_type=CONTENT_TYPE_LATEST)


def _note_computed() -> None:
    global _last_computed
    _last_computed = time.monotonic()


class PrometheusMiddleware:
    """Counts and times each HTTP request under its route template, and keeps the count
    of requests in flight (:func:`requests_in_flight`).

    It also makes the request's scope current for logging, so log lines written while
    the request is handled carry the route once the router has matched it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        began = time.perf_counter()
        global _computing
        computing = 1

        async def recording_send(message: Message) -> None:
            nonlocal status, computing
            global _computing
            if message["type"] == "http.response.start":
                status = message["status"]
                _computing -= computing
                computing = 0
                _note_computed()
            await send(message)

        HTTP_IN_FLIGHT.inc()
        _computing += 1
        _note_computed()
        try:
            with request_scope(scope):
                await self.app(scope, receive, recording_send)
        finally:
            if computing:
                _computing -= computing
                _note_computed()
            HTTP_IN_FLIGHT.dec()
            # The router has stored the matched route in the scope by now; a path that
            # matched nothing has none and falls under "<unmatched>".
            route = route_template(scope)
            if route != UNMATCHED_ROUTE:
                # Lines written after this one (an unhandled error's) name the route too.
                bind_request_context(route=route)
            method = scope.get("method", "GET")
            if method not in _KNOWN_METHODS:
                method = "OTHER"
            _answered(method, route, status).inc()
            _timed(method, route).observe(time.perf_counter() - began)
