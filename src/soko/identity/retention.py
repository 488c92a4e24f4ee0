"""Retention of sign-in data: ended sessions, spent secrets and stale throttle counters.

One hourly job (:data:`PURGE_JOB`) deletes, in bounded batches:

* sessions revoked or expired more than ``SOKO_RETENTION_DAYS`` ago, with their refresh
  tokens. A refresh token of a session still alive stays, rotated or not: presenting a
  rotated token again is how a stolen copy is detected (the whole family is revoked,
  :func:`soko.identity.sessions.refresh_session`), so it matters for as long as it could
  be presented, and every token of a session expires with its session. Once the session
  has ended, its tokens are refused the same way found or not;
* one-time codes, link tokens (email verification, password reset) and MFA challenges a
  day (:data:`SPENT_MARGIN`) after they expired: the longest look-back over them is the
  daily cap of codes per number and per address (24 hours since a code was created), and
  a code always expires after it was created;
* login throttle rows no longer counted (:func:`soko.identity.throttle.forget_stale`):
  a day without a failure forgets them anyway.

The audit log (``audit_events``) keeps what happened (sign-ins, revocations, reuse) on
purpose and is never purged.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, cast

import structlog
from sqlalchemy import Table, delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity import throttle
from soko.identity.models import (
    AuthSession,
    MfaChallenge,
    OneTimeCode,
    RefreshToken,
    VerificationToken,
)
from soko.identity.sms_codes import DAY
from soko.platform.clock import Clock
from soko.platform.jobs import JobContext, registry
from soko.platform.retention import continue_purge, days, purge_batch

log = structlog.get_logger("soko.identity.retention")

PURGE_JOB = "identity.purge_expired"
SESSION_BATCH = 500
TOKEN_BATCH = 5000
SECRET_BATCH = 1000
THROTTLE_BATCH = 10_000
# How long spent codes, link tokens and MFA challenges outlive their expiry: the daily
# caps of codes look back a day (sms_codes.DAY); MFA's failure window, an hour.
SPENT_MARGIN = DAY
# Throttle rows whose last failure is older than every rule's quiet period count for
# nothing: the next failure would start again from zero.
THROTTLE_STALE_SECONDS = max(
    throttle.ACCOUNT_RULE.reset_after_seconds, throttle.IP_RULE.reset_after_seconds
)

_SESSIONS = cast(Table, AuthSession.__table__)
_TOKENS = cast(Table, RefreshToken.__table__)


@dataclass(frozen=True)
class IdentityPurged:
    sessions: int = 0
    refresh_tokens: int = 0
    one_time_codes: int = 0
    verification_tokens: int = 0
    mfa_challenges: int = 0
    throttles: int = 0
    full: bool = False

    @property
    def total(self) -> int:
        return (
            self.sessions
            + self.refresh_tokens
            + self.one_time_codes
            + self.verification_tokens
            + self.mfa_challenges
            + self.throttles
        )


async def purge_ended_sessions(
    session: AsyncSession,
    now: dt.datetime,
    *,
    keep: dt.timedelta,
    limit: int = SESSION_BATCH,
    token_limit: int = TOKEN_BATCH,
) -> tuple[int, int, bool]:
    """Delete up to ``limit`` sessions revoked or expired before ``now - keep``, after
    their refresh tokens (at most ``token_limit`` of them; a session whose tokens are not
    all gone yet waits for the next batch). (sessions, tokens, whether more may wait)."""
    cutoff = now - keep
    ended = or_(_SESSIONS.c.revoked_at < cutoff, _SESSIONS.c.expires_at < cutoff)
    # An ended session never comes back: revoked stays revoked, expired stays expired.
    # Each pick reads a range of its own index (expires_at; revoked_at where revoked),
    # so a run with nothing due reads nothing.
    chosen: dict[Any, None] = {}
    for column in (_SESSIONS.c.expires_at, _SESSIONS.c.revoked_at):
        if len(chosen) >= limit:
            break
        found = await session.scalars(
            select(_SESSIONS.c.id)
            .where(column < cutoff)
            .order_by(column)
            .limit(limit - len(chosen))
        )
        chosen.update(dict.fromkeys(found.all()))
    picked = list(chosen)
    if not picked:
        return 0, 0, False
    tokens = await purge_batch(
        session,
        _TOKENS,
        [_TOKENS.c.session_id.in_(picked)],
        order_by=[_TOKENS.c.session_id],
        limit=token_limit,
    )
    gone = await session.execute(
        delete(_SESSIONS)
        .where(
            _SESSIONS.c.id.in_(picked),
            ended,
            ~exists().where(_TOKENS.c.session_id == _SESSIONS.c.id),
        )
        .returning(_SESSIONS.c.id)
    )
    sessions = len(gone.all())
    full = len(picked) >= limit or len(tokens) >= token_limit
    return sessions, len(tokens), full


async def purge_spent_secrets(
    session: AsyncSession, now: dt.datetime, *, limit: int = SECRET_BATCH
) -> tuple[int, int, int, bool]:
    """Delete up to ``limit`` each of one-time codes, link tokens and MFA challenges
    that expired more than :data:`SPENT_MARGIN` ago. (codes, link tokens, challenges,
    whether more may wait)."""
    cutoff = now - SPENT_MARGIN
    counts: list[int] = []
    full = False
    for model, extra in (
        # Codes also count toward the daily caps for a day after they were created.
        (OneTimeCode, [OneTimeCode.created_at < now - DAY]),
        (VerificationToken, []),
        (MfaChallenge, []),
    ):
        table = cast(Table, model.__table__)
        rows = await purge_batch(
            session,
            table,
            [table.c.expires_at < cutoff, *extra],
            order_by=[table.c.expires_at],
            limit=limit,
        )
        counts.append(len(rows))
        full = full or len(rows) >= limit
    return counts[0], counts[1], counts[2], full


async def purge_identity(
    session: AsyncSession, clock: Clock, *, keep: dt.timedelta
) -> IdentityPurged:
    """One round of every identity purge (see the module)."""
    now = clock.now()
    sessions, tokens, sessions_full = await purge_ended_sessions(session, now, keep=keep)
    codes, links, challenges, secrets_full = await purge_spent_secrets(session, now)
    throttles = await throttle.forget_stale(
        session, clock, older_than=THROTTLE_STALE_SECONDS, limit=THROTTLE_BATCH
    )
    return IdentityPurged(
        sessions=sessions,
        refresh_tokens=tokens,
        one_time_codes=codes,
        verification_tokens=links,
        mfa_challenges=challenges,
        throttles=throttles,
        full=sessions_full or secrets_full or throttles >= THROTTLE_BATCH,
    )


@registry.schedule("15 * * * *", name=PURGE_JOB)
async def purge_identity_job(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Hourly: forget ended sessions, spent secrets and stale throttle rows."""
    purged = await purge_identity(
        ctx.session, ctx.clock, keep=days(ctx.services.settings.retention_days)
    )
    if purged.total:
        log.info(
            "sign-in data purged",
            sessions=purged.sessions,
            refresh_tokens=purged.refresh_tokens,
            one_time_codes=purged.one_time_codes,
            verification_tokens=purged.verification_tokens,
            mfa_challenges=purged.mfa_challenges,
            throttles=purged.throttles,
        )
    await continue_purge(ctx, PURGE_JOB, payload, more=purged.full)
