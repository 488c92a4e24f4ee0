"""An injectable clock. Code asks the clock for the time, so tests can move it."""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware, in UTC."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class ManualClock:
    """A clock that moves only when told; for tests and simulations."""

    def __init__(self, start: dt.datetime | None = None) -> None:
        start = start or dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
        if start.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._now = start.astimezone(dt.UTC)

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, delta: dt.timedelta | float) -> dt.datetime:
        if not isinstance(delta, dt.timedelta):
            delta = dt.timedelta(seconds=delta)
        if delta < dt.timedelta(0):
            raise ValueError("time only moves forward")
        self._now += delta
        return self._now

    def set(self, moment: dt.datetime) -> None:
        if moment.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        if moment < self._now:
            raise ValueError("time only moves forward")
        self._now = moment.astimezone(dt.UTC)


def ensure_utc(moment: dt.datetime) -> dt.datetime:
    """Return ``moment`` in UTC; refuse naive datetimes rather than guess their zone."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: attach a time zone")
    return moment.astimezone(dt.UTC)
