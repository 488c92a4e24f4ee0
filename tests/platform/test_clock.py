from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from soko.platform.clock import ManualClock, SystemClock, ensure_utc

NAIROBI = ZoneInfo("Africa/Nairobi")


def test_manual_clock_starts_where_told_in_utc() -> None:
    clock = ManualClock(dt.datetime(2030, 6, 1, 15, 0, tzinfo=NAIROBI))
    assert clock.now() == dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.UTC)
    assert clock.now().utcoffset() == dt.timedelta(0)


def test_manual_clock_default_is_aware() -> None:
    assert ManualClock().now().tzinfo is not None


def test_manual_clock_refuses_naive_times() -> None:
    with pytest.raises(ValueError):
        ManualClock(dt.datetime(2030, 1, 1))
    clock = ManualClock()
    with pytest.raises(ValueError):
        clock.set(dt.datetime(2030, 1, 2))


def test_manual_clock_advances_only_forward() -> None:
    clock = ManualClock(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    assert clock.advance(dt.timedelta(minutes=5)) == dt.datetime(2030, 1, 1, 0, 5, tzinfo=dt.UTC)
    assert clock.advance(1.5) == dt.datetime(2030, 1, 1, 0, 5, 1, 500000, tzinfo=dt.UTC)
    assert clock.advance(0) == clock.now()
    with pytest.raises(ValueError):
        clock.advance(dt.timedelta(seconds=-1))
    with pytest.raises(ValueError):
        clock.advance(-0.001)
    assert clock.now() == dt.datetime(2030, 1, 1, 0, 5, 1, 500000, tzinfo=dt.UTC)


def test_manual_clock_set_jumps_to_an_aware_moment_in_utc() -> None:
    clock = ManualClock(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    clock.set(dt.datetime(2030, 1, 2, 3, 0, tzinfo=NAIROBI))
    assert clock.now() == dt.datetime(2030, 1, 2, 0, 0, tzinfo=dt.UTC)
    assert clock.now().tzinfo is dt.UTC


def test_system_clock_is_aware_utc() -> None:
    now = SystemClock().now()
    assert now.tzinfo is not None
    assert now.utcoffset() == dt.timedelta(0)


def test_ensure_utc() -> None:
    local = dt.datetime(2030, 3, 1, 9, 0, tzinfo=NAIROBI)
    assert ensure_utc(local) == dt.datetime(2030, 3, 1, 6, 0, tzinfo=dt.UTC)
    assert ensure_utc(local).tzinfo is dt.UTC
    with pytest.raises(ValueError):
        ensure_utc(dt.datetime(2030, 3, 1, 9, 0))


def test_manual_clock_set_refuses_to_go_back() -> None:
    clock = ManualClock(dt.datetime(2030, 1, 2, tzinfo=dt.UTC))
    with pytest.raises(ValueError, match="forward"):
        clock.set(dt.datetime(2030, 1, 1, tzinfo=dt.UTC))
    clock.set(dt.datetime(2030, 1, 3, tzinfo=dt.UTC))
    assert clock.now() == dt.datetime(2030, 1, 3, tzinfo=dt.UTC)
