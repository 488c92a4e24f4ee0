"""What other domains may ask of carts: the cart a checkout turns into orders, and the
step that closes it once the orders exist."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from soko.cart.errors import CartChanged, CartNotFound
from soko.cart.models import Cart, CartLine, CartStatus
from soko.platform.outbox import session_now

__all__ = [
    "CartChanged",
    "CartForCheckout",
    "CartLineForCheckout",
    "CartNotFound",
    "cart_for_checkout",
    "mark_converted",
]


@dataclass(frozen=True, slots=True)
class CartLineForCheckout:
    """One line as the buyer left it: ``unit_price_minor`` is the price when they added
    it, to compare with the catalog's current price before charging anything."""

    variant_id: uuid.UUID
    quantity: int
    unit_price_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class CartForCheckout:
    cart_id: uuid.UUID
    user_id: uuid.UUID
    version: int
    currency: str
    lines: tuple[CartLineForCheckout, ...]


async def cart_for_checkout(
    session: AsyncSession, *, cart_id: uuid.UUID, user_id: uuid.UUID
) -> CartForCheckout:
    """The open cart ``cart_id`` of ``user_id`` with its lines (ordered by when they were
    added), in one statement. Raises :class:`CartNotFound` (404) when there is no such
    cart, it is someone else's or anonymous, or it is no longer open.

    Pass the ``version`` on to :func:`mark_converted` so a change made meanwhile is
    noticed instead of checked out unseen."""
    rows = (
        await session.execute(
            select(
                Cart.version,
                Cart.currency,
                CartLine.variant_id,
                CartLine.quantity,
                CartLine.unit_price_minor,
                CartLine.currency,
            )
            .outerjoin(CartLine, CartLine.cart_id == Cart.id)
            .where(
                Cart.id == cart_id,
                Cart.user_id == user_id,
                Cart.status == CartStatus.open.value,
            )
            .order_by(CartLine.added_at, CartLine.id)
        )
    ).all()
    if not rows:
        raise CartNotFound()
    version, currency = rows[0][0], rows[0][1]
    lines = tuple(
        CartLineForCheckout(
            variant_id=variant_id,
            quantity=quantity,
            unit_price_minor=unit_price,
            currency=line_currency,
        )
        for _, _, variant_id, quantity, unit_price, line_currency in rows
        if variant_id is not None
    )
    return CartForCheckout(
        cart_id=cart_id, user_id=user_id, version=version, currency=currency, lines=lines
    )


async def mark_converted(session: AsyncSession, *, cart_id: uuid.UUID, version: int) -> None:
    """Close the cart as checked out, only if it is still open at ``version`` (one
    conditional UPDATE). Raises :class:`CartChanged` (409) when it moved meanwhile: a
    line changed, it was merged, expired or already checked out."""
    result = await session.execute(
        update(Cart)
        .where(
            Cart.id == cart_id,
            Cart.status == CartStatus.open.value,
            Cart.version == version,
        )
        .values(
            status=CartStatus.converted.value,
            version=Cart.version + 1,
            updated_at=session_now(session),
        )
        .returning(Cart.id)
        .execution_options(synchronize_session=False)
    )
    if result.first() is None:
        raise CartChanged("The cart changed since it was read; read it again and retry.")
