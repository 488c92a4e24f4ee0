"""The orders domain's scheduled jobs (unpaid checkouts expire when their stock holds
run out, and delivered orders complete once the dispute window has passed), and what an
account's deletion means for orders: refused while the buyer's orders are under way,
then their personal details erased."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from sqlalchemy import func, select

from soko.identity.events import USER_DELETED, UserDeleted
from soko.orders import service
from soko.orders.models import Order
from soko.orders.states import OrderStatus
from soko.platform.auth import on_account_deletion
from soko.platform.jobs import JobContext, registry

log = structlog.get_logger("soko.orders")


@registry.schedule("* * * * *", name="orders.expire_unpaid")
async def expire_unpaid(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Every minute: checkouts not paid before their holds ran out expire, and their
    stock goes back on sale."""
    expired = await service.expire_unpaid(ctx.session, ctx.services)
    if expired:
        log.info("unpaid checkouts expired", count=expired)


@registry.schedule("17 * * * *", name="orders.complete_delivered")
async def complete_delivered(ctx: JobContext, payload: dict[str, Any]) -> None:
    """Hourly: delivered orders past the dispute window without a dispute complete."""
    completed = await service.complete_delivered(ctx.session, ctx.services)
    if completed:
        log.info("delivered orders completed", count=completed)


# -- the end of an account ----------------------------------------------------------------------

# What an order still needs its buyer's details for: paid and not yet finished.
_UNDER_WAY = tuple(
    status.value
    for status in (
        OrderStatus.paid,
        OrderStatus.processing,
        OrderStatus.shipped,
        OrderStatus.delivered,
        OrderStatus.disputed,
    )
)


@on_account_deletion
async def orders_under_way(session: Any, runtime: Any, user_id: uuid.UUID) -> str | None:
    """A buyer's orders on their way keep the account (its address, its contact) until
    they are completed, cancelled or refunded. Unpaid ones do not: they expire."""
    count = await session.scalar(
        select(func.count())
        .select_from(Order)
        .where(Order.buyer_id == user_id, Order.status.in_(_UNDER_WAY))
    )
    if not count:
        return None
    return (
        f"{count} of your orders {'is' if count == 1 else 'are'} still under way: they must "
        "be completed, cancelled or refunded first."
    )


@registry.on(USER_DELETED, name="orders.forget_buyer")
async def forget_buyer(ctx: JobContext, payload: dict[str, Any]) -> None:
    """A deleted buyer's orders stay (the law keeps them) without what identifies the
    person: the shipping address keeps only its country, and their disputes lose the
    details and evidence they wrote."""
    user_id = UserDeleted.model_validate(payload).user_id
    erased = await service.forget_buyer(ctx.session, user_id)
    log.info("a deleted buyer's order details erased", checkouts=erased)
