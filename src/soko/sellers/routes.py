"""The sellers domain's routes: applying for a store, storefronts, the stores a user
belongs to, the acting store's profile, members and invitations (``/seller/...``), the
invitations a user received (``/me/store-invitations``), and the marketplace's review
(``/admin/sellers/...``)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy import Select, select

from soko.identity.public import SELLERS_REVIEW, record_request_audit_event
from soko.platform.auth import (
    SESSION_ONLY,
    MaybePrincipal,
    Principal,
    SignedIn,
    public,
    require,
)
from soko.platform.errors import NotFound, problem_responses
from soko.platform.etag import (
    etag_for_content,
    etag_for_version,
    not_modified,
    tag_response,
)
from soko.platform.pages import plain_page
from soko.platform.pagination import (
    FieldSelection,
    Keyset,
    Page,
    PageRequestDep,
    SortKey,
    field_selection,
    page_response,
)
from soko.platform.runtime import Runtime, RuntimeDep, SessionDep
from soko.sellers import invitations, service
from soko.sellers.models import Seller, SellerInvitation, SellerMember, SellerRole, SellerStatus
from soko.sellers.public import SELLERS_TAG, ActingSellerDep, require_role
from soko.sellers.schemas import (
    AdminSellerDetail,
    AdminSellerOut,
    InvitationIn,
    InvitationOut,
    MemberChange,
    MemberOut,
    MyInvitationOut,
    MyStoreOut,
    ProfileChange,
    ReasonedDecision,
    ReviewDecision,
    SellerApplication,
    SellerOut,
    StatusEventOut,
    StorefrontOut,
    is_slug,
)

router = APIRouter()

Reviewer = Annotated[Principal, require(SELLERS_REVIEW)]

# Storefronts change rarely and are read by every buyer: cached briefly, and dropped on
# any change of any store (SELLERS_TAG), which is rare.
STOREFRONT_TTL_SECONDS = 60

MyStoreFields = field_selection(MyStoreOut)
MemberFields = field_selection(MemberOut, always=("user_id",))
InvitationFields = field_selection(InvitationOut, always=("id",))
AdminSellerFields = field_selection(AdminSellerOut)


def _seller_view(runtime: Runtime, seller: Seller, *, owner: bool) -> SellerOut:
    return SellerOut(
        id=seller.id,
        slug=seller.slug,
        store_name=seller.store_name,
        description=seller.description,
        contact_email=seller.contact_email,
        contact_phone=seller.contact_phone,
        status=SellerStatus(seller.status),
        status_reason=seller.status_reason,
        has_payout_details=seller.payout_details_ciphertext is not None,
        payout_details=service.payout_details(runtime.data_keys, seller) if owner else None,
        created_at=seller.created_at,
        updated_at=seller.updated_at,
        reviewed_at=seller.reviewed_at,
        version=seller.version,
    )


def _admin_view(seller: Seller) -> AdminSellerOut:
    return AdminSellerOut(
        id=seller.id,
        slug=seller.slug,
        store_name=seller.store_name,
        description=seller.description,
        contact_email=seller.contact_email,
        contact_phone=seller.contact_phone,
        status=SellerStatus(seller.status),
        status_reason=seller.status_reason,
        has_payout_details=seller.payout_details_ciphertext is not None,
        created_by=seller.created_by,
        created_at=seller.created_at,
        updated_at=seller.updated_at,
        reviewed_at=seller.reviewed_at,
        reviewed_by=seller.reviewed_by,
        version=seller.version,
    )


# -- applying and storefronts ------------------------------------------------------------------


@router.post(
    "/sellers",
    status_code=201,
    response_model=SellerOut,
    summary="Apply for a store",
    responses=problem_responses(409, 422),
)
async def apply_for_store(
    principal: SignedIn,
    body: SellerApplication,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerOut:
    """The store waits for review (``pending``); the applicant becomes its owner and may
    prepare products meanwhile. A user may own several stores."""
    seller = await service.apply(session, runtime, principal.user_id, body)
    tag_response(response, etag_for_version(seller.version))
    return _seller_view(runtime, seller, owner=True)


@router.get(
    "/sellers/{slug}",
    response_model=StorefrontOut,
    summary="A store's public profile",
    responses=problem_responses(404),
)
async def storefront(
    _caller: MaybePrincipal,
    slug: str,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    """Only active stores have a storefront; any other answers 404."""
    slug = slug.lower()
    if not is_slug(slug):
        raise NotFound("No such store.")

    async def load() -> dict[str, Any] | None:
        seller = await session.scalar(
            select(Seller).where(Seller.slug == slug, Seller.status == SellerStatus.active.value)
        )
        if seller is None:
            return None
        return StorefrontOut(
            id=seller.id,
            slug=seller.slug,
            store_name=seller.store_name,
            description=seller.description,
            created_at=seller.created_at,
        ).model_dump(mode="json")

    data = await runtime.cache.get_or_set(
        f"sellers:storefront:{slug}", load, STOREFRONT_TTL_SECONDS, tags=[SELLERS_TAG], near=True
    )
    if data is None:
        raise NotFound("No such store.")
    etag = etag_for_content(data)
    if (unchanged := not_modified(request, etag)) is not None:
        return unchanged
    answer = Response(
        content=StorefrontOut.model_validate(data).model_dump_json(), media_type="application/json"
    )
    tag_response(answer, etag)
    return answer


@router.get("/me/sellers", response_model=Page[MyStoreOut], summary="The stores you belong to")
async def my_stores(
    principal: SignedIn,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(MyStoreFields)],
) -> Response:
    listing = Keyset(
        f"sellers.mine:{principal.user_id}",
        SortKey(SellerMember.added_at),
        id_column=SellerMember.seller_id,
    )
    # Keyset.fetch is typed for one-column selects; it reads any row shape.
    statement = cast(
        "Select[Any]",
        select(
            SellerMember.seller_id,
            SellerMember.added_at,
            SellerMember.role,
            Seller.slug,
            Seller.store_name,
            Seller.status,
        )
        .join(Seller, Seller.id == SellerMember.seller_id)
        .where(SellerMember.user_id == principal.user_id),
    )
    rows, next_cursor = await listing.fetch(session, statement, page)
    items = [
        MyStoreOut(
            id=row.seller_id,
            slug=row.slug,
            store_name=row.store_name,
            status=SellerStatus(row.status),
            role=SellerRole(row.role),
            added_at=row.added_at,
        )
        for row in rows
    ]
    return page_response(items, next_cursor, fields)


# -- the acting store ------------------------------------------------------------------------------


@router.get(
    "/seller/profile",
    response_model=SellerOut,
    summary="Your store's profile",
    responses=problem_responses(400, 403),
)
async def my_store_profile(
    acting: ActingSellerDep,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    seller = await service.get_seller(session, acting.seller_id)
    etag = etag_for_version(seller.version)
    if (unchanged := not_modified(request, etag)) is not None:
        return unchanged
    view = _seller_view(runtime, seller, owner=acting.role is SellerRole.owner)
    answer = Response(content=view.model_dump_json(), media_type="application/json")
    tag_response(answer, etag)
    return answer


@router.patch(
    "/seller/profile",
    dependencies=[SESSION_ONLY],
    response_model=SellerOut,
    summary="Change your store's profile",
    responses=problem_responses(400, 403, 412, 422),
)
async def change_my_store_profile(
    acting: ActingSellerDep,
    body: ProfileChange,
    request: Request,
    response: Response,
    session: SessionDep,
    runtime: RuntimeDep,
) -> SellerOut:
    """Managers and owners; payout details owners only. ``If-Match`` (optional) makes
    the change conditional on the version read."""
    seller = await service.update_profile(
        session, runtime, acting, body, if_match=request.headers.get("if-match")
    )
    tag_response(response, etag_for_version(seller.version))
    return _seller_view(runtime, seller, owner=acting.role is SellerRole.owner)


@router.get(
    "/seller/members",
    response_model=Page[MemberOut],
    summary="Your store's members",
    responses=problem_responses(400, 403),
)
async def list_members(
    acting: ActingSellerDep,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(MemberFields)],
) -> Response:
    listing = Keyset(
        f"sellers.members:{acting.seller_id}",
        SortKey(SellerMember.added_at),
        id_column=SellerMember.user_id,
    )
    rows, next_cursor = await listing.fetch(
        session, select(SellerMember).where(SellerMember.seller_id == acting.seller_id), page
    )
    return page_response(await service.member_views(session, rows), next_cursor, fields)


@router.patch(
    "/seller/members/{user_id}",
    dependencies=[SESSION_ONLY],
    response_model=MemberOut,
    summary="Change a member's role",
    responses=problem_responses(400, 403, 404, 409, 422),
)
async def change_member(
    acting: ActingSellerDep, user_id: uuid.UUID, body: MemberChange, session: SessionDep
) -> MemberOut:
    """Owners only; the last owner keeps the owner role."""
    member = await service.change_member_role(session, acting, user_id, body.role)
    return (await service.member_views(session, [member]))[0]


@router.delete(
    "/seller/members/{user_id}",
    dependencies=[SESSION_ONLY],
    status_code=204,
    summary="Remove a member",
    responses=problem_responses(400, 403, 404, 409),
)
async def remove_member(
    acting: ActingSellerDep, user_id: uuid.UUID, session: SessionDep
) -> Response:
    """Owners remove anyone; any member may leave. The last owner stays."""
    await service.remove_member(session, acting, user_id)
    return Response(status_code=204)


# -- invitations ---------------------------------------------------------------------------------


def _audit(
    session: Any,
    runtime: Runtime,
    request: Request,
    action: str,
    actor_id: uuid.UUID,
    seller_id: uuid.UUID,
    data: dict[str, Any],
) -> Any:
    return record_request_audit_event(
        session,
        request,
        runtime,
        action=action,
        actor_id=actor_id,
        target_type="seller",
        target_id=seller_id,
        data=data,
    )


@router.post(
    "/seller/invitations",
    dependencies=[SESSION_ONLY],
    status_code=201,
    response_model=InvitationOut,
    summary="Invite someone to your store",
    responses=problem_responses(400, 403, 409, 422, 429),
)
async def invite_member(
    acting: ActingSellerDep,
    body: InvitationIn,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> InvitationOut:
    """Owners only. The invitation goes to the email address or phone number; the same
    answer whether an account has it or not. Only an account that has verified that
    address can accept it, within seven days; an open invitation of the store to the
    same address is replaced."""
    invitation = await invitations.invite(
        session, runtime, acting, address=body.address, role=body.role
    )
    await _audit(
        session,
        runtime,
        request,
        "seller.member_invited",
        acting.user_id,
        acting.seller_id,
        {
            "invitation_id": str(invitation.id),
            "role": invitation.role,
            "address_kind": invitation.address_kind,
        },
    )
    return invitations.invitation_view(runtime, invitation, runtime.clock.now())


@router.get(
    "/seller/invitations",
    response_model=Page[InvitationOut],
    summary="Your store's invitations",
    responses=problem_responses(400, 403),
)
async def list_invitations(
    acting: ActingSellerDep,
    session: SessionDep,
    runtime: RuntimeDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(InvitationFields)],
) -> Response:
    """Owners only; newest first, whatever their status."""
    require_role(acting, SellerRole.owner)
    listing = Keyset(
        f"sellers.invitations:{acting.seller_id}",
        SortKey(SellerInvitation.created_at, descending=True),
        id_column=SellerInvitation.id,
    )
    rows, next_cursor = await listing.fetch(
        session,
        select(SellerInvitation).where(SellerInvitation.seller_id == acting.seller_id),
        page,
    )
    now = runtime.clock.now()
    items = [invitations.invitation_view(runtime, row, now) for row in rows]
    return page_response(items, next_cursor, fields)


@router.delete(
    "/seller/invitations/{invitation_id}",
    dependencies=[SESSION_ONLY],
    status_code=204,
    summary="Revoke an invitation",
    responses=problem_responses(400, 403, 404, 409),
)
async def revoke_invitation(
    acting: ActingSellerDep,
    invitation_id: uuid.UUID,
    session: SessionDep,
    runtime: RuntimeDep,
) -> Response:
    """Owners only; an invitation that is no longer open answers 409."""
    await invitations.revoke(session, runtime, acting, invitation_id)
    return Response(status_code=204)


@router.get(
    "/me/store-invitations",
    response_model=Page[MyInvitationOut],
    summary="Invitations to join a store, sent to you",
)
async def my_invitations(
    principal: SignedIn, session: SessionDep, runtime: RuntimeDep
) -> Page[MyInvitationOut]:
    """The open invitations sent to the email address and phone number you have
    verified. A few at most, so on one page."""
    items = await invitations.my_invitations(session, runtime, principal.user_id)
    return Page[MyInvitationOut](items=items, next_cursor=None)


@router.post(
    "/me/store-invitations/{invitation_id}/accept",
    dependencies=[SESSION_ONLY],
    status_code=201,
    response_model=MyStoreOut,
    summary="Accept an invitation and join the store",
    responses=problem_responses(403, 404, 409),
)
async def accept_invitation(
    principal: SignedIn,
    invitation_id: uuid.UUID,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> MyStoreOut:
    """You become a member with the invitation's role (in an active store, a seller
    at once). An invitation sent to an address you have not verified answers 404."""
    member = await invitations.accept(session, runtime, principal.user_id, invitation_id)
    seller = await service.get_seller(session, member.seller_id)
    await _audit(
        session,
        runtime,
        request,
        "seller.member_joined",
        principal.user_id,
        member.seller_id,
        {"invitation_id": str(invitation_id), "role": member.role},
    )
    return MyStoreOut(
        id=seller.id,
        slug=seller.slug,
        store_name=seller.store_name,
        status=SellerStatus(seller.status),
        role=SellerRole(member.role),
        added_at=member.added_at,
    )


@router.post(
    "/me/store-invitations/{invitation_id}/decline",
    dependencies=[SESSION_ONLY],
    status_code=204,
    summary="Decline an invitation",
    responses=problem_responses(404, 409),
)
async def decline_invitation(
    principal: SignedIn, invitation_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep
) -> Response:
    await invitations.decline(session, runtime, principal.user_id, invitation_id)
    return Response(status_code=204)


# -- the marketplace's review ----------------------------------------------------------------------


@router.get(
    "/admin/sellers",
    response_model=Page[AdminSellerOut],
    summary="Stores, newest first (the review queue with status=pending)",
)
async def admin_list_sellers(
    _reviewer: Reviewer,
    session: SessionDep,
    page: PageRequestDep,
    fields: Annotated[FieldSelection, Depends(AdminSellerFields)],
    status: Annotated[SellerStatus | None, Query(description="Only stores in this status")] = None,
) -> Response:
    listing = Keyset(
        f"sellers.admin:{status.value if status else 'all'}",
        SortKey(Seller.created_at, descending=True),
        id_column=Seller.id,
    )
    statement = select(Seller)
    if status is not None:
        statement = statement.where(Seller.status == status.value)
    rows, next_cursor = await listing.fetch(session, statement, page)
    return page_response([_admin_view(row) for row in rows], next_cursor, fields)


async def _admin_detail(session: Any, seller: Seller) -> AdminSellerDetail:
    members = (
        await session.scalars(
            select(SellerMember)
            .where(SellerMember.seller_id == seller.id)
            .order_by(SellerMember.added_at, SellerMember.user_id)
        )
    ).all()
    history = await service.status_history(session, seller.id)
    return AdminSellerDetail(
        **_admin_view(seller).model_dump(),
        members=await service.member_views(session, members),
        history=[StatusEventOut.model_validate(event) for event in history],
    )


@router.get(
    "/admin/sellers/{seller_id}",
    response_model=AdminSellerDetail,
    summary="A store with its members and review history",
    responses=problem_responses(404),
)
async def admin_get_seller(
    _reviewer: Reviewer, seller_id: uuid.UUID, session: SessionDep
) -> AdminSellerDetail:
    return await _admin_detail(session, await service.get_seller(session, seller_id))


async def _decide(
    transition: service.Transition,
    reviewer: Principal,
    seller_id: uuid.UUID,
    reason: str,
    request: Request,
    session: Any,
    runtime: Runtime,
) -> AdminSellerDetail:
    seller = await service.review(
        session, runtime, seller_id, transition, actor_id=reviewer.user_id, reason=reason
    )
    await _audit(
        session,
        runtime,
        request,
        f"seller.{transition.event.name.partition('.')[2]}",
        reviewer.user_id,
        seller_id,
        {"slug": seller.slug, "reason": reason},
    )
    return await _admin_detail(session, seller)


_DECISION_RESPONSES = problem_responses(404, 409, 422)


@router.post(
    "/admin/sellers/{seller_id}/approve",
    response_model=AdminSellerDetail,
    summary="Approve a pending store",
    responses=_DECISION_RESPONSES,
)
async def approve_seller(
    reviewer: Reviewer,
    seller_id: uuid.UUID,
    body: ReviewDecision,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminSellerDetail:
    """The store may sell; its members get the ``seller`` role."""
    return await _decide(
        service.APPROVE, reviewer, seller_id, body.reason, request, session, runtime
    )


@router.post(
    "/admin/sellers/{seller_id}/reject",
    response_model=AdminSellerDetail,
    summary="Reject a pending store",
    responses=_DECISION_RESPONSES,
)
async def reject_seller(
    reviewer: Reviewer,
    seller_id: uuid.UUID,
    body: ReasonedDecision,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminSellerDetail:
    return await _decide(
        service.REJECT, reviewer, seller_id, body.reason, request, session, runtime
    )


@router.post(
    "/admin/sellers/{seller_id}/suspend",
    response_model=AdminSellerDetail,
    summary="Suspend an active store",
    responses=_DECISION_RESPONSES,
)
async def suspend_seller(
    reviewer: Reviewer,
    seller_id: uuid.UUID,
    body: ReasonedDecision,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminSellerDetail:
    """Its products leave the catalog and cannot be bought until it is reinstated."""
    return await _decide(
        service.SUSPEND, reviewer, seller_id, body.reason, request, session, runtime
    )


@router.post(
    "/admin/sellers/{seller_id}/reinstate",
    response_model=AdminSellerDetail,
    summary="Reinstate a suspended store",
    responses=_DECISION_RESPONSES,
)
async def reinstate_seller(
    reviewer: Reviewer,
    seller_id: uuid.UUID,
    body: ReviewDecision,
    request: Request,
    session: SessionDep,
    runtime: RuntimeDep,
) -> AdminSellerDetail:
    return await _decide(
        service.REINSTATE, reviewer, seller_id, body.reason, request, session, runtime
    )


# -- the page an invitation's message links to -----------------------------------------

# Served at the site root, outside /api/v1, when the marketplace has no page of its own
# (SOKO_APP_URL empty): it says how to answer, and reads nothing.
root_router = APIRouter(include_in_schema=False)


@root_router.get("/store-invitations", response_class=HTMLResponse)
async def store_invitations_page(
    _visitor: Annotated[Principal | None, public()],
) -> HTMLResponse:
    return plain_page(
        "Your store invitations",
        "<p>To accept or decline an invitation to join a store, sign in to the "
        "marketplace with the email address or phone number the invitation was sent to "
        "(verified), and open your store invitations. An invitation lasts 7 days.</p>"
        "<p>For developers: <code>GET /api/v1/me/store-invitations</code>, then "
        "<code>POST /api/v1/me/store-invitations/{id}/accept</code> or "
        "<code>/decline</code>.</p>",
    )
