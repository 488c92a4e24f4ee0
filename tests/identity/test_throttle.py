"""Sign-in throttling per account and per address: growing waits, a cap, no lockout."""

from __future__ import annotations

import asyncio
import datetime as dt

from sqlalchemy import select

from soko.identity import throttle
from soko.identity.models import LoginThrottle
from soko.identity.passwords import password_hasher
from soko.identity.throttle import (
    ACCOUNT_RULE,
    IP_RULE,
    ThrottleKey,
    ThrottleRule,
    account_key,
    ip_key,
)
from soko.platform.clock import ManualClock
from soko.platform.errors import RateLimited
from soko.platform.runtime import Runtime

PASSWORD = "mvua ya masika 2031"
ACCOUNT_INDEX = "a" * 64  # stands for the blind index of the typed email
ADDRESS = "203.0.113.7"


async def failures_of(runtime: Runtime, key: ThrottleKey) -> int:
    async with runtime.db.transaction(read_only=True) as session:
        row = await session.get(LoginThrottle, key.key)
        return 0 if row is None else row.failures


async def wait_of(runtime: Runtime, keys: list[ThrottleKey]) -> int | None:
    """Seconds ``check`` asks the caller to wait, or None when it lets them through."""
    async with runtime.db.transaction(read_only=True) as session:
        try:
            await throttle.check(session, keys, runtime.clock)
        except RateLimited as refused:
            assert refused.status == 429
            assert refused.headers["Retry-After"] == str(refused.extensions["retry_after"])
            return int(refused.headers["Retry-After"])
    return None


async def fail(runtime: Runtime, keys: list[ThrottleKey]) -> list[throttle.FailureCount]:
    return await throttle.record_failure(runtime.db, keys, runtime.clock)


async def sign_in(
    runtime: Runtime, stored_hash: str, password: str, *, account: str, address: str
) -> str:
    """A sign-in as the login route does it: check the address, count the account,
    verify, then count the address on a failure or forget the account's count on a
    success, answer."""
    by_account, by_address = account_key(account), ip_key(address)
    try:
        async with runtime.db.transaction(read_only=True) as session:
            await throttle.check(session, [by_address], runtime.clock)
        await throttle.begin_attempt(runtime.db, [by_account], runtime.clock)
    except RateLimited:
        return "throttled"
    ok, _ = await password_hasher(runtime).verify(password, stored_hash)
    if not ok:
        await throttle.record_failure(runtime.db, [by_address], runtime.clock)
        return "wrong"
    async with runtime.db.transaction() as session:
        await throttle.record_success(session, by_account)
    return "signed in"


def test_waits_double_after_the_free_attempts_up_to_the_cap() -> None:
    rule = ThrottleRule(free_attempts=3, base_seconds=1, cap_seconds=900, reset_after_seconds=60)
    waits = [rule.wait_after(failures) for failures in range(1, 16)]
    # Three free attempts: the third failure makes the fourth attempt wait.
    assert waits == [0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900]
    assert rule.wait_after(10**9) == 900
    assert IP_RULE.free_attempts > ACCOUNT_RULE.free_attempts
    assert ACCOUNT_RULE.cap_seconds == 15 * 60


def test_addresses_are_counted_per_ipv6_subscriber_block() -> None:
    assert ip_key("2001:db8:1:2::1").key == ip_key("2001:db8:1:2:ffff::9").key
    assert ip_key("2001:db8:1:2::1").key == "ip:2001:db8:1:2::/64"
    assert ip_key("2001:db8:1:3::1").key != ip_key("2001:db8:1:2::1").key
    assert ip_key("::ffff:203.0.113.7").key == ip_key("203.0.113.7").key == "ip:203.0.113.7"
    assert ip_key("unknown").key == "ip:unknown"
    assert len(account_key("x" * 500).key) == throttle.MAX_KEY_LENGTH


async def test_waits_grow_with_each_failure(runtime: Runtime, clock: ManualClock) -> None:
    keys = [account_key(ACCOUNT_INDEX)]
    seen = []
    for _ in range(8):
        assert await wait_of(runtime, keys) is None
        [count] = await fail(runtime, keys)
        wait = await wait_of(runtime, keys)
        seen.append(wait)
        if count.blocked_until is not None:
            assert count.blocked_until == clock.now() + dt.timedelta(seconds=wait or 0)
            clock.set(count.blocked_until)
    assert seen == [None, None, 1, 2, 4, 8, 16, 32]
    assert await failures_of(runtime, keys[0]) == 8


async def test_the_wait_is_capped_and_retry_after_counts_down(
    runtime: Runtime, clock: ManualClock
) -> None:
    keys = [account_key(ACCOUNT_INDEX)]
    for _ in range(25):
        [count] = await fail(runtime, keys)
        if count.blocked_until is not None:
            assert count.blocked_until - clock.now() <= dt.timedelta(minutes=15)
            clock.set(count.blocked_until)
    [count] = await fail(runtime, keys)
    assert count.failures == 26
    assert count.blocked_until == clock.now() + dt.timedelta(minutes=15)
    assert await wait_of(runtime, keys) == 900
    clock.advance(899.5)
    assert await wait_of(runtime, keys) == 1
    clock.advance(0.5)
    assert await wait_of(runtime, keys) is None


async def test_never_a_permanent_lockout(runtime: Runtime, clock: ManualClock) -> None:
    stored = await password_hasher(runtime).hash(PASSWORD)
    answers = []
    # An attacker hammers the account from many addresses, far past the cap.
    for attempt in range(40):
        clock.advance(30)
        address = f"198.51.100.{attempt}"
        answers.append(
            await sign_in(runtime, stored, "guess", account=ACCOUNT_INDEX, address=address)
        )
    assert answers.count("wrong") < 40
    assert "throttled" in answers
    # While the account waits, even its owner must wait...
    assert (
        await sign_in(runtime, stored, PASSWORD, account=ACCOUNT_INDEX, address=ADDRESS)
        == "throttled"
    )
    # ...but never longer than the cap.
    clock.advance(ACCOUNT_RULE.cap_seconds)
    assert (
        await sign_in(runtime, stored, PASSWORD, account=ACCOUNT_INDEX, address=ADDRESS)
        == "signed in"
    )
    assert await failures_of(runtime, account_key(ACCOUNT_INDEX)) == 0


async def test_success_resets_the_account_but_not_the_address(
    runtime: Runtime, clock: ManualClock
) -> None:
    stored = await password_hasher(runtime).hash(PASSWORD)
    free = ACCOUNT_RULE.free_attempts
    for _ in range(free - 1):
        assert (
            await sign_in(runtime, stored, "guess", account=ACCOUNT_INDEX, address=ADDRESS)
            == "wrong"
        )
    assert await failures_of(runtime, account_key(ACCOUNT_INDEX)) == free - 1
    assert (
        await sign_in(runtime, stored, PASSWORD, account=ACCOUNT_INDEX, address=ADDRESS)
        == "signed in"
    )
    assert await failures_of(runtime, account_key(ACCOUNT_INDEX)) == 0
    # The address keeps its failures; the success's own count was given back.
    assert await failures_of(runtime, ip_key(ADDRESS)) == free - 1
    # After the reset, the free attempts are free again.
    for _ in range(free - 1):
        assert (
            await sign_in(runtime, stored, "guess", account=ACCOUNT_INDEX, address=ADDRESS)
            == "wrong"
        )
    assert await wait_of(runtime, [account_key(ACCOUNT_INDEX)]) is None


async def test_one_address_is_blocked_across_accounts(runtime: Runtime, clock: ManualClock) -> None:
    stored = await password_hasher(runtime).hash(PASSWORD)
    # Credential stuffing: one guess against each of many accounts from one address.
    for victim in range(IP_RULE.free_attempts - 1):
        answer = await sign_in(
            runtime, stored, "guess", account=f"victim-{victim}", address=ADDRESS
        )
        assert answer == "wrong"
    assert await wait_of(runtime, [ip_key(ADDRESS)]) is None
    answer = await sign_in(runtime, stored, "guess", account="victim-last", address=ADDRESS)
    assert answer == "wrong"
    # The address now waits, whichever account it names next...
    assert (
        await sign_in(runtime, stored, PASSWORD, account="fresh-account", address=ADDRESS)
        == "throttled"
    )
    # ...while the same account from another address is unaffected.
    assert (
        await sign_in(runtime, stored, PASSWORD, account="fresh-account", address="192.0.2.55")
        == "signed in"
    )
    for victim in range(IP_RULE.free_attempts - 1):
        assert await failures_of(runtime, account_key(f"victim-{victim}")) == 1


async def test_old_failures_are_forgotten_after_a_quiet_period(
    runtime: Runtime, clock: ManualClock
) -> None:
    keys = [account_key(ACCOUNT_INDEX), ip_key(ADDRESS)]
    for _ in range(3):
        await fail(runtime, keys)
    clock.advance(dt.timedelta(seconds=IP_RULE.reset_after_seconds + 1))
    counts = {count.key: count.failures for count in await fail(runtime, keys)}
    assert counts == {keys[0].key: 4, keys[1].key: 1}
    clock.advance(dt.timedelta(seconds=ACCOUNT_RULE.reset_after_seconds + 1))
    [count] = await fail(runtime, keys[:1])
    assert count.failures == 1
    assert count.blocked_until is None
    assert await wait_of(runtime, keys) is None


async def test_a_failure_outlives_the_request_that_rolls_back(runtime: Runtime) -> None:
    keys = [account_key(ACCOUNT_INDEX)]
    async with runtime.db.sessionmaker() as request_session:
        # The request has written something (on SQLite it now holds the write lock).
        request_session.add(
            LoginThrottle(key="request-work", failures=9, updated_at=runtime.clock.now())
        )
        await request_session.flush()
        await throttle.record_failure(runtime.db, keys, runtime.clock, abandon=request_session)
    assert await failures_of(runtime, keys[0]) == 1
    assert await failures_of(runtime, ThrottleKey("request-work", ACCOUNT_RULE)) == 0


async def test_concurrent_failures_are_each_counted(runtime: Runtime, clock: ManualClock) -> None:
    keys = [account_key(ACCOUNT_INDEX), ip_key(ADDRESS)]
    start = asyncio.Event()

    async def one_failure(reverse: bool) -> None:
        await start.wait()
        # Callers name the keys in either order; the rows are still locked in one.
        await fail(runtime, keys[::-1] if reverse else keys)

    tasks = [asyncio.create_task(one_failure(index % 2 == 0)) for index in range(20)]
    await asyncio.sleep(0)
    start.set()
    await asyncio.gather(*tasks)
    assert await failures_of(runtime, keys[0]) == 20
    assert await failures_of(runtime, keys[1]) == 20
    async with runtime.db.transaction(read_only=True) as session:
        row = (
            await session.execute(select(LoginThrottle).where(LoginThrottle.key == keys[0].key))
        ).scalar_one()
    assert row.blocked_until == clock.now() + dt.timedelta(seconds=ACCOUNT_RULE.wait_after(20))


async def test_stale_rows_are_cleaned_up(runtime: Runtime, clock: ManualClock) -> None:
    waiting = account_key("waiting")
    idle = ip_key("192.0.2.1")
    await fail(runtime, [idle])
    for _ in range(20):
        await fail(runtime, [waiting])
    clock.advance(dt.timedelta(minutes=10))
    async with runtime.db.transaction() as session:
        removed = await throttle.forget_stale(session, clock, older_than=300)
    assert removed == 1
    assert await failures_of(runtime, idle) == 0
    assert await failures_of(runtime, waiting) == 20


async def test_stale_rows_go_in_bounded_batches(runtime: Runtime, clock: ManualClock) -> None:
    # After failures from many addresses, each run deletes at most its batch; the
    # waiting account's row is never among them.
    waiting = account_key("waiting")
    for _ in range(20):
        await fail(runtime, [waiting])
    for n in range(7):
        await fail(runtime, [ip_key(f"192.0.2.{n}")])
    clock.advance(dt.timedelta(minutes=10))
    batches = []
    for _ in range(4):
        async with runtime.db.transaction() as session:
            batches.append(await throttle.forget_stale(session, clock, older_than=300, limit=3))
    assert batches == [3, 3, 1, 0]
    assert await failures_of(runtime, waiting) == 20


async def test_parallel_guesses_get_no_more_than_the_free_attempts(
    runtime: Runtime, clock: ManualClock
) -> None:
    # Thirty guesses at once, each from an address of its own: each takes the next count
    # before its password is looked at, so only the free attempts are checked.
    stored = await password_hasher(runtime).hash(PASSWORD)
    answers = await asyncio.gather(
        *(
            sign_in(runtime, stored, "guess", account=ACCOUNT_INDEX, address=f"198.51.100.{n}")
            for n in range(30)
        )
    )
    assert answers.count("wrong") == ACCOUNT_RULE.free_attempts
    assert answers.count("throttled") == 30 - ACCOUNT_RULE.free_attempts
    # Refused attempts were not counted.
    assert await failures_of(runtime, account_key(ACCOUNT_INDEX)) == ACCOUNT_RULE.free_attempts
    assert await wait_of(runtime, [account_key(ACCOUNT_INDEX)]) == 1


async def test_sign_ins_in_flight_at_once_from_one_address_are_not_held_against_it(
    runtime: Runtime, clock: ManualClock
) -> None:
    # Thirty people behind one carrier NAT sign in at the same moment: more than the
    # address's free failures in flight, none of them a failure.
    stored = await password_hasher(runtime).hash(PASSWORD)
    answers = await asyncio.gather(
        *(
            sign_in(runtime, stored, PASSWORD, account=f"person-{n}", address=ADDRESS)
            for n in range(IP_RULE.free_attempts + 10)
        )
    )
    assert answers == ["signed in"] * (IP_RULE.free_attempts + 10)
    assert await failures_of(runtime, ip_key(ADDRESS)) == 0
    async with runtime.db.transaction(read_only=True) as session:
        assert (await session.scalars(select(LoginThrottle.key))).all() == []
