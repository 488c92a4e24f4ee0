"""Admission: at most ``request_concurrency`` requests of a process worked on at once,
the others waiting their turn in arrival order, a place given up while a request waits
on its client or another service and taken back ahead of requests not yet started."""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx2
import pytest
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from soko.app import create_app
from soko.platform.admission import (
    REQUESTS_SHED,
    AdmissionMiddleware,
    RequestGate,
    working_elsewhere,
)
from soko.platform.config import ConfigError, load_settings
from tests.conftest import make_settings

SAFETY = 2.0  # seconds: only a safety net, never reached when the code works


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(SAFETY):
        while not condition():
            await asyncio.sleep(0)


async def within(awaitable: Awaitable[object]) -> None:
    async with asyncio.timeout(SAFETY):
        await awaitable


def http_scope(path: str) -> Scope:
    return {"type": "http", "method": "GET", "path": path, "headers": [], "state": {}}


async def no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def ignore(message: Message) -> None:
    pass


class HeldApp:
    """Records each request's path as it reaches the app, and answers it once that
    path's ``release`` is set."""

    def __init__(self) -> None:
        self.arrived: list[str] = []
        self.reached: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.release: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", scope["type"])
        self.arrived.append(path)
        self.reached[path].set()
        if scope["type"] != "http":
            return
        await self.release[path].wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def gated(app: HeldApp, limit: int = 1, queue_seconds: float = SAFETY) -> AdmissionMiddleware:
    return AdmissionMiddleware(app, limit=limit, queue_seconds=queue_seconds)


def start(
    middleware: AdmissionMiddleware, path: str, receive: Receive = no_body
) -> asyncio.Task[None]:
    return asyncio.create_task(middleware(http_scope(path), receive, ignore))


def gate_of(middleware: AdmissionMiddleware) -> RequestGate:
    assert middleware.gate is not None
    return middleware.gate


# The gate


def test_a_gate_admits_at_most_its_limit_at_once() -> None:
    gate = RequestGate(2)
    assert gate.try_enter()
    assert gate.try_enter()
    assert not gate.try_enter()
    assert gate.free == 0


def test_a_gate_of_no_places_is_refused() -> None:
    with pytest.raises(ValueError):
        RequestGate(0)


async def test_the_next_enter_waits_until_someone_leaves() -> None:
    gate = RequestGate(1)
    await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await until(lambda: gate.waiting == 1)
    assert not waiter.done()
    gate.leave()
    await within(waiter)
    assert (gate.free, gate.waiting) == (0, 0)


async def test_waiters_are_served_in_arrival_order_and_ahead_of_newcomers() -> None:
    gate = RequestGate(1)
    await gate.enter()
    waiters: dict[str, asyncio.Task[None]] = {}
    for name in ["a", "b", "c"]:
        waiters[name] = asyncio.create_task(gate.enter())
        await until(lambda: gate.waiting == len(waiters))
    waiters["back"] = asyncio.create_task(gate.enter(first=True))
    await until(lambda: gate.waiting == 4)
    for served, name in enumerate(["back", "a", "b", "c"], start=1):
        gate.leave()
        assert not gate.try_enter()  # the place went to a waiter, not to a newcomer
        await within(waiters[name])
        assert sum(waiter.done() for waiter in waiters.values()) == served


async def test_an_enter_that_times_out_leaves_no_waiter_behind() -> None:
    gate = RequestGate(1)
    await gate.enter()
    with pytest.raises(TimeoutError):
        await gate.enter(within=0.01)
    assert gate.waiting == 0
    gate.leave()
    assert gate.free == 1


async def test_a_waiter_cancelled_while_waiting_takes_no_place() -> None:
    gate = RequestGate(1)
    await gate.enter()
    cancelled = asyncio.create_task(gate.enter())
    await until(lambda: gate.waiting == 1)
    behind = asyncio.create_task(gate.enter())
    await until(lambda: gate.waiting == 2)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert gate.waiting == 1
    gate.leave()
    await within(behind)  # the place skipped the cancelled waiter
    gate.leave()
    assert (gate.free, gate.waiting) == (1, 0)


async def test_a_place_that_comes_as_the_wait_is_cancelled_is_passed_on() -> None:
    gate = RequestGate(1)
    await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await until(lambda: gate.waiting == 1)
    gate.leave()  # the place is the waiter's, but it has not run yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (gate.free, gate.waiting) == (1, 0)


async def test_after_everyone_leaves_every_place_is_free() -> None:
    gate = RequestGate(3)
    done = asyncio.Event()

    async def work() -> None:
        await gate.enter(within=SAFETY)
        await done.wait()
        gate.leave()

    workers = [asyncio.create_task(work()) for _ in range(8)]
    await until(lambda: gate.waiting == 5)
    workers[4].cancel()
    workers[6].cancel()
    done.set()
    await within(asyncio.gather(*workers, return_exceptions=True))
    assert (gate.free, gate.waiting) == (3, 0)


# The middleware


async def test_a_request_past_the_limit_waits_for_a_place() -> None:
    app = HeldApp()
    middleware = gated(app)
    first = start(middleware, "/first")
    await within(app.reached["/first"].wait())
    second = start(middleware, "/second")
    await until(lambda: gate_of(middleware).waiting == 1)
    assert app.arrived == ["/first"]
    app.release["/first"].set()
    await within(app.reached["/second"].wait())
    app.release["/second"].set()
    await within(asyncio.gather(first, second))
    assert gate_of(middleware).free == 1


async def test_a_limit_of_zero_lets_every_request_in_at_once() -> None:
    app = HeldApp()
    middleware = gated(app, limit=0)
    assert middleware.gate is None
    requests = [start(middleware, "/first"), start(middleware, "/second")]
    await within(app.reached["/first"].wait())
    await within(app.reached["/second"].wait())
    app.release["/first"].set()
    app.release["/second"].set()
    await within(asyncio.gather(*requests))


async def test_operational_paths_never_wait() -> None:
    app = HeldApp()
    middleware = gated(app)
    held = start(middleware, "/held")
    await within(app.reached["/held"].wait())
    for path in ("/health", "/ready", "/metrics"):
        app.release[path].set()
        await within(middleware(http_scope(path), no_body, ignore))
    assert app.arrived == ["/held", "/health", "/ready", "/metrics"]
    assert gate_of(middleware).free == 0
    app.release["/held"].set()
    await within(held)


async def test_a_request_that_waits_too_long_is_answered_503() -> None:
    app = HeldApp()
    middleware = gated(app, queue_seconds=0.05)
    held = start(middleware, "/held")
    await within(app.reached["/held"].wait())
    shed_before = REQUESTS_SHED._value.get()
    transport = httpx2.ASGITransport(app=middleware)
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as client:
        async with asyncio.timeout(SAFETY):
            response = await client.get("/late")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    problem = response.json()
    assert problem["status"] == 503
    assert problem["type"].endswith("service-unavailable")
    assert "/late" not in app.arrived
    assert REQUESTS_SHED._value.get() == shed_before + 1
    app.release["/held"].set()
    await within(held)
    assert (gate_of(middleware).free, gate_of(middleware).waiting) == (1, 0)


async def test_websocket_and_lifespan_scopes_pass_straight_through() -> None:
    app = HeldApp()
    middleware = gated(app)
    held = start(middleware, "/held")
    await within(app.reached["/held"].wait())
    await within(middleware({"type": "websocket", "path": "/ws", "headers": []}, no_body, ignore))
    await within(middleware({"type": "lifespan"}, no_body, ignore))
    assert app.arrived == ["/held", "/ws", "lifespan"]
    app.release["/held"].set()
    await within(held)


async def test_a_request_that_fails_before_answering_gives_its_place_up() -> None:
    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    middleware = AdmissionMiddleware(fails, limit=1, queue_seconds=SAFETY)
    with pytest.raises(RuntimeError):
        await within(middleware(http_scope("/fails"), no_body, ignore))
    assert gate_of(middleware).free == 1


async def test_a_request_gives_its_place_up_when_its_answer_starts() -> None:
    app = HeldApp()
    answer_started = asyncio.Event()
    rest_of_body = asyncio.Event()

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/stream":
            return await app(scope, receive, send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        answer_started.set()
        await rest_of_body.wait()
        await send({"type": "http.response.body", "body": b"the rest"})

    middleware = AdmissionMiddleware(streaming, limit=1, queue_seconds=SAFETY)
    stream = start(middleware, "/stream")
    await within(answer_started.wait())
    app.release["/next"].set()
    await within(start(middleware, "/next"))
    assert not stream.done()
    assert gate_of(middleware).free == 1  # the stream's last message takes nothing back
    rest_of_body.set()
    await within(stream)
    assert gate_of(middleware).free == 1


@pytest.mark.parametrize("waits_on", ["its client's body", "another service"])
async def test_a_request_waiting_elsewhere_lets_another_in_then_goes_first(waits_on: str) -> None:
    app = HeldApp()
    events: list[str] = []
    waiting = asyncio.Event()
    wait_over = asyncio.Event()

    async def slow_client() -> Message:
        waiting.set()
        await wait_over.wait()
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def waits(scope: Scope, receive: Receive, send: Send) -> None:
        events.append(scope["path"])
        if scope["path"] == "/slow" and waits_on == "its client's body":
            await receive()
            events.append("wait over")
        elif scope["path"] == "/slow":
            async with working_elsewhere():  # as a provider's HTTP call is wrapped
                waiting.set()
                await wait_over.wait()
            events.append("wait over")
        await app(scope, receive, send)

    middleware = AdmissionMiddleware(waits, limit=1, queue_seconds=SAFETY)
    gate = gate_of(middleware)
    slow = start(middleware, "/slow", slow_client)
    await within(waiting.wait())
    other = start(middleware, "/other")
    await within(app.reached["/other"].wait())  # the place went to /other meanwhile
    newcomer = start(middleware, "/newcomer")
    await until(lambda: gate.waiting == 1)
    wait_over.set()
    await until(lambda: gate.waiting == 2)  # /slow, taking its place back
    assert events == ["/slow", "/other"]
    app.release["/other"].set()
    await within(other)
    await until(lambda: "wait over" in events)
    assert events == ["/slow", "/other", "wait over"]  # ahead of /newcomer
    assert gate.waiting == 1
    app.release["/slow"].set()
    app.release["/newcomer"].set()
    await within(asyncio.gather(slow, newcomer))
    assert events == ["/slow", "/other", "wait over", "/newcomer"]
    assert (gate.free, gate.waiting) == (1, 0)


async def test_a_body_already_received_is_read_without_giving_the_place_up() -> None:
    app = HeldApp()
    read: list[Message] = []

    async def reads(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/post":
            await app.reached["/post"].wait()  # not before /waiting waits
            read.append(await receive())
        await app(scope, receive, send)

    async def body_at_hand() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    middleware = AdmissionMiddleware(reads, limit=1, queue_seconds=SAFETY)
    gate = gate_of(middleware)
    post = start(middleware, "/post", body_at_hand)
    await until(lambda: gate.free == 0)
    waiting = start(middleware, "/waiting")
    await until(lambda: gate.waiting == 1)
    app.reached["/post"].set()
    await until(lambda: bool(read))
    assert read == [{"type": "http.request", "body": b"{}", "more_body": False}]
    assert (gate.free, gate.waiting) == (0, 1)  # /post kept its place
    assert "/waiting" not in app.arrived
    app.release["/post"].set()
    await within(post)
    app.release["/waiting"].set()
    await within(waiting)
    assert app.arrived == ["/post", "/waiting"]


async def test_a_request_cancelled_while_its_client_sends_leaves_every_place_free() -> None:
    app = HeldApp()
    never = asyncio.Event()

    async def slow_client() -> Message:
        await never.wait()
        return {"type": "http.disconnect"}

    async def reads(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await app(scope, receive, send)

    middleware = AdmissionMiddleware(reads, limit=1, queue_seconds=SAFETY)
    gate = gate_of(middleware)
    reading = start(middleware, "/reading", slow_client)
    await until(lambda: gate.free == 1)  # it waits on its client without a place
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(reading)
    assert (gate.free, gate.waiting) == (1, 0)


async def test_working_elsewhere_outside_a_request_does_nothing() -> None:
    app = HeldApp()
    middleware = gated(app)
    held = start(middleware, "/held")
    await within(app.reached["/held"].wait())
    async with working_elsewhere():  # not inside /held: its place stays its own
        assert (gate_of(middleware).free, gate_of(middleware).waiting) == (0, 0)
    assert (gate_of(middleware).free, gate_of(middleware).waiting) == (0, 0)
    app.release["/held"].set()
    await within(held)


async def test_a_wait_that_outlives_its_request_does_not_keep_a_place() -> None:
    app = HeldApp()
    disconnected = asyncio.Event()
    listeners: list[asyncio.Task[Message]] = []

    async def client_leaves() -> Message:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def listens(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/listen":
            # A task listening for the client to go away, left running by the request.
            async def listen() -> Message:
                return await receive()

            listeners.append(asyncio.create_task(listen()))
        await app(scope, receive, send)

    middleware = AdmissionMiddleware(listens, limit=1, queue_seconds=SAFETY)
    gate = gate_of(middleware)
    listening = start(middleware, "/listen", client_leaves)
    await within(app.reached["/listen"].wait())
    await until(lambda: gate.free == 1)  # the listener gave the place up
    busy = start(middleware, "/busy")
    await within(app.reached["/busy"].wait())
    disconnected.set()
    await until(lambda: gate.waiting == 1)  # the listener, taking the place back
    app.release["/listen"].set()
    await within(listening)
    app.release["/busy"].set()
    await within(busy)
    await within(listeners[0])
    assert (gate.free, gate.waiting) == (1, 0)
    app.release["/later"].set()
    await within(start(middleware, "/later"))
    assert app.arrived == ["/listen", "/busy", "/later"]


# The wiring


def test_the_app_admits_as_many_requests_as_configured(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, request_concurrency=1, request_queue_seconds=2.5))
    [admission] = [
        m
        for m in app.user_middleware
        if m.cls is AdmissionMiddleware  # type: ignore[comparison-overlap]
    ]
    assert admission.kwargs["limit"] == 1
    assert admission.kwargs["queue_seconds"] == 2.5


def test_the_limit_and_the_queue_time_have_defaults_and_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path)
    assert (settings.request_concurrency, settings.request_queue_seconds) == (8, 10)
    monkeypatch.setenv("SOKO_REQUEST_CONCURRENCY", "0")
    monkeypatch.setenv("SOKO_REQUEST_QUEUE_SECONDS", "0.5")
    settings = make_settings(tmp_path)
    assert (settings.request_concurrency, settings.request_queue_seconds) == (0, 0.5)


def test_a_negative_limit_or_no_queue_time_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [name for name in os.environ if name.startswith("SOKO_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOKO_REQUEST_CONCURRENCY", "-1")
    monkeypatch.setenv("SOKO_REQUEST_QUEUE_SECONDS", "0")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    named = {problem.split(":", 1)[0] for problem in caught.value.problems}
    assert named == {"SOKO_REQUEST_CONCURRENCY", "SOKO_REQUEST_QUEUE_SECONDS"}
    with pytest.raises(ValidationError):
        make_settings(tmp_path, request_concurrency=-1)
    with pytest.raises(ValidationError):
        make_settings(tmp_path, request_queue_seconds=0)
