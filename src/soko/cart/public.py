"""What other domains may ask of carts: the cart a checkout turns into orders, and the
step that closes it once the orders exist."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from soko.cart.errors import CartChanged, CartNotFound
from soko.cart.models import Cart, CartLine, CartStatus
from soko.platform.outbox import session_now

__all__ = [
    "CartChanged",
    "CartForCheckout",
    "CartLineForCheckout",
    "CartNotFound",
    "cart_for_checkout",
    "converting_statement",
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


@lru_cache(maxsize=1)
def _cart_statement() -> Any:
    """The cart and its lines (``cart_id``, ``user_id``), built once: plain Core, read
    on every checkout."""
    carts: Any = Cart.__table__
    lines: Any = CartLine.__table__
    return (
        select(
            carts.c.version,
            carts.c.currency,
            lines.c.variant_id,
            lines.c.quantity,
            lines.c.unit_price_minor,
            lines.c.currency,
        )
        .select_from(carts)
        .outerjoin(lines, lines.c.cart_id == carts.c.id)
        .where(
            carts.c.id == bindparam("cart_id"),
            carts.c.user_id == bindparam("user_id"),
            carts.c.status == CartStatus.open.value,
        )
        .order_by(lines.c.added_at, lines.c.id)
    )


async def cart_for_checkout(
    session: AsyncSession | AsyncConnection, *, cart_id: uuid.UUID, user_id: uuid.UUID
) -> CartForCheckout:
    """The open cart ``cart_id`` of ``user_id`` with its lines (ordered by when they were
    added), in one statement. Raises :class:`CartNotFound` (404) when there is no such
    cart, it is someone else's or anonymous, or it is no longer open.

    Pass the ``version`` on to :func:`mark_converted` so a change made meanwhile is
    noticed instead of checked out unseen. ``session`` may be a plain connection: the
    version makes a read outside the checkout's transaction as safe as one inside."""
    rows = (
        await session.execute(_cart_statement(), {"cart_id": cart_id, "user_id": user_id})
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


@lru_cache(maxsize=1)
def _mark_converted_statement() -> Any:
    carts: Any = Cart.__table__
    return (
        update(carts)
        .where(
            carts.c.id == bindparam("cart_id"),
            carts.c.status == CartStatus.open.value,
            carts.c.version == bindparam("read_version"),
        )
        .values(
            status=CartStatus.converted.value,
            version=carts.c.version + 1,
            updated_at=bindparam("now", type_=carts.c.updated_at.type),
        )
        .returning(carts.c.id)
    )


def converting_statement() -> Any:
    """The conditional UPDATE :func:`mark_converted` runs (``RETURNING`` the cart's id,
    none when it moved), for a checkout that embeds it in a statement of its own
    (``converting_statement().where(...).cte()``). Its parameters: ``cart_id``,
    ``read_version`` and ``now``."""
    return _mark_converted_statement()


async def mark_converted(session: AsyncSession, *, cart_id: uuid.UUID, version: int) -> None:
    """Close the cart as checked out, only if it is still open at ``version`` (one
    conditional UPDATE, built once). Raises :class:`CartChanged` (409) when it moved
    meanwhile: a line changed, it was merged, expired or already checked out."""
    result = await session.execute(
        _mark_converted_statement(),
        {"cart_id": cart_id, "read_version": version, "now": session_now(session)},
    )
    if result.first() is None:
        raise CartChanged("The cart changed since it was read; read it again and retry.")
