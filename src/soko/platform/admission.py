"""How many requests one API process works on at once; the rest wait their turn.

An event loop does one thing at a time. Past the few requests it takes to keep it busy
while others wait on the database, a request more in progress adds no throughput, only
cost: every request in progress keeps its objects alive (the garbage collector walks
them, the CPU caches miss them), queues for a pooled database connection, and keeps a
PostgreSQL backend at work, competing with the process for the same cores. Measured on
the catalog page (2 cores, 2 processes, ADR 0022), a process with a backlog spent 2.3
to 2.5 ms of CPU an answer instead of 1.6 to 1.7: a burst or a short pause turned into
a backlog the process could no longer work off at the same arrival rate, and latency
climbed to seconds.

So each process admits at most ``request_concurrency`` requests to work at once
(:class:`RequestGate`); the next ones wait, in arrival order, before any of their work
is done, which costs next to nothing. A request holds its place only while it works:

* it gives its place up when its answer starts (a streamed body, an event stream, is
  sent without one);
* it gives its place up while it waits on its client's body or on another service
  (:func:`working_elsewhere`, used by the payment providers' and the sign-in providers'
  HTTP clients and by password hashing), and takes it back ahead of the requests that
  have not started yet.

A request that waited ``request_queue_seconds`` without a place is answered 503 with
``Retry-After``: its client has most likely given up, and the work would be wasted.
The operational endpoints (``/health``, ``/ready``, ``/metrics``) never wait.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterable
from contextlib import asynccontextmanager
from typing import Any, cast

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from soko.platform.errors import ServiceUnavailable
from soko.platform.http import OPERATIONAL_PATHS, problem_message

REQUESTS_WAITING = Gauge(
    "soko_http_requests_waiting",
    "HTTP requests waiting for their turn to be worked on",
    multiprocess_mode="livesum",
)
REQUESTS_SHED = Counter(
    "soko_http_requests_shed_total",
    "HTTP requests answered 503 after waiting request_queue_seconds for their turn",
)

SHED_RETRY_AFTER_SECONDS = 1


class RequestGate:
    """At most ``limit`` holders at once; the others wait in arrival order.

    A place given up goes straight to the first waiter, so a newcomer never takes it
    ahead of those already waiting. Invariant: places are free only while nobody
    waits."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a request gate admits at least one request")
        self.limit = limit
        self.free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    def try_enter(self) -> bool:
        """Take a place at once if one is free."""
        if self.free > 0:
            self.free -= 1
            return True
        return False

    async def enter(self, *, within: float | None = None, first: bool = False) -> None:
        """Take a place, waiting for one; ``first`` waits ahead of everyone (a request
        already in progress coming back). Raises ``TimeoutError`` after ``within``
        seconds without one."""
        if self.try_enter():
            return
        waiter = asyncio.get_running_loop().create_future()
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        REQUESTS_WAITING.inc()
        try:
            async with asyncio.timeout(within):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # the place came as the wait ended: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            REQUESTS_WAITING.dec()

    def leave(self) -> None:
        """Give a place up: to the first waiter still waiting, else back to the pool."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.free += 1


class _Place:
    """One request's place in its process's gate, held or given up for a while."""

    __slots__ = ("finished", "gate", "held")

    def __init__(self, gate: RequestGate) -> None:
        self.gate = gate
        self.held = True
        self.finished = False

    def give_up(self) -> None:
        if self.held:
            self.held = False
            self.gate.leave()

    async def take_back(self) -> None:
        if self.held or self.finished:
            return
        await self.gate.enter(first=True)
        if self.ended():
            # The request ended meanwhile (a wait outlived it: a task listening for
            # the client to disconnect): the place is not its any more.
            self.gate.leave()
        else:
            self.held = True

    def ended(self) -> bool:
        """Whether the request has finished, read anew after an await (a checker of
        types would keep what ``finished`` was before it)."""
        return self.finished

    def finish(self) -> None:
        self.finished = True
        self.give_up()


class _Resumed:
    """Awaits the rest of an awaitable whose first step was taken by hand (and stopped
    at ``pending``): what ``await`` does, from the second step on."""

    __slots__ = ("pending", "steps")

    def __init__(self, steps: Generator[Any, Any, Any], pending: Any) -> None:
        self.steps = steps
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, Any]:
        steps, pending = self.steps, self.pending
        while True:
            try:
                sent = yield pending
            except BaseException as exc:  # a cancellation, thrown in by the task
                try:
                    pending = steps.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    pending = steps.send(sent)
                except StopIteration as done:
                    return done.value


_PLACE: contextvars.ContextVar[_Place | None] = contextvars.ContextVar(
    "soko_request_place", default=None
)


@asynccontextmanager
async def working_elsewhere() -> AsyncIterator[None]:
    """Around a wait on another service (an HTTP call to a payment or sign-in
    provider): the request's place goes to another request meanwhile, and is taken
    back, ahead of requests not yet started, when the wait ends. Outside a gated
    request (a job, a test) it does nothing."""
    place = _PLACE.get()
    if place is None or not place.held:
        yield
        return
    place.give_up()
    try:
        yield
    finally:
        await place.take_back()


class AdmissionMiddleware:
    """Admits at most ``limit`` HTTP requests of this process to work at once (see the
    module's docstring); ``limit`` 0 admits every request at once."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int,
        queue_seconds: float,
        exempt: Iterable[str] = OPERATIONAL_PATHS,
    ) -> None:
        self.app = app
        self.gate = RequestGate(limit) if limit > 0 else None
        self.queue_seconds = queue_seconds
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gate = self.gate
        if gate is None or scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if not gate.try_enter():
            try:
                await gate.enter(within=self.queue_seconds)
            except TimeoutError:
                REQUESTS_SHED.inc()
                await self._shed(scope, send)
                return
        place = _Place(gate)
        token = _PLACE.set(place)

        async def receive_elsewhere() -> Message:
            if not place.held:
                return await receive()
            steps = receive().__await__()
            try:
                pending = steps.send(None)
            except StopIteration as done:
                return cast(Message, done.value)  # the body was there: no wait
            # Waiting on the client's body is not work: the place goes meanwhile.
            place.give_up()
            try:
                return cast(Message, await _Resumed(steps, pending))
            finally:
                await place.take_back()

        async def send_answering(message: Message) -> None:
            if message["type"] == "http.response.start":
                place.give_up()
            await send(message)

        try:
            await self.app(scope, receive_elsewhere, send_answering)
        finally:
            place.finish()
            _PLACE.reset(token)

    async def _shed(self, scope: Scope, send: Send) -> None:
        start, body = problem_message(
            ServiceUnavailable,
            f"The server is busy: this request waited {self.queue_seconds:g} s for its "
            f"turn. Retry in {SHED_RETRY_AFTER_SECONDS} s.",
            scope.get("path", ""),
            scope.get("state", {}).get("request_id", ""),
        )
        start["headers"].append((b"retry-after", str(SHED_RETRY_AFTER_SECONDS).encode()))
        await send(start)
        await send(body)
