"""Brute-force throttling of sign-in: growing waits per account and per address, never a
permanent lockout.

Each key (``account:<blind index>``, ``ip:<address>``) has one ``login_throttles`` row
counting consecutive failures. After a rule's free attempts, each further failure makes
the key wait ``base * 2**n`` seconds, capped, before the next attempt is even looked at;
the cap is what keeps an attacker from locking an owner out for good. A quiet period
(``reset_after``) forgets old failures, and a successful sign-in resets the account.

A sign-in counts its attempt against the account before the password is looked at,
so parallel guesses at one account cannot all pass on one count. The address is only
checked first and counted on a failure: many people share one address (a mobile
carrier's NAT), and their sign-ins in flight at once must not make it wait::

    judge(address_state, clock)  # 429 while the address waits
    counts = await throttle.begin_attempt(runtime.db, [account], clock)  # 429 likewise
    ok, new_hash = await hasher.verify(password, stored_hash)
    if not ok:
        await throttle.record_failure(runtime.db, [address], clock, abandon=session)
        raise InvalidCredentials()  # the account's count is already taken
    await throttle.record_success(session, account)  # the account's count forgotten

A password confirmation of a signed-in user (change, re-authentication) checks first
and counts a failure after (:func:`check`, :func:`record_failure`): it needs a valid
access token, and its account is the one throttled. Counts are written in a transaction
of their own, because the request's transaction rolls back with the error answer and
would take the count with it.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import ColumnElement, Select, bindparam, case, delete, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from soko.identity.models import LoginThrottle
from soko.platform.clock import Clock
from soko.platform.db import Database, dialect_insert
from soko.platform.errors import RateLimited
from soko.platform.http import client_network

MAX_KEY_LENGTH = 128


@dataclass(frozen=True, slots=True)
class ThrottleRule:
    """How many failures pass free, and how the wait grows after them."""

    free_attempts: int
    base_seconds: float
    cap_seconds: float
    # Failures older than this (since the key's last failure) are forgotten.
    reset_after_seconds: float

    def wait_after(self, failures: int) -> float:
        """Seconds the key must wait after its ``failures``-th consecutive failure: none
        until the free attempts are used up, then ``base``, doubling with each more."""
        excess = failures - self.free_attempts
        if excess < 0:
            return 0.0
        # Bounded exponent: 2**1000 would still be a float, but 2**10000 overflows.
        return float(min(self.base_seconds * 2 ** min(excess, 64), self.cap_seconds))


# An account gets three free tries, then waits 1 s, 2 s, 4 s... up to 15 minutes: an
# owner who mistypes is barely slowed, a guesser gets a few tries an hour.
ACCOUNT_RULE = ThrottleRule(
    free_attempts=3, base_seconds=1.0, cap_seconds=15 * 60, reset_after_seconds=24 * 3600
)
# Many people share one address (carrier-grade NAT on mobile networks, cybercafés), so
# an address gets far more free tries and forgets sooner; it still stops one machine
# from trying a password against thousands of accounts.
IP_RULE = ThrottleRule(
    free_attempts=20, base_seconds=1.0, cap_seconds=15 * 60, reset_after_seconds=3600
)


@dataclass(frozen=True, slots=True)
class ThrottleKey:
    key: str
    rule: ThrottleRule


@dataclass(frozen=True, slots=True)
class FailureCount:
    """A key's state after a recorded failure."""

    key: str
    failures: int
    blocked_until: dt.datetime | None


def account_key(identifier_index: str, rule: ThrottleRule = ACCOUNT_RULE) -> ThrottleKey:
    """The key of the account an identifier names.

    Pass the blind index of the canonical identifier (email or phone) that was typed,
    not the user id: it exists whether or not the account does, so unknown and known
    accounts are throttled alike and the throttle reveals nothing about who signed up."""
    return ThrottleKey(_bounded(f"account:{identifier_index}"), rule)


def ip_key(address: str, rule: ThrottleRule = IP_RULE) -> ThrottleKey:
    """The key of a client address. IPv6 clients are counted per /64, the block one
    subscriber usually holds, so rotating through it gains nothing."""
    return ThrottleKey(_bounded(f"ip:{client_network(address)}"), rule)


def _bounded(key: str) -> str:
    return key[:MAX_KEY_LENGTH]


# What check reads, built once: every sign-in runs it.
_STATE_OF_KEYS = select(LoginThrottle.key, LoginThrottle.blocked_until).where(
    LoginThrottle.key.in_(bindparam("keys", expanding=True))
)


def state_of_keys(*more_columns: ColumnElement[Any]) -> Select[Any]:
    """What :func:`check` reads, for a caller that reads it in one statement with
    something else (a UNION with its own lookup): rows of ``key`` and
    ``blocked_until``, then ``more_columns``, for the keys bound as ``keys`` (a list of
    :attr:`ThrottleKey.key`). Hand the rows to :func:`judge`."""
    return _STATE_OF_KEYS.add_columns(*more_columns)


async def check(
    session: AsyncSession | AsyncConnection, keys: Sequence[ThrottleKey], clock: Clock
) -> None:
    """Raise :class:`RateLimited` (429 with ``Retry-After``) while any key must wait.

    Call before looking at the password, so attempts during a wait are neither
    verified nor counted."""
    if not keys:
        return
    result = await session.execute(_STATE_OF_KEYS, {"keys": [key.key for key in keys]})
    judge([(row.key, row.blocked_until) for row in result], clock)


def judge(states: Sequence[tuple[str, dt.datetime | None]], clock: Clock) -> None:
    """:func:`check`'s verdict on the ``(key, blocked_until)`` rows it read: raise
    :class:`RateLimited` while any key must wait."""
    now = clock.now()
    waits = [until for _, until in states if until is not None and until > now]
    if waits:
        raise _refusal(max(waits), now)


async def record_failure(
    db: Database,
    keys: Sequence[ThrottleKey],
    clock: Clock,
    *,
    abandon: AsyncSession | None = None,
) -> list[FailureCount]:
    """Count one failed sign-in against every key, in a transaction of its own.

    The request's transaction rolls back when the request answers an error, so a count
    written there would vanish with it; this one commits before the error is raised.
    The increment is one ``INSERT ... ON CONFLICT DO UPDATE`` per key, so concurrent
    failures are each counted (PostgreSQL locks the row; SQLite has one writer).

    ``abandon`` is the request's session, rolled back first: its work is discarded with
    the error answer anyway, and on SQLite it may hold the database's write lock, which
    this second transaction would otherwise wait on until the busy timeout."""
    if abandon is not None:
        await abandon.rollback()
    now = clock.now()
    counts = []
    async with db.transaction() as session:
        # One order for every caller, so two failures locking the same rows on
        # PostgreSQL cannot deadlock.
        for key in sorted(keys, key=lambda item: item.key):
            counts.append(await _count_failure(session, db.dialect, key, now))
    return counts


async def begin_attempt(
    db: Database, keys: Sequence[ThrottleKey], clock: Clock
) -> list[FailureCount]:
    """Count a sign-in attempt against every key *before* its password is checked, in a
    transaction of its own; raise :class:`RateLimited` (429, counting nothing) while any
    key must wait.

    Counting first is what holds under parallel requests. Read first and counted after
    the check, a hundred guesses sent at once all read the same count and were all
    checked; counted first, each takes the next count, the one past the free attempts
    sets the wait, and every later one is refused without its password being looked at.
    A success forgets the account's count (:func:`record_success`); a failure is already
    counted."""
    now = clock.now()
    counts = []
    # Core statements on a connection of its own (no session): every sign-in runs this.
    async with db.engine.begin() as connection:
        # One order for every caller, so two attempts locking the same rows on
        # PostgreSQL cannot deadlock.
        for key in sorted(keys, key=lambda item: item.key):
            failures, waiting_until = await _count_attempt(connection, db.dialect, key, now)
            if waiting_until is not None and waiting_until > now:
                # Raised inside the transaction: the counts taken for the other keys
                # roll back with it.
                raise _refusal(waiting_until, now)
            wait = key.rule.wait_after(failures)
            blocked_until = now + dt.timedelta(seconds=wait) if wait > 0 else None
            if blocked_until is not None:
                await connection.execute(
                    _SET_WAIT, {"throttle_key": key.key, "until": blocked_until}
                )
            counts.append(FailureCount(key=key.key, failures=failures, blocked_until=blocked_until))
    return counts


async def _count_attempt(
    connection: AsyncConnection, dialect: str, key: ThrottleKey, now: dt.datetime
) -> tuple[int, dt.datetime | None]:
    """One more attempt on ``key`` unless it must wait (then nothing changes); the count
    and the wait the key had, in one ``INSERT ... ON CONFLICT DO UPDATE``. The upsert
    holds the row (PostgreSQL's row lock, SQLite's write lock) until commit, so
    concurrent attempts take one count each."""
    stale_before = now - dt.timedelta(seconds=key.rule.reset_after_seconds)
    parameters = {"key": key.key, "now": now, "stale_before": stale_before}
    row = (await connection.execute(_attempt_statement(dialect), parameters)).one()
    return int(row.failures), row.blocked_until


@lru_cache(maxsize=2)
def _attempt_statement(dialect: str) -> Any:
    """:func:`_count_attempt`'s upsert, built once per dialect (every sign-in runs it;
    building it took more CPU than running it): parameters ``key``, ``now`` and
    ``stale_before``."""
    moment = LoginThrottle.updated_at.type
    now = bindparam("now", type_=moment)
    waiting = LoginThrottle.blocked_until > now
    values = dialect_insert(dialect)(LoginThrottle).values(
        key=bindparam("key"), failures=1, blocked_until=None, updated_at=now
    )
    return values.on_conflict_do_update(
        index_elements=[LoginThrottle.key],
        set_={
            "failures": case(
                (waiting, LoginThrottle.failures),
                (LoginThrottle.updated_at < bindparam("stale_before", type_=moment), 1),
                else_=LoginThrottle.failures + 1,
            ),
            "updated_at": case((waiting, LoginThrottle.updated_at), else_=now),
        },
    ).returning(LoginThrottle.failures, LoginThrottle.blocked_until)


# The statements every wait set and every successful sign-in run, built once.
_SET_WAIT = (
    update(LoginThrottle)
    .where(LoginThrottle.key == bindparam("throttle_key"))
    .values(blocked_until=bindparam("until", type_=LoginThrottle.blocked_until.type))
)
_FORGET = delete(LoginThrottle).where(LoginThrottle.key == bindparam("throttle_key"))


def _refusal(until: dt.datetime, now: dt.datetime) -> RateLimited:
    seconds = max(1, math.ceil((until - now).total_seconds()))
    return RateLimited(
        f"Too many failed sign-in attempts; try again in {seconds} seconds.",
        headers={"Retry-After": str(seconds)},
        retry_after=seconds,
    )


async def _count_failure(
    session: AsyncSession, dialect: str, key: ThrottleKey, now: dt.datetime
) -> FailureCount:
    stale_before = now - dt.timedelta(seconds=key.rule.reset_after_seconds)
    insert = dialect_insert(dialect)
    values = insert(LoginThrottle).values(
        key=key.key, failures=1, blocked_until=None, updated_at=now
    )
    upsert = values.on_conflict_do_update(
        index_elements=[LoginThrottle.key],
        set_={
            "failures": case(
                (LoginThrottle.updated_at < stale_before, 1),
                else_=LoginThrottle.failures + 1,
            ),
            "updated_at": now,
        },
    ).returning(LoginThrottle.failures)
    failures = int((await session.execute(upsert)).scalar_one())
    wait = key.rule.wait_after(failures)
    blocked_until = now + dt.timedelta(seconds=wait) if wait > 0 else None
    # The upsert holds the row (PostgreSQL's row lock, SQLite's write lock) until commit,
    # so no other failure runs between the two statements.
    await session.execute(
        update(LoginThrottle)
        .where(LoginThrottle.key == key.key)
        .values(blocked_until=blocked_until)
    )
    return FailureCount(key=key.key, failures=failures, blocked_until=blocked_until)


async def record_success(session: AsyncSession, key: ThrottleKey) -> None:
    """Forget an account's failures after a successful sign-in, in the request's
    transaction (it commits with the sign-in); for a password sign-in, that includes the
    count :func:`begin_attempt` took. Address keys are left alone: one good password
    from an address says nothing about the other attempts made from it."""
    await session.execute(_FORGET, {"throttle_key": key.key})


async def forget_stale(
    session: AsyncSession, clock: Clock, *, older_than: float, limit: int = 10_000
) -> int:
    """Delete up to ``limit`` rows whose last failure is older than ``older_than``
    seconds and that no longer make anyone wait; for the hourly purge, which runs again
    while a batch comes back full (after a credential-stuffing run from many addresses,
    say). Returns how many went.

    The table has no index on ``updated_at`` on purpose: every sign-in updates it, and
    the rows are few (one per account or address with recent failures), so the hourly
    pick reads the table rather than every sign-in paying for an index."""
    now = clock.now()
    stale = (
        LoginThrottle.updated_at < now - dt.timedelta(seconds=older_than),
        (LoginThrottle.blocked_until.is_(None)) | (LoginThrottle.blocked_until <= now),
    )
    picked = select(LoginThrottle.key).where(*stale).limit(limit).scalar_subquery()
    result = await session.execute(
        delete(LoginThrottle).where(LoginThrottle.key.in_(picked), *stale)
    )
    return int(getattr(result, "rowcount", 0) or 0)
