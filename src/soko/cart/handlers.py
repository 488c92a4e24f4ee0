"""What carts do when others act: follow their owner on sign-in, and expire when left."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.cart.service import (
    CART_TOKEN_HEADER,
    CART_TOKEN_PREFIX,
    EXPIRY_BATCH,
    expire_abandoned_carts,
    hash_cart_token,
    merge_anonymous_cart,
)
from soko.platform.auth import on_sign_in
from soko.platform.errors import ProblemError
from soko.platform.jobs import JobContext, registry
from soko.platform.retention import continue_purge
from soko.platform.runtime import Runtime

log = structlog.get_logger("soko.cart")


@on_sign_in
async def merge_cart_on_sign_in(
    session: AsyncSession, runtime: Runtime, user_id: uuid.UUID, headers: Mapping[str, str]
) -> None:
    """A sign-in (or sign-up) carrying an anonymous cart's token takes that cart into the
    account, in the sign-in's own transaction, so the first read after signing in shows
    it. A cart that cannot be merged must not cost the buyer their sign-in: the merge
    runs in a savepoint, and a failure is logged and left behind."""
    token = headers.get(CART_TOKEN_HEADER)
    if not token or not token.startswith(CART_TOKEN_PREFIX):
        return
    try:
        async with session.begin_nested():
            outcome = await merge_anonymous_cart(
                session, runtime, user_id=user_id, token_hash=hash_cart_token(token)
            )
    except (SQLAlchemyError, ProblemError):
        log.exception("cart merge on sign-in failed", user_id=str(user_id))
        return
    if outcome is None:
        log.info("sign-in cart token names no open anonymous cart", user_id=str(user_id))
        return
    log.info(
        "anonymous cart merged on sign-in",
        user_id=str(user_id),
        cart_id=str(outcome.cart_id),
        adopted=outcome.adopted,
        adjusted=len(outcome.adjustments),
    )


EXPIRE_JOB = "cart.expire_abandoned"


@registry.schedule("*/15 * * * *", name=EXPIRE_JOB)
async def expire_abandoned(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Close open carts nobody touched for ``cart_expiry_hours``, a batch a run; a full
    batch asks for another run at once (each its own transaction)."""
    hours: int = ctx.services.settings.cart_expiry_hours
    closed = await expire_abandoned_carts(
        ctx.session, now=ctx.now(), older_than=dt.timedelta(hours=hours)
    )
    if closed:
        log.info("abandoned carts expired", count=closed)
    await continue_purge(ctx, EXPIRE_JOB, payload, more=closed >= EXPIRY_BATCH)
