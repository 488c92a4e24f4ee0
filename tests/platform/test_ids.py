from __future__ import annotations

import datetime as dt
import itertools
import threading
import uuid

import pytest

from soko.platform import ids
from soko.platform.ids import uuid7, uuid7_time_ms

# 2031-05-04T03:02:01.234Z, well after any id this process has made so far
FUTURE_MS = int(dt.datetime(2031, 5, 4, 3, 2, 1, 234000, tzinfo=dt.UTC).timestamp() * 1000)


@pytest.fixture
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``uuid7`` read a clock the test sets (in ms); the generator's state is restored
    afterwards so later ids in this process are unaffected."""
    now = [FUTURE_MS]
    monkeypatch.setattr(ids, "_last_ms", 0)
    monkeypatch.setattr(ids, "_counter", 0)
    monkeypatch.setattr(ids.time, "time_ns", lambda: now[0] * 1_000_000 + 999_999)
    return now


def test_version_and_variant_bits() -> None:
    for _ in range(1000):
        value = uuid7()
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert (value.int >> 76) & 0xF == 0x7
        assert (value.int >> 62) & 0b11 == 0b10


def test_ids_are_strictly_increasing_across_many_calls() -> None:
    made = [uuid7() for _ in range(20_000)]
    assert all(a < b for a, b in itertools.pairwise(made))
    assert made == sorted(made) and len(set(made)) == len(made)
    # as bytes too, which is how a database compares them
    assert [m.bytes for m in made] == sorted(m.bytes for m in made)


def test_time_is_embedded_and_extracted(frozen_time: list[int]) -> None:
    value = uuid7()
    assert uuid7_time_ms(value) == FUTURE_MS
    frozen_time[0] += 5
    assert uuid7_time_ms(uuid7()) == FUTURE_MS + 5


def test_monotonic_within_one_millisecond(frozen_time: list[int]) -> None:
    made = [uuid7() for _ in range(1000)]
    assert {uuid7_time_ms(m) for m in made} <= {FUTURE_MS, FUTURE_MS + 1}
    assert all(a < b for a, b in itertools.pairwise(made))


def test_counter_exhaustion_borrows_the_next_millisecond(frozen_time: list[int]) -> None:
    made = [uuid7() for _ in range(10_000)]  # far more than the 12-bit counter holds
    assert all(a < b for a, b in itertools.pairwise(made))
    assert uuid7_time_ms(made[-1]) > FUTURE_MS


def test_monotonic_when_the_wall_clock_steps_back(frozen_time: list[int]) -> None:
    before = uuid7()
    frozen_time[0] -= 60_000
    after = [uuid7() for _ in range(100)]
    assert all(before < a for a in after)
    assert all(a < b for a, b in itertools.pairwise(after))


def test_unique_across_threads() -> None:
    made: list[uuid.UUID] = []
    lock = threading.Lock()

    def make() -> None:
        batch = [uuid7() for _ in range(2000)]
        with lock:
            made.extend(batch)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 16_000


def test_time_extraction_refuses_other_versions() -> None:
    with pytest.raises(ValueError):
        uuid7_time_ms(uuid.uuid4())
