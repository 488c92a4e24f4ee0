"""What a process knows of invalidations since a given time (``unchanged_since``): the
journal alone, the memory cache, and the Redis cache across processes, including a lost
channel and a message it cannot read. A "yes" must never be given where a change might
have been missed; a "no" only costs a read."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from soko.platform.cache import ChangeJournal, MemoryCache, RedisCache
from soko.platform.clock import ManualClock
from soko.platform.runtime import Runtime
from tests.conftest import make_settings
from tests.platform.test_cache_near import eventually

# -- the journal -------------------------------------------------------------------------------


def test_nothing_is_vouched_for_before_the_journal_starts_or_after_it_stops() -> None:
    journal = ChangeJournal()
    assert not journal.unchanged_since(["user:1"], 1_000.0)
    journal.start(100.0)
    assert journal.unchanged_since(["user:1"], 100.0)
    assert not journal.unchanged_since(["user:1"], 99.9)  # before it heard everything
    journal.stop()
    assert not journal.unchanged_since(["user:1"], 1_000.0)


def test_a_change_heard_at_or_after_the_time_asked_about_says_no() -> None:
    journal = ChangeJournal()
    journal.start(100.0)
    journal.record(["user:1"], 150.0)
    assert not journal.unchanged_since(["user:1"], 150.0)
    assert not journal.unchanged_since(["session:9", "user:1"], 120.0)
    assert journal.unchanged_since(["user:1"], 150.1)
    assert journal.unchanged_since(["user:2", "session:9"], 120.0)


def test_a_clock_stepped_back_never_dates_a_change_earlier() -> None:
    journal = ChangeJournal()
    journal.start(100.0)
    journal.record(["user:1"], 200.0)
    journal.record(["user:2"], 150.0)  # the wall clock went back 50 s
    assert not journal.unchanged_since(["user:2"], 190.0)


def test_forgetting_a_change_moves_what_is_known_past_it() -> None:
    journal = ChangeJournal(max_entries=2, max_seconds=1_000.0)
    journal.start(100.0)
    for number, heard in enumerate((110.0, 120.0, 130.0)):
        journal.record([f"user:{number}"], heard)
    assert len(journal) == 2
    # user:0's change (110) is forgotten: no time up to it can be vouched for any more,
    # for any tag, since that change could have been any of them.
    assert not journal.unchanged_since(["user:0"], 105.0)
    assert not journal.unchanged_since(["user:9"], 110.0)
    assert journal.unchanged_since(["user:9"], 110.5)
    assert not journal.unchanged_since(["user:1"], 115.0)


def test_changes_older_than_the_age_bound_are_forgotten_the_same_way() -> None:
    journal = ChangeJournal(max_entries=100, max_seconds=60.0)
    journal.start(100.0)
    journal.record(["user:1"], 110.0)
    journal.record(["user:2"], 200.0)  # 110 is now more than 60 s old
    assert len(journal) == 1
    assert not journal.unchanged_since(["user:3"], 105.0)
    assert journal.unchanged_since(["user:3"], 111.0)
    assert not journal.unchanged_since(["user:2"], 150.0)


# -- the memory cache -----------------------------------------------------------------------------


async def test_the_memory_cache_hears_its_own_invalidations_from_its_start() -> None:
    clock = ManualClock()
    started = clock.now().timestamp()
    cache = MemoryCache(clock=clock)
    assert cache.unchanged_since(["user:1"], started)
    assert not cache.unchanged_since(["user:1"], started - 1)
    clock.advance(10)
    await cache.invalidate_tags("user:1")
    assert not cache.unchanged_since(["user:1"], started + 5)
    assert cache.unchanged_since(["user:2"], started + 5)
    clock.advance(1)
    assert cache.unchanged_since(["user:1"], clock.now().timestamp())
    await cache.close()
    assert not cache.unchanged_since(["user:2"], clock.now().timestamp())


# -- the Redis cache, across processes ------------------------------------------------------------

redis_only = pytest.mark.redis


async def _listening_since(cache: RedisCache) -> float:
    """Start ``cache``'s listener (asking starts it) and wait until it hears everything."""
    cache.unchanged_since(["warm"], 0.0)
    await eventually(lambda: cache.journal.known_since is not None)
    known = cache.journal.known_since
    assert known is not None
    return known


@redis_only
async def test_a_process_vouches_only_from_when_its_channel_was_confirmed(
    redis_caches: Callable[..., RedisCache],
) -> None:
    clock = ManualClock()
    cache = redis_caches(clock)
    asked_at = clock.now().timestamp()
    # Not listening yet: asking starts the listener, and says no meanwhile.
    assert not cache.unchanged_since(["user:1"], asked_at)
    since = await _listening_since(cache)
    assert since == asked_at
    assert cache.unchanged_since(["user:1"], since)
    assert not cache.unchanged_since(["user:1"], since - 0.001)


@redis_only
async def test_a_change_made_by_another_process_is_heard(
    redis_caches: Callable[..., RedisCache],
) -> None:
    clock = ManualClock()
    ours, theirs = redis_caches(clock), redis_caches(clock)
    since = await _listening_since(ours)
    clock.advance(dt.timedelta(seconds=5))
    await theirs.invalidate_tags("user:1")
    await eventually(lambda: not ours.unchanged_since(["user:1"], since + 1))
    assert ours.unchanged_since(["user:2"], since + 1)
    # And the process that made it knows at once, listening or not.
    mine = await _listening_since(theirs)
    await theirs.invalidate_tags("user:3")
    assert not theirs.unchanged_since(["user:3"], mine)


@redis_only
async def test_a_lost_channel_forgets_everything_before_it_is_back(
    redis_caches: Callable[..., RedisCache],
) -> None:
    clock = ManualClock()
    cache = redis_caches(clock, retry_seconds=0.5)  # half a second before it listens again
    since = await _listening_since(cache)
    clock.advance(60)
    host, port = cache._subscription.connection._writer.get_extra_info("sockname")[:2]
    await cache.redis.client_kill_filter(_type=None, addr=f"{host}:{port}")
    await eventually(lambda: cache.journal.known_since is None)
    assert not cache.unchanged_since(["user:1"], since + 1)  # while it hears nothing
    # Whatever was published while it was gone is unknown: nothing before it is back.
    again = await _listening_since(cache)
    assert again == since + 60
    assert not cache.unchanged_since(["user:1"], since + 30)
    assert cache.unchanged_since(["user:1"], again)


@redis_only
async def test_a_message_it_cannot_read_forgets_everything_before_it(
    redis_caches: Callable[..., RedisCache],
) -> None:
    clock = ManualClock()
    cache = redis_caches(clock)
    since = await _listening_since(cache)
    clock.advance(10)
    await cache.redis.publish(cache.channel, b"\xff not json")
    await eventually(lambda: cache.journal.known_since == since + 10)
    assert not cache.unchanged_since(["user:1"], since + 5)
    assert cache.unchanged_since(["user:1"], since + 10)
    # JSON of another shape: tags that are not a list name no tag it could trust.
    clock.advance(10)
    await cache.redis.publish(cache.channel, b'{"tags": "user:1"}')
    await eventually(lambda: cache.journal.known_since == since + 20)


@redis_only
async def test_a_started_runtime_listens_before_its_first_request(
    tmp_path: Path, database_url: str, redis_url: str
) -> None:
    """A server's processes hear changes from their start, so the tokens issued after it
    (less the leeway) are taken as issued in every process, whichever got requests."""
    settings = make_settings(
        tmp_path, database_url=database_url, redis_url=redis_url, cache_backend="redis"
    )
    runtime = Runtime(settings, clock=ManualClock())
    try:
        assert isinstance(runtime.cache, RedisCache)
        await runtime.start(run_dispatcher=False)
        cache = runtime.cache
        await eventually(lambda: cache.journal.known_since is not None)
    finally:
        await runtime.stop()
