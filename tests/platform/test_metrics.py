from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def _value(text: str, name: str, **labels: str) -> float:
    return _samples(text).get((name, frozenset(labels.items())), 0.0)


async def test_requests_are_counted_under_their_route_template(
    client: httpx2.AsyncClient,
) -> None:
    before = (await client.get("/metrics")).text
    for slug in ("not-found", "internal-error", f"no-such-{uuid.uuid4().hex}"):
        await client.get(f"/problems/{slug}")
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    after = response.text

    counted = "soko_http_requests_total"
    route = "/problems/{slug}"
    ok = _value(after, counted, method="GET", route=route, status="200") - _value(
        before, counted, method="GET", route=route, status="200"
    )
    missing = _value(after, counted, method="GET", route=route, status="404") - _value(
        before, counted, method="GET", route=route, status="404"
    )
    assert (ok, missing) == (2, 1)
    timed = "soko_http_request_duration_seconds_count"
    assert (
        _value(after, timed, method="GET", route=route)
        - _value(before, timed, method="GET", route=route)
        == 3
    )
    # No raw path ever becomes a label.
    assert "/problems/not-found" not in after


async def test_unmatched_paths_share_one_label(client: httpx2.AsyncClient) -> None:
    before = (await client.get("/metrics")).text
    paths = [f"/{uuid.uuid4().hex}/{uuid.uuid4().hex}" for _ in range(5)]
    for path in paths:
        assert (await client.get(path)).status_code == 404
    await client.request("BREW", "/coffee")
    after = (await client.get("/metrics")).text

    counted = "soko_http_requests_total"
    labels = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert _value(after, counted, **labels) - _value(before, counted, **labels) == 5
    other = {"method": "OTHER", "route": "<unmatched>", "status": "404"}
    assert _value(after, counted, **other) - _value(before, counted, **other) == 1
    for path in paths:
        assert path not in after
    assert "BREW" not in after


async def test_in_flight_gauge_counts_requests_being_answered(
    app: FastAPI, client: httpx2.AsyncClient
) -> None:
    seen: list[float | None] = []

    async def probe() -> None:
        seen.append(REGISTRY.get_sample_value("soko_http_requests_in_flight"))

    app.add_api_route("/test/in-flight", probe)
    idle = REGISTRY.get_sample_value("soko_http_requests_in_flight")
    await client.get("/test/in-flight")
    assert seen == [(idle or 0) + 1]
    assert REGISTRY.get_sample_value("soko_http_requests_in_flight") == idle


async def test_failed_requests_are_counted_as_500(app: FastAPI, client: httpx2.AsyncClient) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/test/broken-metrics", broken)
    labels = {"method": "GET", "route": "/test/broken-metrics", "status": "500"}
    before = REGISTRY.get_sample_value("soko_http_requests_total", labels) or 0
    assert (await client.get("/test/broken-metrics")).status_code == 500
    assert REGISTRY.get_sample_value("soko_http_requests_total", labels) == before + 1


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    import httpx2
    from fastapi import FastAPI
    from soko.platform.metrics import HTTP_IN_FLIGHT, PrometheusMiddleware, forget_this_process

    app = FastAPI()

    @app.get("/orders/{order_id}")
    async def order(order_id: str) -> dict[str, str]:
        return {"id": order_id}

    app.add_middleware(PrometheusMiddleware)

    async def main(count: int) -> None:
        transport = httpx2.ASGITransport(app=app)
        async with httpx2.AsyncClient(transport=transport, base_url="http://w") as client:
            for number in range(count):
                await client.get(f"/orders/{number}")

    asyncio.run(main(int(sys.argv[1])))
    # As if the process ended with one request still being answered.
    HTTP_IN_FLIGHT.inc()
    if sys.argv[2] == "stopped":
        forget_this_process()
    """
)

SCRAPER = textwrap.dedent(
    """
    import sys
    from soko.platform.metrics import render_metrics
    sys.stdout.write(render_metrics().decode())
    """
)


@pytest.mark.slow
def test_multiprocess_mode_adds_up_every_process(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))

    def run(script: str, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    run(WORKER, "2", "stopped")
    run(WORKER, "3", "stopped")
    run(WORKER, "1", "killed")
    scraped = run(SCRAPER)
    labels = {"method": "GET", "route": "/orders/{order_id}", "status": "200"}
    assert _value(scraped, "soko_http_requests_total", **labels) == 6
    assert (
        _value(
            scraped,
            "soko_http_request_duration_seconds_count",
            method="GET",
            route="/orders/{order_id}",
        )
        == 6
    )
    # The two workers that said they stopped no longer count as answering; the killed
    # one still does, until the directory is emptied at the next start.
    assert _value(scraped, "soko_http_requests_in_flight") == 1


async def test_requests_in_flight_are_counted_until_answered() -> None:
    """The count the in-process dispatcher reads to give way to requests: one while a
    request runs, back to zero once its answer starts (a streamed body does not count)
    or after its unhandled error."""
    import asyncio

    from soko.platform.metrics import PrometheusMiddleware, requests_in_flight

    seen: list[int] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(requests_in_flight())
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        inside.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(requests_in_flight())  # streaming from here on
        await send({"type": "http.response.body", "body": b"streamed"})

    before = requests_in_flight()
    transport = httpx2.ASGITransport(app=PrometheusMiddleware(app), raise_app_exceptions=False)
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
        waiting = asyncio.create_task(client.get("/slow"))
        await asyncio.wait_for(inside.wait(), 10)
        assert requests_in_flight() == before + 1
        release.set()
        assert (await waiting).text == "streamed"
        assert (await client.get("/boom")).status_code == 500
    assert seen == [before + 1, before, before + 1]
    assert requests_in_flight() == before


async def test_a_process_stays_busy_for_a_moment_after_an_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the in-process dispatcher gives way to: a request being answered, or one
    answered less than ``within`` seconds ago (the gaps of a stream of requests)."""
    import time

    from soko.platform import metrics

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    transport = httpx2.ASGITransport(app=metrics.PrometheusMiddleware(app))
    async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/ping")).status_code == 204
    if metrics.requests_in_flight():
        pytest.skip("another request of this process is in flight")
    assert not metrics.serving_requests()
    assert metrics.serving_requests(within=0.25)
    now[0] += 0.2
    assert metrics.serving_requests(within=0.25)
    now[0] += 0.1
    assert not metrics.serving_requests(within=0.25)
    assert not metrics.serving_requests(within=0)
