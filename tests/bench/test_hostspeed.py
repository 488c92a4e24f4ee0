"""The host-speed figure printed around each benchmark: the work runs and is reported
as the fastest and the median of its timings (no time is asserted)."""

from __future__ import annotations

import pytest

from bench import hostspeed


def test_measure_reports_the_fastest_timing_first() -> None:
    fastest, median = hostspeed.measure(timings=3, rounds=20)
    assert 0 < fastest <= median


def test_describe_names_the_moment_and_both_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hostspeed, "measure", lambda: (41.25, 43.0))
    assert hostspeed.describe("before") == (
        "host speed (before) 41.2 ms a fixed Python workload (median of 5 43.0; lower is faster)"
    )


def test_a_round_of_the_work_is_the_same_every_time() -> None:
    assert [hostspeed._round(n) for n in range(5)] == [hostspeed._round(n) for n in range(5)]
    assert len({hostspeed._round(n) for n in range(5)}) > 1
