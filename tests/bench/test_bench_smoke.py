"""The benchmarks run end to end on tiny data: a real ``soko serve``, the load
generators, the raw baseline and every invariant they check. No figure is asserted (tests
never assert on time); only that the runs complete and their invariants hold."""

from __future__ import annotations

import uuid

import pytest

from bench import catalog, checkout, ledger, payment_webhooks, request_cpu
from tests.conftest import POSTGRES_UP, POSTGRES_URL, REDIS_UP, REDIS_URL, REQUIRE_SERVICES

pytestmark = [pytest.mark.slow, pytest.mark.postgres_only]


def _database_url(kind: str) -> str:
    if not POSTGRES_UP:
        if REQUIRE_SERVICES:
            pytest.fail("PostgreSQL is not reachable and SOKO_TEST_REQUIRE_SERVICES=1")
        pytest.skip("PostgreSQL is not reachable")
    # A database of its own, named like every benchmark database (they are dropped).
    return f"{POSTGRES_URL.rpartition('/')[0]}/soko_bench_smoke_{kind}_{uuid.uuid4().hex[:8]}"


async def test_catalog_benchmark_runs_and_its_invariants_hold() -> None:
    outcome = await catalog.run(
        catalog.Config(
            seconds=1.0,
            workers=1,  # one process: the in-memory cache, no Redis to empty
            connections=4,
            products=60,
            url=_database_url("catalog"),
        )
    )
    assert outcome.invariants_held
    assert set(outcome.results) == {"uncached", "uncached70", "cached", "cached70", "raw", "raw70"}
    assert all(measured.ok > 0 for measured in outcome.results.values())


async def test_checkout_benchmark_runs_and_nothing_is_oversold() -> None:
    outcome = await checkout.run(
        checkout.Config(
            workers=1,
            buyers=12,
            units=5,
            connections=4,
            rate=50.0,
            trust_after=0.0,  # no wait: tokens minted at once, their state read
            # One strategy keeps the test short; the inventory tests cover both.
            strategies=("pessimistic",),
            url=_database_url("checkout"),
        )
    )
    assert outcome.invariants_held
    assert {(run.shape, run.kind) for run in outcome.runs} == {
        (shape, kind) for shape in ("hot", "spread") for kind in ("capacity", "at rate")
    }
    assert all(len(run.created) == 5 and len(run.sold_out) == 7 for run in outcome.runs)


async def test_ledger_benchmark_checks_the_books_it_loaded() -> None:
    outcome = await ledger.run(
        ledger.Config(entries=5_000, sellers=20, repeat=1, url=_database_url("ledger"))
    )
    assert outcome.invariants_held


async def test_payment_webhook_benchmark_captures_each_payment_once() -> None:
    outcome = await payment_webhooks.run(
        payment_webhooks.Config(payments=20, connections=4, url=_database_url("webhooks"))
    )
    assert outcome.invariants_held


async def test_request_cpu_benchmark_answers_every_kind_of_request() -> None:
    if not REDIS_UP:
        if REQUIRE_SERVICES:
            pytest.fail("Redis is not reachable and SOKO_TEST_REQUIRE_SERVICES=1")
        pytest.skip("Redis is not reachable")
    results = await request_cpu.run(
        request_cpu.Config(
            requests=8,
            products=30,
            url=_database_url("cpu"),
            redis_url=f"{REDIS_URL.rpartition('/')[0]}/11",
            trust_after=0.0,  # no wait: tokens issued at once, their state read
        )
    )
    assert [measured.statuses for measured in results] == [{200}] * 5 + [{201}, set()]
    uncached, cached, cached_gzip, _me, _sign_in, checkout, background = results
    # A checkout reads and writes; the order it placed left an event and its jobs.
    assert checkout.statements > 5 and background.statements > 3
    assert uncached.statements == 2 and cached.statements == cached_gzip.statements == 0
