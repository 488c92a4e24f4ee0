"""What other domains may use of sellers: who acts for which store, and which stores may
sell. Frozen facts and read-only selectables, never ORM rows.

Every ``/api/v1/seller/...`` route of every domain takes :data:`ActingSellerDep`: the store
the caller acts for (chosen with the ``X-Seller-Id`` header when they belong to several),
their role in it and the store's status. The dependency declares "signed in" itself, so a
route that takes it declares no other permission; what the member may do is decided per
object and per role (:meth:`ActingSeller.at_least`, :func:`require_role`,
:func:`require_active`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy import ColumnElement, Select, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from soko.platform.auth import Principal, require
from soko.platform.db import sql_constant
from soko.platform.errors import ValidationFailed, answers
from soko.platform.runtime import SessionDep
from soko.sellers.errors import NotASeller, SellerChoiceNeeded, SellerNotActive, SellerRoleRequired
from soko.sellers.models import Seller, SellerMember, SellerRole, SellerStatus
from soko.sellers.schemas import is_slug

__all__ = [
    "SELLERS_TAG",
    "SELLER_ID_HEADER",
    "ActingSeller",
    "ActingSellerDep",
    "SellerCard",
    "SellerRole",
    "SellerStatus",
    "acting_seller",
    "active_seller_ids",
    "inactive_seller_ids",
    "member_role",
    "member_user_ids",
    "require_active",
    "require_role",
    "seller_cards",
    "seller_slug",
    "seller_tag",
]

#: Cache tag of everything that depends on which stores exist and may sell: a read
#: model that filters on active sellers carries it, and every status change of any
#: store invalidates it.
SELLERS_TAG = "sellers"
SELLER_ID_HEADER = "X-Seller-Id"


def seller_tag(seller_id: uuid.UUID) -> str:
    """The cache tag of one store: invalidated when its profile or status changes."""
    return f"seller:{seller_id}"


@dataclass(frozen=True, slots=True)
class ActingSeller:
    """The store a request acts for, and who acts."""

    seller_id: uuid.UUID
    user_id: uuid.UUID
    role: SellerRole
    status: str

    def at_least(self, role: SellerRole) -> bool:
        """Whether the caller's role in the store is ``role`` or a higher one."""
        return self.role.rank >= role.rank

    @property
    def active(self) -> bool:
        return self.status == SellerStatus.active.value


def require_active(acting: ActingSeller) -> None:
    """Refuse (403 ``seller-not-active``) unless the store is approved and not suspended:
    for what only a selling store may do, such as publishing a product."""
    if not acting.active:
        raise SellerNotActive(
            f"The store is {acting.status}: only an active store may do this.",
            seller_status=acting.status,
        )


def require_role(acting: ActingSeller, role: SellerRole) -> None:
    """Refuse (403 ``seller-role-required``) unless the caller is ``role`` or higher in
    the store: managers and owners change products and stock, owners manage members."""
    if not acting.at_least(role):
        raise SellerRoleRequired(
            f"This needs the {role.value} role or higher in the store; you are "
            f"{acting.role.value}.",
            required_role=role.value,
            your_role=acting.role.value,
        )


def _header_problem() -> ValidationFailed:
    return ValidationFailed.of_field(SELLER_ID_HEADER, "is not a store id", location="header")


async def acting_seller(
    request: Request,
    session: AsyncSession,
    principal: Principal,
    *,
    seller_id: uuid.UUID | None = None,
) -> ActingSeller:
    """The store ``principal`` acts for in ``request``: the one ``seller_id`` (else the
    ``X-Seller-Id`` header) names, or without either their only store.

    Raises ``not-a-seller`` (403) when they belong to no store or not to the one named,
    and ``seller-choice-needed`` (400) when they belong to several and named none. A
    rejected application does not count among "several": it only answers when named."""
    if seller_id is None:
        raw = request.headers.get(SELLER_ID_HEADER)
        if raw is not None and raw.strip():
            try:
                seller_id = uuid.UUID(raw.strip())
            except ValueError:
                raise _header_problem() from None
    memberships = (
        select(SellerMember.seller_id, SellerMember.role, Seller.status)
        .join(Seller, Seller.id == SellerMember.seller_id)
        .where(SellerMember.user_id == principal.user_id)
    )
    if seller_id is not None:
        row = (
            await session.execute(memberships.where(SellerMember.seller_id == seller_id))
        ).first()
        if row is None:
            raise NotASeller("You are not a member of the store X-Seller-Id names.")
        return ActingSeller(seller_id, principal.user_id, SellerRole(row.role), row.status)
    rows = (await session.execute(memberships.order_by(SellerMember.seller_id))).all()
    live = [row for row in rows if row.status != SellerStatus.rejected.value]
    candidates = live or rows
    if not candidates:
        raise NotASeller("You are not a member of any store: apply with POST /api/v1/sellers.")
    if len(candidates) > 1:
        raise SellerChoiceNeeded(
            f"You belong to {len(candidates)} stores: send {SELLER_ID_HEADER} with one of "
            "their ids.",
            seller_ids=[str(row.seller_id) for row in candidates],
        )
    row = candidates[0]
    return ActingSeller(row.seller_id, principal.user_id, SellerRole(row.role), row.status)


@answers(400, 403)  # seller-choice-needed; not-a-seller (or a store not yours)
async def _acting_seller_dependency(
    request: Request,
    session: SessionDep,
    principal: Annotated[Principal, require()],
    x_seller_id: Annotated[
        str | None,
        Header(
            alias=SELLER_ID_HEADER,
            max_length=64,
            description="The id of the store this request acts for; needed only by "
            "members of several stores.",
        ),
    ] = None,
) -> ActingSeller:
    # The header is declared here so OpenAPI documents it on every seller route; it is
    # parsed by acting_seller, which other entry points may call directly.
    del x_seller_id
    return await acting_seller(request, session, principal)


#: The acting seller of a ``/api/v1/seller/...`` route. It declares "signed in" itself:
#: the route declares no other permission.
ActingSellerDep = Annotated[ActingSeller, Depends(_acting_seller_dependency)]


@dataclass(frozen=True, slots=True)
class SellerCard:
    """What another domain may show of a store."""

    id: uuid.UUID
    slug: str
    store_name: str
    status: str

    @property
    def active(self) -> bool:
        return self.status == SellerStatus.active.value


async def seller_cards(
    session: AsyncSession, ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, SellerCard]:
    """The cards of the stores among ``ids`` that exist, whatever their status (one
    query)."""
    wanted = set(ids)
    if not wanted:
        return {}
    rows = await session.execute(
        select(Seller.id, Seller.slug, Seller.store_name, Seller.status).where(
            Seller.id.in_(wanted)
        )
    )
    return {row.id: SellerCard(row.id, row.slug, row.store_name, row.status) for row in rows}


async def inactive_seller_ids(
    session: AsyncSession | AsyncConnection, ids: Iterable[uuid.UUID]
) -> set[uuid.UUID]:
    """The ids among ``ids`` of stores that may not sell now: pending, suspended,
    rejected, or unknown (one query)."""
    wanted = set(ids)
    if not wanted:
        return set()
    active = await session.scalars(
        select(Seller.id).where(Seller.id.in_(wanted), Seller.status == SellerStatus.active.value)
    )
    return wanted - set(active.all())


def active_seller_ids(*, slug: str | ColumnElement[str] | None = None) -> Select[Any]:
    """``SELECT id FROM sellers WHERE status = 'active'``, to embed in another domain's
    query (``Product.seller_id.in_(active_seller_ids())``) so "only stores that may sell"
    costs no extra statement. Read-only; its one column is ``id``.

    With ``slug`` (a value, or a bind parameter of the caller's statement built once),
    only the active store at that address: at most one row, since slugs are unique, so
    ``.scalar_subquery()`` resolves a storefront's address inside the caller's statement
    (NULL, matching nothing, for an unknown slug or a store that may not sell). Pass a
    slug already normalised by :func:`seller_slug`: slugs are stored lower-case."""
    statement = select(Seller.id).where(Seller.status == sql_constant(SellerStatus.active.value))
    if slug is not None:
        statement = statement.where(Seller.slug == slug)
    return statement


def seller_slug(text: str) -> str | None:
    """``text`` as a store's slug (the address of its storefront, ``GET
    /api/v1/sellers/{slug}``): trimmed and lower-cased, as stores are addressed; ``None``
    when no store can have it (3 to 60 characters from a-z, 0-9 and ``-``, starting and
    ending with a letter or digit). Whether a store has it is another question."""
    slug = text.strip().lower()
    return slug if is_slug(slug) else None


async def member_role(
    session: AsyncSession, seller_id: uuid.UUID, user_id: uuid.UUID
) -> SellerRole | None:
    """``user_id``'s role in store ``seller_id``; ``None`` when they are not a member."""
    role = await session.scalar(
        select(SellerMember.role).where(
            SellerMember.seller_id == seller_id, SellerMember.user_id == user_id
        )
    )
    return SellerRole(role) if role is not None else None


@lru_cache(maxsize=1)
def _members_statement() -> Any:
    members: Any = SellerMember.__table__
    return select(members.c.user_id, members.c.role).where(
        members.c.seller_id == bindparam("seller_id")
    )


async def member_user_ids(session: AsyncSession, seller_id: uuid.UUID) -> list[uuid.UUID]:
    """The users who act for store ``seller_id`` (to notify them of an order, say),
    owners first."""
    rows = await session.execute(_members_statement(), {"seller_id": seller_id})
    ordered = sorted(rows, key=lambda row: (-SellerRole(row.role).rank, str(row.user_id)))
    return [row.user_id for row in ordered]
