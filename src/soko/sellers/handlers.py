"""What an account's deletion means for stores: refused while the person alone owns an
active store (buyers and its other members depend on it), then their memberships end,
and a store left with no member loses its contact and payout details."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from sqlalchemy import and_, exists, select
from sqlalchemy.orm import aliased

from soko.identity.events import USER_DELETED, UserDeleted
from soko.platform.auth import on_account_deletion
from soko.platform.jobs import JobContext, registry
from soko.sellers import service
from soko.sellers.models import Seller, SellerMember, SellerRole, SellerStatus

log = structlog.get_logger("soko.sellers")


@on_account_deletion
async def stores_only_they_own(session: Any, runtime: Any, user_id: uuid.UUID) -> str | None:
    other = aliased(SellerMember)
    names = (
        await session.scalars(
            select(Seller.store_name)
            .join(SellerMember, SellerMember.seller_id == Seller.id)
            .where(
                SellerMember.user_id == user_id,
                SellerMember.role == SellerRole.owner.value,
                Seller.status == SellerStatus.active.value,
                ~exists().where(
                    and_(
                        other.seller_id == Seller.id,
                        other.role == SellerRole.owner.value,
                        other.user_id != user_id,
                    )
                ),
            )
            .order_by(Seller.store_name)
        )
    ).all()
    if not names:
        return None
    stores = ", ".join(repr(name) for name in names)
    return (
        f"You are the only owner of the active store {stores}: make another member an "
        "owner first, or ask the marketplace to suspend it."
    )


@registry.on(USER_DELETED, name="sellers.forget_member")
async def forget_member(ctx: JobContext, payload: dict[str, Any]) -> None:
    user_id = UserDeleted.model_validate(payload).user_id
    emptied = await service.forget_member(ctx.session, ctx.services, user_id)
    log.info("a deleted account left its stores", stores_emptied=emptied)
