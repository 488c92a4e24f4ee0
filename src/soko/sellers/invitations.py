"""Invitations to join a store: nobody becomes a member without saying yes.

An owner invites an email address or phone number with a role. The answer is the same
whether an account has that address or not, so inviting tells nobody who has an
account. A message goes to the address; only an account that has *verified* that
address sees the invitation and may accept or decline it, within seven days. Accepting
makes the account a member (in an active store, a ``seller`` at once).

Messages to outside addresses cost money (SMS) and can be abused, so each inviting user
sends at most :data:`INVITATIONS_PER_INVITER_PER_DAY` a day, and each address receives at
most :data:`INVITATIONS_PER_ADDRESS_PER_DAY`, whichever stores send them. Both limits
are counted in the database under locks (the store's row, then one advisory lock per
inviter and per address on PostgreSQL; SQLite serializes writers), so requests sent
together cannot pass them.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from typing import Final

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from soko.identity.public import (
    ContactAddress,
    contact_address,
    grant_role,
    user_cards,
    verified_address_indexes,
)
from soko.notifications.public import send_email, send_sms
from soko.platform.db import lock_keys
from soko.platform.errors import NotFound
from soko.platform.ids import uuid7
from soko.platform.runtime import Runtime
from soko.sellers.errors import (
    SellerInvitationLimit,
    SellerInvitationStateConflict,
    SellerMemberExists,
    SellerNotActive,
)
from soko.sellers.models import (
    INVITATION_ADDRESS_COLUMN,
    InvitationStatus,
    Seller,
    SellerInvitation,
    SellerMember,
    SellerRole,
    SellerStatus,
)
from soko.sellers.public import ActingSeller
from soko.sellers.schemas import InvitationOut, MyInvitationOut
from soko.sellers.service import SELLER_ROLE, lock_as_owner, lock_store

INVITATION_LIFE: Final = dt.timedelta(days=7)
INVITATIONS_PER_INVITER_PER_DAY: Final = 20
INVITATIONS_PER_ADDRESS_PER_DAY: Final = 3
# In all, revoked ones included, while the store waits for an admin's review.
INVITATIONS_BEFORE_APPROVAL: Final = 5
DAY: Final = dt.timedelta(hours=24)
MESSAGE_CATEGORY: Final = "sellers.invitation"
# Namespaces of the advisory locks that serialize the daily limits (int4 constants
# nothing else uses).
INVITER_LOCK_SPACE: Final = 0x53494E56  # "SINV"
ADDRESS_LOCK_SPACE: Final = 0x53494E41  # "SINA"
# Stores whose invitations may be sent and accepted: not a rejected or suspended one.
_INVITING_STATUSES: Final = frozenset({SellerStatus.pending.value, SellerStatus.active.value})


def _context(invitation_id: uuid.UUID) -> str:
    return f"{INVITATION_ADDRESS_COLUMN}:{invitation_id}"


def invitation_address(runtime: Runtime, invitation: SellerInvitation) -> str:
    return runtime.data_keys.keyring.decrypt(
        invitation.address_ciphertext, context=_context(invitation.id)
    )


def effective_status(invitation: SellerInvitation, now: dt.datetime) -> str:
    """The stored status, or ``expired`` for a pending invitation past its time."""
    if invitation.status == InvitationStatus.pending.value and invitation.expires_at <= now:
        return "expired"
    return invitation.status


def invitation_view(
    runtime: Runtime, invitation: SellerInvitation, now: dt.datetime
) -> InvitationOut:
    return InvitationOut(
        id=invitation.id,
        address=invitation_address(runtime, invitation),
        address_kind=invitation.address_kind,
        role=SellerRole(invitation.role),
        status=effective_status(invitation, now),
        invited_by=invitation.invited_by,
        created_at=invitation.created_at,
        expires_at=invitation.expires_at,
        decided_at=invitation.decided_at,
    )


# -- an owner invites --------------------------------------------------------------------------


async def _lock_limits(session: AsyncSession, inviter: uuid.UUID, address_index: str) -> None:
    # The inviter first, then the address: always that order.
    await lock_keys(
        session, (INVITER_LOCK_SPACE, str(inviter)), (ADDRESS_LOCK_SPACE, address_index)
    )


async def _check_limit(
    session: AsyncSession,
    counted: ColumnElement[bool],
    limit: int,
    now: dt.datetime,
    detail: str,
) -> None:
    """Refuse when ``limit`` invitations matching ``counted`` were sent in the last day;
    ``Retry-After`` says when the oldest of them leaves the day."""
    since = now - DAY
    times = (
        await session.scalars(
            select(SellerInvitation.created_at)
            .where(counted, SellerInvitation.created_at > since)
            .order_by(SellerInvitation.created_at.desc())
            .limit(limit)
        )
    ).all()
    if len(times) < limit:
        return
    retry_after = max(1, math.ceil((times[-1] + DAY - now).total_seconds()))
    raise SellerInvitationLimit(detail, limit=limit, headers={"Retry-After": str(retry_after)})


def _message(runtime: Runtime, store_name: str, role: SellerRole, kind: str) -> tuple[str, str]:
    """The subject and the text of an invitation (an SMS sends the text alone)."""
    link = f"{runtime.settings.effective_app_url}/store-invitations"
    article = "an" if role.value[0] in "aeiou" else "a"
    subject = f"You are invited to join {store_name} on Soko"
    where = "this email address" if kind == "email" else "this phone number"
    text_body = (
        f"You are invited to join the store {store_name!r} on Soko as {article} "
        f"{role.value}. To accept or decline, sign in to Soko with {where} "
        f"(verified) and open {link} within 7 days. If you did not expect this, "
        "ignore it: nothing changes unless you accept."
    )
    return subject, text_body


async def invite(
    session: AsyncSession,
    runtime: Runtime,
    acting: ActingSeller,
    *,
    address: str,
    role: SellerRole,
) -> SellerInvitation:
    """Invite ``address`` (an email address or phone number) to the acting store with
    ``role`` (owners only; not from a suspended or rejected store). An open invitation
    of the store to the same address is revoked and replaced."""
    await lock_as_owner(session, acting)
    status, store_name = (
        await session.execute(
            select(Seller.status, Seller.store_name).where(Seller.id == acting.seller_id)
        )
    ).one()
    if status not in _INVITING_STATUSES:
        raise SellerNotActive(
            f"The store is {status}: it cannot invite anyone.", seller_status=status
        )
    target: ContactAddress = contact_address(runtime, address, field="address")
    await _lock_limits(session, acting.user_id, target.index)
    now = runtime.clock.now()
    if status == SellerStatus.pending.value:
        # Nobody has vouched for a store waiting for review yet: it may set up its team,
        # but not use the marketplace's name to message people by the hundred.
        sent = await session.scalar(
            select(func.count())
            .select_from(SellerInvitation)
            .where(SellerInvitation.seller_id == acting.seller_id)
        )
        if (sent or 0) >= INVITATIONS_BEFORE_APPROVAL:
            raise SellerInvitationLimit(
                f"A store waiting for review sends at most {INVITATIONS_BEFORE_APPROVAL} "
                "invitations; more once it is approved.",
                limit=INVITATIONS_BEFORE_APPROVAL,
            )
    await _check_limit(
        session,
        SellerInvitation.invited_by == acting.user_id,
        INVITATIONS_PER_INVITER_PER_DAY,
        now,
        f"You sent {INVITATIONS_PER_INVITER_PER_DAY} invitations in the last 24 hours.",
    )
    await _check_limit(
        session,
        SellerInvitation.address_index == target.index,
        INVITATIONS_PER_ADDRESS_PER_DAY,
        now,
        f"This address received {INVITATIONS_PER_ADDRESS_PER_DAY} invitations in the last "
        "24 hours.",
    )
    await session.execute(
        update(SellerInvitation)
        .where(
            SellerInvitation.seller_id == acting.seller_id,
            SellerInvitation.address_index == target.index,
            SellerInvitation.status == InvitationStatus.pending.value,
        )
        .values(status=InvitationStatus.revoked.value, decided_at=now, decided_by=acting.user_id)
        .execution_options(synchronize_session=False)
    )
    invitation_id = uuid7()
    invitation = SellerInvitation(
        id=invitation_id,
        seller_id=acting.seller_id,
        address_kind=target.kind,
        address_index=target.index,
        address_ciphertext=runtime.data_keys.keyring.encrypt(
            target.value, context=_context(invitation_id)
        ),
        role=role.value,
        status=InvitationStatus.pending.value,
        invited_by=acting.user_id,
        created_at=now,
        expires_at=now + INVITATION_LIFE,
    )
    session.add(invitation)
    await session.flush()
    subject, body = _message(runtime, store_name, role, target.kind)
    dedupe_key = f"{MESSAGE_CATEGORY}:{invitation_id}"
    if target.kind == "email":
        await send_email(
            session,
            to=target.value,
            subject=subject,
            text=body,
            category=MESSAGE_CATEGORY,
            dedupe_key=dedupe_key,
        )
    else:
        await send_sms(
            session, to=target.value, body=body, category=MESSAGE_CATEGORY, dedupe_key=dedupe_key
        )
    return invitation


async def store_invitation(
    session: AsyncSession, acting: ActingSeller, invitation_id: uuid.UUID
) -> SellerInvitation:
    """The acting store's invitation; another store's answers 404 like a missing one."""
    invitation = (
        await session.scalars(
            select(SellerInvitation).where(
                SellerInvitation.id == invitation_id,
                SellerInvitation.seller_id == acting.seller_id,
            )
        )
    ).one_or_none()
    if invitation is None:
        raise NotFound("No such invitation of this store.")
    return invitation


def _not_open(invitation: SellerInvitation, now: dt.datetime) -> SellerInvitationStateConflict:
    current = effective_status(invitation, now)
    return SellerInvitationStateConflict(
        f"The invitation is {current}, no longer open.", current_status=current
    )


async def revoke(
    session: AsyncSession, runtime: Runtime, acting: ActingSeller, invitation_id: uuid.UUID
) -> None:
    """Take back an open invitation (owners only)."""
    await lock_as_owner(session, acting)
    invitation = await store_invitation(session, acting, invitation_id)
    await _decide(session, runtime, invitation, InvitationStatus.revoked, acting.user_id)


async def _decide(
    session: AsyncSession,
    runtime: Runtime,
    invitation: SellerInvitation,
    to: InvitationStatus,
    actor: uuid.UUID,
) -> None:
    """Move an open, unexpired invitation to ``to``: a compare-and-set, so of two
    decisions at once the second answers ``seller-invitation-state-conflict``."""
    now = runtime.clock.now()
    moved = await session.execute(
        update(SellerInvitation)
        .where(
            SellerInvitation.id == invitation.id,
            SellerInvitation.status == InvitationStatus.pending.value,
            SellerInvitation.expires_at > now,
        )
        .values(status=to.value, decided_at=now, decided_by=actor)
        .returning(SellerInvitation.id)
        .execution_options(synchronize_session=False)
    )
    if moved.first() is None:
        await session.refresh(invitation)
        raise _not_open(invitation, now)


# -- the invitee -------------------------------------------------------------------------------


async def _addressed_to(
    session: AsyncSession, user_id: uuid.UUID, invitation_id: uuid.UUID
) -> SellerInvitation:
    """The invitation, if it was sent to an address ``user_id`` has verified; 404 for
    anyone else, exactly like an id that does not exist."""
    indexes = await verified_address_indexes(session, user_id)
    invitation = (
        await session.scalars(select(SellerInvitation).where(SellerInvitation.id == invitation_id))
    ).one_or_none()
    if invitation is None or invitation.address_index not in indexes:
        raise NotFound("No such invitation for you.")
    return invitation


async def my_invitations(
    session: AsyncSession, runtime: Runtime, user_id: uuid.UUID
) -> list[MyInvitationOut]:
    """The open invitations sent to the addresses ``user_id`` has verified, newest
    first (a handful at most: each address receives three a day, for seven days)."""
    indexes = await verified_address_indexes(session, user_id)
    if not indexes:
        return []
    now = runtime.clock.now()
    rows = (
        await session.execute(
            select(SellerInvitation, Seller.slug, Seller.store_name)
            .join(Seller, Seller.id == SellerInvitation.seller_id)
            .where(
                SellerInvitation.address_index.in_(sorted(indexes)),
                SellerInvitation.status == InvitationStatus.pending.value,
                SellerInvitation.expires_at > now,
                Seller.status.in_(sorted(_INVITING_STATUSES)),
            )
            .order_by(SellerInvitation.created_at.desc(), SellerInvitation.id.desc())
        )
    ).all()
    cards = await user_cards(session, [row[0].invited_by for row in rows])
    return [
        MyInvitationOut(
            id=invitation.id,
            seller_id=invitation.seller_id,
            slug=slug,
            store_name=store_name,
            role=SellerRole(invitation.role),
            invited_by_name=card.display_name if (card := cards.get(invitation.invited_by)) else "",
            created_at=invitation.created_at,
            expires_at=invitation.expires_at,
        )
        for invitation, slug, store_name in rows
    ]


async def accept(
    session: AsyncSession, runtime: Runtime, user_id: uuid.UUID, invitation_id: uuid.UUID
) -> SellerMember:
    """Join the store with the invitation's role. The store is locked first, as a
    review and every change of members lock it, so an approval at the same moment
    either sees the new member or is seen by it (the ``seller`` role is granted once)."""
    invitation = await _addressed_to(session, user_id, invitation_id)
    await lock_store(session, invitation.seller_id)
    status = await session.scalar(select(Seller.status).where(Seller.id == invitation.seller_id))
    if status not in _INVITING_STATUSES:
        raise SellerNotActive(
            f"The store is {status}: its invitations cannot be accepted.", seller_status=status
        )
    await _decide(session, runtime, invitation, InvitationStatus.accepted, user_id)
    member = SellerMember(
        seller_id=invitation.seller_id,
        user_id=user_id,
        role=invitation.role,
        added_at=runtime.clock.now(),
        added_by=invitation.invited_by,
    )
    try:
        async with session.begin_nested():
            session.add(member)
            await session.flush()
    except IntegrityError:
        raise SellerMemberExists("You are already a member of this store.") from None
    if status == SellerStatus.active.value:
        await grant_role(session, runtime, user_id, SELLER_ROLE, granted_by=invitation.invited_by)
    return member


async def decline(
    session: AsyncSession, runtime: Runtime, user_id: uuid.UUID, invitation_id: uuid.UUID
) -> None:
    invitation = await _addressed_to(session, user_id, invitation_id)
    await _decide(session, runtime, invitation, InvitationStatus.declined, user_id)
