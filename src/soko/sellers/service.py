"""The rules of stores: applying, the marketplace's review, profiles and members.

Functions take a session, flush and never commit. Every state change is a
compare-and-set in the database (``UPDATE ... WHERE status IN (...)``), and every change
of a store's members first locks the store's row, so two owners demoting each other at
once can never leave a store without an owner.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.public import grant_role, user_cards
from soko.platform.crypto import DataKeys
from soko.platform.db import lock_keys
from soko.platform.errors import NotFound, PreconditionFailed, ValidationFailed
from soko.platform.etag import etag_for_version, if_match_passes
from soko.platform.ids import uuid7
from soko.platform.outbox import publish
from soko.platform.runtime import Runtime, invalidate_after_commit
from soko.sellers.errors import (
    NotASeller,
    SellerApplicationsPending,
    SellerLastOwner,
    SellerSlugTaken,
    SellerStateConflict,
)
from soko.sellers.events import (
    SellerApplied,
    SellerApproved,
    SellerEvent,
    SellerReinstated,
    SellerRejected,
    SellerSuspended,
)
from soko.sellers.models import (
    PAYOUT_DETAILS_COLUMN,
    Seller,
    SellerMember,
    SellerRole,
    SellerStatus,
    SellerStatusEvent,
)
from soko.sellers.public import (
    SELLERS_TAG,
    ActingSeller,
    member_role,
    require_role,
    seller_tag,
)
from soko.sellers.schemas import MemberOut, ProfileChange, SellerApplication

SELLER_ROLE = "seller"  # identity's role for people who act for an approved store


# -- payout details, encrypted at rest ---------------------------------------------------------


def _payout_context(seller_id: uuid.UUID) -> str:
    return f"{PAYOUT_DETAILS_COLUMN}:{seller_id}"


def seal_payout_details(keys: DataKeys, seller_id: uuid.UUID, details: dict[str, str]) -> str:
    text = json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return keys.keyring.encrypt(text, context=_payout_context(seller_id))


def payout_details(keys: DataKeys, seller: Seller) -> dict[str, str] | None:
    if seller.payout_details_ciphertext is None:
        return None
    text = keys.keyring.decrypt(
        seller.payout_details_ciphertext, context=_payout_context(seller.id)
    )
    details: dict[str, str] = json.loads(text)
    return details


# -- applying ------------------------------------------------------------------------------------


# Each application waits for an admin's review and keeps its slug: a user has at most
# this many waiting at once, so nobody can flood the review queue or squat on addresses.
MAX_PENDING_APPLICATIONS = 3
APPLICATION_LOCK_SPACE: Final = 0x53415050  # "SAPP"


async def apply(
    session: AsyncSession, runtime: Runtime, applicant: uuid.UUID, application: SellerApplication
) -> Seller:
    """A new pending store owned by ``applicant``. A taken slug answers
    ``seller-slug-taken``, also when another application takes it at the same moment
    (the unique index decides)."""
    # One applicant's applications queue here (their count stays true on PostgreSQL;
    # SQLite's one write lock does the same), so a burst cannot pass the bound together.
    await lock_keys(session, (APPLICATION_LOCK_SPACE, str(applicant)))
    waiting = await session.scalar(
        select(func.count())
        .select_from(Seller)
        .where(Seller.created_by == applicant, Seller.status == SellerStatus.pending.value)
    )
    if (waiting or 0) >= MAX_PENDING_APPLICATIONS:
        raise SellerApplicationsPending(
            f"You have {waiting} store applications waiting for review already.",
            max_pending=MAX_PENDING_APPLICATIONS,
        )
    now = runtime.clock.now()
    seller_id = uuid7()
    seller = Seller(
        id=seller_id,
        slug=application.slug,
        store_name=application.store_name,
        description=application.description,
        contact_email=application.contact_email,
        contact_phone=application.contact_phone,
        payout_details_ciphertext=(
            seal_payout_details(runtime.data_keys, seller_id, application.payout_details)
            if application.payout_details
            else None
        ),
        status=SellerStatus.pending.value,
        status_reason="",
        created_by=applicant,
        created_at=now,
        updated_at=now,
        version=1,
    )
    try:
        async with session.begin_nested():
            session.add(seller)
            await session.flush()
    except IntegrityError:
        # The slug is the table's only unique column besides the fresh id.
        raise SellerSlugTaken(f"The store address {application.slug!r} is taken.") from None
    session.add(
        SellerMember(
            seller_id=seller_id,
            user_id=applicant,
            role=SellerRole.owner.value,
            added_at=now,
            added_by=applicant,
        )
    )
    session.add(
        SellerStatusEvent(
            seller_id=seller_id,
            from_status=None,
            to_status=SellerStatus.pending.value,
            actor_id=applicant,
            reason="",
            at=now,
        )
    )
    await publish(
        session, SellerApplied.name, SellerApplied(seller_id=seller_id, actor_id=applicant), now=now
    )
    await session.flush()
    return seller


# -- the marketplace's review --------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    """A review decision: the states it starts from and the one it leads to."""

    action: str
    sources: frozenset[SellerStatus]
    target: SellerStatus
    event: type[SellerEvent]


APPROVE = Transition(
    "approve", frozenset({SellerStatus.pending}), SellerStatus.active, SellerApproved
)
REJECT = Transition(
    "reject", frozenset({SellerStatus.pending}), SellerStatus.rejected, SellerRejected
)
SUSPEND = Transition(
    "suspend", frozenset({SellerStatus.active}), SellerStatus.suspended, SellerSuspended
)
REINSTATE = Transition(
    "reinstate", frozenset({SellerStatus.suspended}), SellerStatus.active, SellerReinstated
)
TRANSITIONS: dict[str, Transition] = {t.action: t for t in (APPROVE, REJECT, SUSPEND, REINSTATE)}


async def get_seller(session: AsyncSession, seller_id: uuid.UUID) -> Seller:
    seller = await session.get(Seller, seller_id, populate_existing=True)
    if seller is None:
        raise NotFound("No such store.")
    return seller


async def review(
    session: AsyncSession,
    runtime: Runtime,
    seller_id: uuid.UUID,
    transition: Transition,
    *,
    actor_id: uuid.UUID,
    reason: str,
) -> Seller:
    """Move the store along ``transition`` if it is in one of its source states (a
    compare-and-set: of two reviewers deciding at once, the second gets
    ``seller-state-conflict``). Records the decision, publishes its event, and on
    approval or reinstatement gives the store's members the ``seller`` role."""
    now = runtime.clock.now()
    moved = await session.execute(
        update(Seller)
        .where(
            Seller.id == seller_id,
            Seller.status.in_([source.value for source in transition.sources]),
        )
        .values(
            status=transition.target.value,
            status_reason=reason,
            reviewed_at=now,
            reviewed_by=actor_id,
            updated_at=now,
            version=Seller.version + 1,
        )
        .returning(Seller.id)
    )
    if moved.first() is None:
        current = await session.scalar(select(Seller.status).where(Seller.id == seller_id))
        if current is None:
            raise NotFound("No such store.")
        raise SellerStateConflict(
            f"Cannot {transition.action} {'an' if current[0] in 'aeiou' else 'a'} {current} store.",
            current_status=current,
        )
    # The one source state the store was in: the only transitions with several sources
    # would need the old value back, and there are none.
    (source,) = transition.sources
    session.add(
        SellerStatusEvent(
            seller_id=seller_id,
            from_status=source.value,
            to_status=transition.target.value,
            actor_id=actor_id,
            reason=reason,
            at=now,
        )
    )
    if transition.target is SellerStatus.active:
        members = await session.scalars(
            select(SellerMember.user_id).where(SellerMember.seller_id == seller_id)
        )
        for user_id in list(members):
            await grant_role(session, runtime, user_id, SELLER_ROLE, granted_by=actor_id)
    event = transition.event(seller_id=seller_id, actor_id=actor_id, reason=reason)
    await publish(session, event.name, event, now=now)
    invalidate_after_commit(session, SELLERS_TAG, seller_tag(seller_id))
    return await get_seller(session, seller_id)


async def status_history(session: AsyncSession, seller_id: uuid.UUID) -> list[SellerStatusEvent]:
    rows = await session.scalars(
        select(SellerStatusEvent)
        .where(SellerStatusEvent.seller_id == seller_id)
        .order_by(SellerStatusEvent.at, SellerStatusEvent.id)
    )
    return list(rows)


# -- the store's profile -------------------------------------------------------------------------


async def update_profile(
    session: AsyncSession,
    runtime: Runtime,
    acting: ActingSeller,
    change: ProfileChange,
    *,
    if_match: str | None,
) -> Seller:
    """Change the acting store's profile (managers and owners; payout details owners
    only). With ``if_match`` (an ETag), only if the store is still at that version."""
    require_role(acting, SellerRole.manager)
    values: dict[str, Any] = change.model_dump(exclude_unset=True, exclude={"payout_details"})
    for required in ("store_name", "description"):
        if required in values and values[required] is None:
            raise ValidationFailed.of_field(required, "cannot be null")
    if "payout_details" in change.model_fields_set:
        require_role(acting, SellerRole.owner)
        details = change.payout_details
        values["payout_details_ciphertext"] = (
            seal_payout_details(runtime.data_keys, acting.seller_id, details) if details else None
        )
    statement = update(Seller).where(Seller.id == acting.seller_id)
    if if_match is not None:
        current = await session.scalar(select(Seller.version).where(Seller.id == acting.seller_id))
        version = _matched_version(if_match, current)
        statement = statement.where(Seller.version == version)
    if values:
        moved = await session.execute(
            statement.values(
                **values, updated_at=runtime.clock.now(), version=Seller.version + 1
            ).returning(Seller.id)
        )
        if moved.first() is None:
            raise _stale()
        invalidate_after_commit(session, SELLERS_TAG, seller_tag(acting.seller_id))
    return await get_seller(session, acting.seller_id)


def _stale() -> PreconditionFailed:
    return PreconditionFailed(
        "The store's profile has changed since you read it: fetch it again and retry."
    )


def _matched_version(if_match: str, current: int | None) -> int:
    if current is None:
        raise NotFound("No such store.")
    if not if_match_passes(if_match, etag_for_version(current)):
        raise _stale()
    return current


# -- members -------------------------------------------------------------------------------------


async def lock_store(session: AsyncSession, seller_id: uuid.UUID) -> None:
    # Serializes every change of one store's members on PostgreSQL (SQLite's write
    # transactions are serialized already), so "is another owner left?" stays true
    # until this transaction ends.
    await session.execute(select(Seller.id).where(Seller.id == seller_id).with_for_update())


async def lock_as_owner(session: AsyncSession, acting: ActingSeller) -> None:
    """Lock the store, then check again that the caller is still an owner: their role
    was read before the lock, and another owner may have changed it meanwhile."""
    require_role(acting, SellerRole.owner)
    await lock_store(session, acting.seller_id)
    role = await member_role(session, acting.seller_id, acting.user_id)
    if role is None:
        raise NotASeller("You are no longer a member of this store.")
    require_role(replace(acting, role=role), SellerRole.owner)


async def _other_owners(session: AsyncSession, seller_id: uuid.UUID, user_id: uuid.UUID) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(SellerMember)
        .where(
            SellerMember.seller_id == seller_id,
            SellerMember.role == SellerRole.owner.value,
            SellerMember.user_id != user_id,
        )
    )
    return int(count or 0)


async def _member(session: AsyncSession, seller_id: uuid.UUID, user_id: uuid.UUID) -> SellerMember:
    member = await session.get(SellerMember, (seller_id, user_id), populate_existing=True)
    if member is None:
        raise NotFound("No such member of this store.")
    return member


async def member_views(session: AsyncSession, members: Sequence[SellerMember]) -> list[MemberOut]:
    cards = await user_cards(session, [member.user_id for member in members])
    return [
        MemberOut(
            user_id=member.user_id,
            display_name=card.display_name if (card := cards.get(member.user_id)) else "",
            role=SellerRole(member.role),
            added_at=member.added_at,
            added_by=member.added_by,
        )
        for member in members
    ]


async def change_member_role(
    session: AsyncSession, acting: ActingSeller, user_id: uuid.UUID, role: SellerRole
) -> SellerMember:
    """Give a member another role (owners only); the last owner keeps theirs."""
    await lock_as_owner(session, acting)
    member = await _member(session, acting.seller_id, user_id)
    if (
        member.role == SellerRole.owner.value
        and role is not SellerRole.owner
        and await _other_owners(session, acting.seller_id, user_id) == 0
    ):
        raise SellerLastOwner("Make another member an owner before changing this one's role.")
    member.role = role.value
    await session.flush()
    return member


async def remove_member(session: AsyncSession, acting: ActingSeller, user_id: uuid.UUID) -> None:
    """Remove a member (owners; any member may leave by removing themselves); the last
    owner stays."""
    if user_id != acting.user_id:
        await lock_as_owner(session, acting)
    else:
        await lock_store(session, acting.seller_id)
    member = await _member(session, acting.seller_id, user_id)
    if (
        member.role == SellerRole.owner.value
        and await _other_owners(session, acting.seller_id, user_id) == 0
    ):
        raise SellerLastOwner("Make another member an owner before removing this one.")
    await session.delete(member)
    await session.flush()


# -- a deleted account ----------------------------------------------------------------------------


async def forget_member(session: AsyncSession, runtime: Runtime, user_id: uuid.UUID) -> int:
    """End a deleted account's memberships (each store locked, as for any change of its
    members). A store left with no member keeps its name and history but loses its
    contact details and payout details, which were that person's. Returns how many
    stores were left empty."""
    seller_ids = list(
        await session.scalars(
            select(SellerMember.seller_id)
            .where(SellerMember.user_id == user_id)
            .order_by(SellerMember.seller_id)
        )
    )
    emptied = 0
    for seller_id in seller_ids:
        await lock_store(session, seller_id)
        await session.execute(
            delete(SellerMember)
            .where(SellerMember.seller_id == seller_id, SellerMember.user_id == user_id)
            .execution_options(synchronize_session=False)
        )
        remaining = await session.scalar(
            select(func.count())
            .select_from(SellerMember)
            .where(SellerMember.seller_id == seller_id)
        )
        if remaining:
            continue
        await session.execute(
            update(Seller)
            .where(Seller.id == seller_id)
            .values(
                contact_email=None,
                contact_phone=None,
                payout_details_ciphertext=None,
                updated_at=runtime.clock.now(),
                version=Seller.version + 1,
            )
            .execution_options(synchronize_session=False)
        )
        invalidate_after_commit(session, SELLERS_TAG, seller_tag(seller_id))
        emptied += 1
    return emptied
