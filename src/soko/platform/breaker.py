"""A small circuit breaker for calls to another service (a payment provider, say).

Closed: calls go through; each failure the caller counts adds to a run of consecutive
failures, and any success ends the run. After ``failure_threshold`` failures in a row the
breaker opens: calls are refused at once with :class:`CircuitOpenError` (no waiting on a
service that is down, no pile-up of requests behind it). Once ``reset_seconds`` have
passed on the injectable clock it is half-open: exactly one trial call goes through
while the others are still refused; the trial's success closes the breaker, its failure
opens it for another ``reset_seconds``.

It is meant for one asyncio event loop: every state change happens between two awaits,
so no lock is needed. Each process keeps its own breakers (a worker that cannot reach a
service finds out by itself); the state gauge uses the ``livemax`` multiprocess mode so
``/metrics`` shows a breaker open if any live process has it open.

What counts as a failure is the caller's decision (``counts_as_failure``): a timeout or
a 503 says the service is in trouble, a 404 or a declined card says it is working.
A call cancelled from outside (its request went away) is no verdict either way.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from prometheus_client import Counter, Gauge

from soko.platform.clock import Clock, SystemClock

T = TypeVar("T")


class CircuitState(StrEnum):
    closed = "closed"
    open = "open"
    half_open = "half_open"


# The gauge's value per state: higher is worse, so "max" over processes means something.
_STATE_VALUE = {CircuitState.closed: 0, CircuitState.half_open: 1, CircuitState.open: 2}

BREAKER_STATE = Gauge(
    "soko_circuit_breaker_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open",
    ["breaker"],
    multiprocess_mode="livemax",
)
BREAKER_TRANSITIONS = Counter(
    "soko_circuit_breaker_transitions_total",
    "Circuit breaker state changes, by the state entered",
    ["breaker", "state"],
)
BREAKER_REJECTIONS = Counter(
    "soko_circuit_breaker_rejections_total",
    "Calls refused without being attempted because the circuit was open",
    ["breaker"],
)


class CircuitOpenError(Exception):
    """The breaker refused the call without making it. ``retry_after_seconds``: when a
    call may be let through again (at least a fraction of a second)."""

    def __init__(self, name: str, retry_after_seconds: float) -> None:
        self.name = name
        self.retry_after_seconds = retry_after_seconds
        super().__init__(f"circuit {name!r} is open; retry in {retry_after_seconds:.1f}s")


def _always(_: BaseException) -> bool:
    return True


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int,
        reset_seconds: float,
        clock: Clock | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_seconds <= 0:
            raise ValueError("reset_seconds must be positive")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self._clock: Clock = clock or SystemClock()
        self._state = CircuitState.closed
        self._failures = 0
        self._opened_at: dt.datetime | None = None
        self._trial_in_flight = False
        self._last_failure_at: dt.datetime | None = None
        BREAKER_STATE.labels(name).set(_STATE_VALUE[CircuitState.closed])

    # -- state -----------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The current state; an open breaker whose reset time has passed reads as
        half-open (the next call will be the trial)."""
        if self._state is CircuitState.open and self._reset_due():
            self._enter(CircuitState.half_open)
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after_seconds(self) -> float:
        """Seconds until a call may be let through again; 0 while closed."""
        state = self.state
        if state is CircuitState.closed:
            return 0.0
        if state is CircuitState.half_open:
            # A trial is deciding right now; its answer is at most one call away.
            return 1.0
        assert self._opened_at is not None
        elapsed = (self._clock.now() - self._opened_at).total_seconds()
        return max(self.reset_seconds - elapsed, 1.0)

    def snapshot(self) -> dict[str, object]:
        """What readiness reports; reads no network and changes nothing but the
        open -> half-open move that time has already made."""
        state = self.state
        facts: dict[str, object] = {
            "circuit": state.value,
            "consecutive_failures": self._failures,
        }
        if state is not CircuitState.closed:
            facts["retry_after_seconds"] = round(self.retry_after_seconds(), 1)
        if self._last_failure_at is not None:
            facts["last_failure_at"] = self._last_failure_at.isoformat()
        return facts

    # -- calls -----------------------------------------------------------------------------

    async def call(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        counts_as_failure: Callable[[BaseException], bool] = _always,
    ) -> T:
        """Run ``operation`` through the breaker.

        Raises :class:`CircuitOpenError` without running it while the breaker is open
        (or half-open with a trial already in flight). An exception from ``operation``
        is re-raised after being counted as a failure if ``counts_as_failure`` says so,
        else as a success (the service answered)."""
        trial = self.admit()
        try:
            result = await operation()
        except Exception as exc:
            if counts_as_failure(exc):
                self.record_failure()
            else:
                self.record_success()
            raise
        except BaseException:
            # Cancelled from outside: no verdict on the service; free the trial slot.
            if trial:
                self.release()
            raise
        self.record_success()
        return result

    def admit(self) -> bool:
        """Let one call through or raise :class:`CircuitOpenError`; answers whether the
        call is the half-open trial. A caller that is admitted must end with exactly one
        of :meth:`record_success`, :meth:`record_failure` or (a trial that gave no
        verdict) :meth:`release`."""
        state = self.state
        if state is CircuitState.closed:
            return False
        if state is CircuitState.half_open and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        BREAKER_REJECTIONS.labels(self.name).inc()
        raise CircuitOpenError(self.name, self.retry_after_seconds())

    def record_success(self) -> None:
        self._trial_in_flight = False
        self._failures = 0
        if self._state is not CircuitState.closed:
            self._opened_at = None
            self._enter(CircuitState.closed)

    def record_failure(self) -> None:
        self._trial_in_flight = False
        self._failures += 1
        self._last_failure_at = self._clock.now()
        if self._state is CircuitState.half_open or (
            self._state is CircuitState.closed and self._failures >= self.failure_threshold
        ):
            self._opened_at = self._clock.now()
            self._enter(CircuitState.open)
        elif self._state is CircuitState.open:
            # A call admitted before the breaker opened failed late: the outage goes on,
            # so the wait starts again.
            self._opened_at = self._clock.now()

    def release(self) -> None:
        self._trial_in_flight = False

    # -- internals -------------------------------------------------------------------------

    def _reset_due(self) -> bool:
        assert self._opened_at is not None
        return (self._clock.now() - self._opened_at).total_seconds() >= self.reset_seconds

    def _enter(self, state: CircuitState) -> None:
        self._state = state
        BREAKER_STATE.labels(self.name).set(_STATE_VALUE[state])
        BREAKER_TRANSITIONS.labels(self.name, state.value).inc()
