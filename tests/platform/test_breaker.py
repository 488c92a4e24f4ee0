"""The circuit breaker: closed -> open after N failures in a row, refusing fast while
open, one half-open trial after the reset time (on the injectable clock)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from soko.platform.breaker import CircuitBreaker, CircuitOpenError, CircuitState
from soko.platform.clock import ManualClock


class Boom(Exception):
    pass


class Declined(Exception):
    """An answer from a working service (a 4xx): not the service's failure."""


async def ok() -> str:
    return "ok"


async def boom() -> str:
    raise Boom


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, Boom)


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value("soko_circuit_breaker_state", {"breaker": name})


async def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            await breaker.call(boom, counts_as_failure=is_outage)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def make(clock: ManualClock, name: str, failures: int = 3, reset: float = 30) -> CircuitBreaker:
    return CircuitBreaker(name, failure_threshold=failures, reset_seconds=reset, clock=clock)


async def test_opens_after_consecutive_failures_and_refuses_without_calling(
    clock: ManualClock,
) -> None:
    breaker = make(clock, "t-open")
    await fail(breaker, 2)
    assert breaker.state is CircuitState.closed
    assert breaker.consecutive_failures == 2
    await fail(breaker, 1)
    assert breaker.state is CircuitState.open
    assert gauge("t-open") == 2

    calls = 0

    async def counted() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    with pytest.raises(CircuitOpenError) as refused:
        await breaker.call(counted)
    assert calls == 0
    assert refused.value.retry_after_seconds == pytest.approx(30)
    clock.advance(10)
    with pytest.raises(CircuitOpenError) as refused:
        await breaker.call(counted)
    assert refused.value.retry_after_seconds == pytest.approx(20)
    assert calls == 0


async def test_a_success_ends_the_run_of_failures(clock: ManualClock) -> None:
    breaker = make(clock, "t-run")
    await fail(breaker, 2)
    assert await breaker.call(ok) == "ok"
    await fail(breaker, 2)
    assert breaker.state is CircuitState.closed


async def test_errors_that_are_not_outages_count_as_answers(clock: ManualClock) -> None:
    breaker = make(clock, "t-declined", failures=2)

    async def declined() -> str:
        raise Declined

    await fail(breaker, 1)
    for _ in range(5):
        with pytest.raises(Declined):
            await breaker.call(declined, counts_as_failure=is_outage)
    assert breaker.state is CircuitState.closed
    assert breaker.consecutive_failures == 0


async def test_half_open_after_reset_lets_one_trial_through(clock: ManualClock) -> None:
    breaker = make(clock, "t-half", failures=1, reset=30)
    await fail(breaker, 1)
    clock.advance(29.9)
    assert breaker.state is CircuitState.open
    clock.advance(0.1)
    assert breaker.state is CircuitState.half_open
    assert gauge("t-half") == 1

    trial_may_finish = asyncio.Event()

    async def slow_trial() -> str:
        await trial_may_finish.wait()
        return "ok"

    trial = asyncio.create_task(breaker.call(slow_trial))
    await asyncio.sleep(0)
    # While the trial decides, everyone else is still refused.
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    trial_may_finish.set()
    assert await trial == "ok"
    assert breaker.state is CircuitState.closed
    assert gauge("t-half") == 0
    assert await breaker.call(ok) == "ok"


async def test_a_failed_trial_opens_again_for_the_full_reset_time(clock: ManualClock) -> None:
    breaker = make(clock, "t-trial-fails", failures=2, reset=30)
    await fail(breaker, 2)
    clock.advance(30)
    await fail(breaker, 1)  # the trial: one failure is enough to open again
    assert breaker.state is CircuitState.open
    clock.advance(29)
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    clock.advance(1)
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.closed


async def test_a_cancelled_trial_gives_no_verdict_and_frees_the_slot(clock: ManualClock) -> None:
    breaker = make(clock, "t-cancel", failures=1, reset=5)
    await fail(breaker, 1)
    clock.advance(5)

    async def hangs() -> str:
        await asyncio.Event().wait()
        return "never"

    trial = asyncio.create_task(breaker.call(hangs))
    await asyncio.sleep(0)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert breaker.state is CircuitState.half_open
    assert await breaker.call(ok) == "ok"
    assert breaker.state is CircuitState.closed


async def test_snapshot_for_readiness(clock: ManualClock) -> None:
    breaker = make(clock, "t-snap", failures=1, reset=30)
    assert breaker.snapshot() == {"circuit": "closed", "consecutive_failures": 0}
    await fail(breaker, 1)
    snap = breaker.snapshot()
    assert snap["circuit"] == "open"
    assert snap["retry_after_seconds"] == 30.0
    assert snap["last_failure_at"] == clock.now().isoformat()
    before = REGISTRY.get_sample_value(
        "soko_circuit_breaker_rejections_total", {"breaker": "t-snap"}
    )
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok)
    after = REGISTRY.get_sample_value(
        "soko_circuit_breaker_rejections_total", {"breaker": "t-snap"}
    )
    assert after == (before or 0) + 1
    assert (
        REGISTRY.get_sample_value(
            "soko_circuit_breaker_transitions_total", {"breaker": "t-snap", "state": "open"}
        )
        == 1
    )


def test_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0, reset_seconds=1)
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=1, reset_seconds=0)
